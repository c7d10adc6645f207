"""`filesystem.Filesystem` of the E2B daemon over Corral's file service (which works inside the
sandbox, as its user).

`Stat`, `ListDir` (to `depth` levels), `MakeDir` (with its parents; `already_exists` if it is
there, which the SDK reads as "not created"), `Move` (replacing a file at the destination, as
a rename does) and `Remove` (recursive).

Directory watching runs the file helper's inotify watch in the sandbox: `WatchDir` streams its
events (with keepalives); `CreateWatcher` keeps one running in this server for the client to
poll with `GetWatcherEvents` (the SDK's `files.watch_dir`) until `RemoveWatcher`. Such a
watcher lives in the server process that made it (a fleet's load balancer must send the polls
of one sandbox to one replica), and one unpolled for an hour is dropped. Events carry no entry
info (the face's envd version, 0.5.7, does not offer it).
"""

from __future__ import annotations

import asyncio
import secrets
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from corral.api.faces.e2b.connect import ConnectError
from corral.api.faces.e2b.envd import Envd, rpc
from corral.api.faces.e2b.pb import filesystem_pb2 as pb
from corral.core.errors import Conflict, NotFound
from corral.core.files import Watch
from corral.core.models import FileInfo

SERVICE = "filesystem.Filesystem"
LIST_LIMIT = 100_000
MAX_DEPTH = 32
MAX_WATCHERS = 1000
MAX_PENDING_EVENTS = 10_000  # per polled watcher; more are dropped until it is polled
WATCHER_IDLE_SECONDS = 3600
TYPE_BITS = {
    "file": stat.S_IFREG,
    "directory": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "fifo": stat.S_IFIFO,
    "socket": stat.S_IFSOCK,
    "char_device": stat.S_IFCHR,
    "block_device": stat.S_IFBLK,
}
NAMES = {0: "root", 1000: "user"}


def entry(info: FileInfo) -> pb.EntryInfo:
    modified = Timestamp()
    modified.FromDatetime(info.modified_at)
    out = pb.EntryInfo(
        name=info.name,
        type=pb.FILE_TYPE_DIRECTORY if info.type == "directory" else pb.FILE_TYPE_FILE,
        path=info.path,
        size=info.size,
        mode=info.mode,
        permissions=stat.filemode(TYPE_BITS.get(info.type, 0) | info.mode),
        owner=NAMES.get(info.uid, str(info.uid)),
        group=NAMES.get(info.gid, str(info.gid)),
        modified_time=modified,
        is_symlink=info.type == "symlink",
    )
    if info.link_target is not None:
        out.symlink_target = info.link_target
    return out


@rpc(SERVICE, "Stat", "unary", pb.StatRequest)
async def stat_entry(ctx: Envd, message: pb.StatRequest) -> pb.StatResponse:
    info = await ctx.services.files.stat(ctx.sandbox.id, ctx.path(message.path))
    return pb.StatResponse(entry=entry(info))


@rpc(SERVICE, "ListDir", "unary", pb.ListDirRequest)
async def list_dir(ctx: Envd, message: pb.ListDirRequest) -> pb.ListDirResponse:
    depth = max(1, message.depth)
    if depth > MAX_DEPTH:
        raise ConnectError("invalid_argument", f"depth must be at most {MAX_DEPTH}")
    out = pb.ListDirResponse()
    level = [ctx.path(message.path)]
    for _ in range(depth):
        below = []
        for directory in level:
            listing = await ctx.services.files.list(ctx.sandbox.id, directory, limit=LIST_LIMIT)
            for info in listing.entries:
                out.entries.append(entry(info))
                if info.type == "directory":
                    below.append(info.path)
        level = below
    return out


@rpc(SERVICE, "MakeDir", "unary", pb.MakeDirRequest)
async def make_dir(ctx: Envd, message: pb.MakeDirRequest) -> pb.MakeDirResponse:
    path = ctx.path(message.path)
    try:
        await ctx.services.files.stat(ctx.sandbox.id, path)
    except NotFound:
        pass
    else:
        raise ConnectError("already_exists", f"directory {path} already exists")
    info = await ctx.services.files.mkdir(ctx.sandbox.id, path, parents=True, mode=0o755)
    return pb.MakeDirResponse(entry=entry(info))


@rpc(SERVICE, "Move", "unary", pb.MoveRequest)
async def move(ctx: Envd, message: pb.MoveRequest) -> pb.MoveResponse:
    info = await ctx.services.files.move(
        ctx.sandbox.id, ctx.path(message.source), ctx.path(message.destination), overwrite=True
    )
    return pb.MoveResponse(entry=entry(info))


@rpc(SERVICE, "Remove", "unary", pb.RemoveRequest)
async def remove(ctx: Envd, message: pb.RemoveRequest) -> pb.RemoveResponse:
    try:
        await ctx.services.files.delete(ctx.sandbox.id, ctx.path(message.path), recursive=True)
    except Conflict as exc:
        raise ConnectError("failed_precondition", exc.message) from None
    return pb.RemoveResponse()


