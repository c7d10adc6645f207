"""The local ends of file transfers: a directory as a tar.gz stream and back, files in pieces.

Nothing is read whole into memory: archives are written and read by a worker thread through a
small bounded queue, so memory stays at a few MiB whatever the size of the transfer. Archives
from a sandbox are extracted with the same checks as uploads are in the sandbox (see
`corral.core.tools.archive`): nothing lands outside the destination.
"""

from __future__ import annotations

import asyncio
import io
import os
import queue
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from corral.client._exceptions import ArchiveError
from corral.core.tools import archive

CHUNK = 1 << 20
QUEUE_DEPTH = 8
POLL = 0.1
LOCAL_MAX_ENTRIES = 100_000_000
LOCAL_MAX_BYTES = 1 << 50

Source = bytes | str | IO[bytes] | Iterable[bytes]
_END = object()


class _Stopped(Exception):
    pass


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Pipe:
    """A bounded queue between a worker thread and its consumer, either side able to stop."""

    def __init__(self) -> None:
        self.queue: queue.Queue[object] = queue.Queue(QUEUE_DEPTH)
        self.stopped = threading.Event()

    def put(self, item: object) -> None:
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=POLL)
                return
            except queue.Full:
                continue
        raise _Stopped()

    def get(self) -> object:
        while True:
            try:
                return self.queue.get(timeout=POLL)
            except queue.Empty:
                if self.stopped.is_set():
                    return _END


def _run_producer(pipe: _Pipe, work: Callable[[Callable[[bytes], None]], Any]) -> threading.Thread:
    def target() -> None:
        try:
            work(pipe.put)
            pipe.put(_END)
        except _Stopped:
            pass
        except BaseException as exc:
            try:
                pipe.put(_Failure(exc))
            except _Stopped:
                pass

    thread = threading.Thread(target=target, name="corral-tar", daemon=True)
    thread.start()
    return thread


def _check_dir(local_dir: str | os.PathLike[str]) -> str:
    path = os.fspath(local_dir)
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{path} is not a directory")
    return path


def tar_chunks(local_dir: str | os.PathLike[str], level: int | None) -> Iterator[bytes]:
    """A local directory as a tar.gz stream, produced as it is read."""
    path = _check_dir(local_dir)
    pipe = _Pipe()
    thread = _run_producer(pipe, lambda put: archive.write_archive(path, put, level=level))
    try:
        while (item := pipe.get()) is not _END:
            if isinstance(item, _Failure):
                raise item.exc
            yield item  # type: ignore[misc]
    finally:
        pipe.stopped.set()
        thread.join()


async def atar_chunks(local_dir: str | os.PathLike[str], level: int | None) -> AsyncIterator[bytes]:
    path = _check_dir(local_dir)
    pipe = _Pipe()
    thread = _run_producer(pipe, lambda put: archive.write_archive(path, put, level=level))
    try:
        while (item := await asyncio.to_thread(pipe.get)) is not _END:
            if isinstance(item, _Failure):
                raise item.exc
            yield item  # type: ignore[misc]
    finally:
        pipe.stopped.set()
        await asyncio.to_thread(thread.join)


def source_chunks(source: Source) -> bytes | Iterator[bytes]:
    """A request body from bytes, text, a binary file or an iterable of bytes."""
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    if isinstance(source, str):
        return source.encode("utf-8")
    if hasattr(source, "read"):
        return _file_chunks(source)  # type: ignore[arg-type]
    return iter(source)  # type: ignore[arg-type]


def _file_chunks(f: IO[bytes]) -> Iterator[bytes]:
    while data := f.read(CHUNK):
        yield data


async def asource_chunks(source: Source) -> AsyncIterator[bytes]:
    if isinstance(source, bytes | bytearray | memoryview | str):
        data = source.encode("utf-8") if isinstance(source, str) else bytes(source)
        yield data
        return
    if hasattr(source, "read"):
        while data := await asyncio.to_thread(source.read, CHUNK):  # type: ignore[union-attr]
            yield data
        return
    for chunk in source:  # type: ignore[union-attr]
        yield chunk


def local_file_chunks(path: str | os.PathLike[str]) -> Iterator[bytes]:
    with open(path, "rb") as f:
        yield from _file_chunks(f)


async def alocal_file_chunks(path: str | os.PathLike[str]) -> AsyncIterator[bytes]:
    f = await asyncio.to_thread(open, path, "rb")
    try:
        while data := await asyncio.to_thread(f.read, CHUNK):
            yield data
    finally:
        f.close()


# --- downloads ---------------------------------------------------------------------------------


class _QueueReader(io.RawIOBase):
    """A file-like reader over chunks arriving through a pipe (for the extractor thread)."""

    def __init__(self, pipe: _Pipe) -> None:
        self._pipe = pipe
        self._buffer = b""
        self._ended = False

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        while not self._buffer and not self._ended:
            item = self._pipe.get()
            if item is _END:
                self._ended = True
            else:
                self._buffer = item  # type: ignore[assignment]
        n = min(len(target), len(self._buffer))
        target[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


class _IterReader(io.RawIOBase):
    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        while not self._buffer:
            try:
                self._buffer = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(target), len(self._buffer))
        target[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


def _extract_into(reader: io.RawIOBase, local_dir: str | os.PathLike[str]) -> dict[str, int]:
    destination = os.path.realpath(os.fspath(local_dir))
    try:
        fd = archive.open_destination(destination, create=True)
        try:
            return archive.extract(
                reader,  # type: ignore[arg-type]
                fd,
                max_entries=LOCAL_MAX_ENTRIES,
                max_bytes=LOCAL_MAX_BYTES,
            )
        finally:
            os.close(fd)
    except archive.ArchiveError as exc:
        raise ArchiveError(exc.message, code=exc.code) from None


def extract_chunks(chunks: Iterator[bytes], local_dir: str | os.PathLike[str]) -> dict[str, int]:
    """Extract a tar stream arriving in pieces into a local directory (created if missing)."""
    return _extract_into(_IterReader(chunks), local_dir)


async def aextract_chunks(
    chunks: AsyncIterator[bytes], local_dir: str | os.PathLike[str]
) -> dict[str, int]:
    pipe = _Pipe()

    def extract() -> dict[str, int]:
        try:
            return _extract_into(_QueueReader(pipe), local_dir)
        finally:
            pipe.stopped.set()  # a failed extractor must not leave the feeder waiting

    work = asyncio.ensure_future(asyncio.to_thread(extract))
    try:
        try:
            async for chunk in chunks:
                await asyncio.to_thread(pipe.put, chunk)
            await asyncio.to_thread(pipe.put, _END)
        except _Stopped:
            pass  # the extractor stopped early: it says why below
        return await work
    finally:
        pipe.stopped.set()
        if not work.done():
            await asyncio.wait({work})


class AtomicFile:
    """A local file written under a temporary name and renamed into place when complete."""

    def __init__(self, path: str | os.PathLike[str], mode: int | None = None) -> None:
        self.path = Path(path)
        self.mode = mode
        fd, temp = tempfile.mkstemp(dir=self.path.parent or ".", prefix=f".{self.path.name}.")
        self.temp = temp
        self.file = os.fdopen(fd, "wb")
        self.size = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.size += len(data)

    def commit(self) -> int:
        self.file.close()
        if self.mode is not None:
            os.chmod(self.temp, self.mode)
        os.replace(self.temp, self.path)
        return self.size

    def discard(self) -> None:
        self.file.close()
        Path(self.temp).unlink(missing_ok=True)
