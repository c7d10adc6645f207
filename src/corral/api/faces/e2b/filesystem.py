"""`filesystem.Filesystem` of the E2B daemon over Corral's file service (which works inside the
sandbox, as its user).

`Stat`, `ListDir` (to `depth` levels), `MakeDir` (with its parents; `already_exists` if it is
there, which the SDK reads as "not created"), `Move` (replacing a file at the destination, as
a rename does) and `Remove` (recursive). Directory watching (`WatchDir`, `CreateWatcher`,
`GetWatcherEvents`, `RemoveWatcher`) is answered `unimplemented`: Corral has no file events yet.
"""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator

from google.protobuf.timestamp_pb2 import Timestamp

from corral.api.faces.e2b.connect import ConnectError
from corral.api.faces.e2b.envd import Envd, rpc
from corral.api.faces.e2b.pb import filesystem_pb2 as pb
from corral.core.errors import Conflict, NotFound
from corral.core.models import FileInfo

SERVICE = "filesystem.Filesystem"
LIST_LIMIT = 100_000
MAX_DEPTH = 32
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


def _no_watch() -> ConnectError:
    return ConnectError("unimplemented", "directory watching is not available on this server")


@rpc(SERVICE, "WatchDir", "server_stream", pb.WatchDirRequest)
async def watch_dir(ctx: Envd, message: pb.WatchDirRequest) -> AsyncIterator[pb.WatchDirResponse]:
    raise _no_watch()
    yield pb.WatchDirResponse()  # pragma: no cover  (makes this a generator)


@rpc(SERVICE, "CreateWatcher", "unary", pb.CreateWatcherRequest)
async def create_watcher(ctx: Envd, message: pb.CreateWatcherRequest) -> pb.CreateWatcherResponse:
    raise _no_watch()


@rpc(SERVICE, "GetWatcherEvents", "unary", pb.GetWatcherEventsRequest)
async def watcher_events(
    ctx: Envd, message: pb.GetWatcherEventsRequest
) -> pb.GetWatcherEventsResponse:
    raise _no_watch()


@rpc(SERVICE, "RemoveWatcher", "unary", pb.RemoveWatcherRequest)
async def remove_watcher(ctx: Envd, message: pb.RemoveWatcherRequest) -> pb.RemoveWatcherResponse:
    raise _no_watch()