EVENT_TYPES = {
    "create": pb.EVENT_TYPE_CREATE,
    "write": pb.EVENT_TYPE_WRITE,
    "remove": pb.EVENT_TYPE_REMOVE,
    "rename": pb.EVENT_TYPE_RENAME,
    "chmod": pb.EVENT_TYPE_CHMOD,
}


def _event(raw: dict[str, Any]) -> pb.FilesystemEvent:
    return pb.FilesystemEvent(name=str(raw["name"]), type=EVENT_TYPES.get(str(raw.get("type")), 0))


@rpc(SERVICE, "WatchDir", "server_stream", pb.WatchDirRequest)
async def watch_dir(ctx: Envd, message: pb.WatchDirRequest) -> AsyncIterator[pb.WatchDirResponse]:
    watch = await ctx.services.files.watch(
        ctx.sandbox.id, ctx.path(message.path), recursive=message.recursive
    )
    events = watch.events()
    pending: asyncio.Future[dict[str, Any]] | None = None
    try:
        yield pb.WatchDirResponse(start=pb.WatchDirResponse.StartEvent())
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({pending}, timeout=ctx.keepalive())
            if not done:
                yield pb.WatchDirResponse(keepalive=pb.WatchDirResponse.KeepAlive())
                continue
            try:
                raw = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield pb.WatchDirResponse(filesystem=_event(raw))
    finally:
        if pending is not None:
            pending.cancel()
        await watch.abort()


@dataclass
class Watcher:
    """A watch the client polls (`CreateWatcher`, then `GetWatcherEvents`): it lives in the
    server that made it, until `RemoveWatcher`, its sandbox's end, or an hour unpolled."""

    sandbox_id: str
    watch: Watch
    events: list[pb.FilesystemEvent] = field(default_factory=list)
    polled: float = field(default_factory=time.monotonic)
    task: asyncio.Task[None] | None = None

    async def collect(self) -> None:
        async for raw in self.watch.events():
            if len(self.events) < MAX_PENDING_EVENTS:
                self.events.append(_event(raw))

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        await self.watch.abort()


def _watchers(ctx: Envd) -> dict[str, Watcher]:
    state = ctx.request.app.state
    if not hasattr(state, "e2b_watchers"):
        state.e2b_watchers = {}
    return state.e2b_watchers  # type: ignore[no-any-return]


async def _sweep(watchers: dict[str, Watcher]) -> None:
    now = time.monotonic()
    for key, watcher in list(watchers.items()):
        if now - watcher.polled > WATCHER_IDLE_SECONDS:
            del watchers[key]
            await watcher.stop()


def _watcher(ctx: Envd, watcher_id: str) -> Watcher:
    watcher = _watchers(ctx).get(watcher_id)
    if watcher is None or watcher.sandbox_id != ctx.sandbox.id:
        raise ConnectError("not_found", f"watcher {watcher_id!r} not found")
    return watcher


@rpc(SERVICE, "CreateWatcher", "unary", pb.CreateWatcherRequest)
async def create_watcher(ctx: Envd, message: pb.CreateWatcherRequest) -> pb.CreateWatcherResponse:
    watchers = _watchers(ctx)
    await _sweep(watchers)
    if len(watchers) >= MAX_WATCHERS:
        raise ConnectError("resource_exhausted", f"at most {MAX_WATCHERS} watchers per server")
    watch = await ctx.services.files.watch(
        ctx.sandbox.id, ctx.path(message.path), recursive=message.recursive
    )
    watcher = Watcher(ctx.sandbox.id, watch)
    watcher.task = asyncio.ensure_future(watcher.collect())
    watcher_id = "w_" + secrets.token_hex(8)
    watchers[watcher_id] = watcher
    return pb.CreateWatcherResponse(watcher_id=watcher_id)


@rpc(SERVICE, "GetWatcherEvents", "unary", pb.GetWatcherEventsRequest)
async def watcher_events(
    ctx: Envd, message: pb.GetWatcherEventsRequest
) -> pb.GetWatcherEventsResponse:
    watcher = _watcher(ctx, message.watcher_id)
    watcher.polled = time.monotonic()
    events, watcher.events = watcher.events, []
    return pb.GetWatcherEventsResponse(events=events)


@rpc(SERVICE, "RemoveWatcher", "unary", pb.RemoveWatcherRequest)
async def remove_watcher(ctx: Envd, message: pb.RemoveWatcherRequest) -> pb.RemoveWatcherResponse:
    watcher = _watcher(ctx, message.watcher_id)
    del _watchers(ctx)[message.watcher_id]
    await watcher.stop()
    return pb.RemoveWatcherResponse()
