"""Tar archives in and out, safely and as streams (stdlib only, Python >= 3.11).

Extraction trusts nothing in the archive. Every entry is checked before anything is written:
  - names: no absolute paths, no `..`, bounded length;
  - regular files, directories, symlinks and hardlinks only (no devices, FIFOs or sockets);
  - symlinks only to a relative target that stays inside the destination: leading `..` only,
    then plain names (so that no `..` is resolved after a symlink);
  - hardlinks only to a regular file extracted earlier from the same archive;
  - at most `max_entries` entries and `max_bytes` bytes of file data (checked before writing).
Every write is done relative to a directory descriptor the extractor opened itself, component by
component with O_NOFOLLOW, so no symlink (from the archive or planted in the destination) is ever
followed: an entry that would pass through one is refused. Files are created with O_EXCL after
removing what was there (a file or a symlink is replaced, never written through). Modes keep the
permission bits only (no setuid, setgid or sticky); owners are not restored.

`tarfile`'s own `extractall` is not used: its `data` filter has been bypassed (CVE-2025-4517).
"""

from __future__ import annotations

import collections
import errno
import os
import stat
import sys
import tarfile
import zlib
from collections.abc import Callable
from typing import Any, BinaryIO

BUFFER = 1 << 20
MAX_NAME = 255
MAX_PATH = 4096
MAX_DIR_FDS = 64
TRAILER_LIMIT = 64 << 20  # bytes read after the end-of-archive marker (must all be zero)
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class ArchiveError(Exception):
    code = "bad_archive"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadArchive(ArchiveError):
    """Not a readable tar archive (or a damaged one)."""


class UnsafeArchive(ArchiveError):
    """An entry that could write outside the destination, or of a refused type."""

    code = "unsafe_archive"


class ArchiveTooLarge(ArchiveError):
    """Over the limit of entries or of uncompressed bytes."""

    code = "too_large"


class ArchiveConflict(ArchiveError):
    """An entry clashes with what the destination holds (a file where a directory is, ...)."""

    code = "conflict"


# --- names -------------------------------------------------------------------------------------


def entry_parts(name: str) -> tuple[str, ...]:
    """An archive name as path components below the destination; refuses escapes."""
    if "\x00" in name:
        raise UnsafeArchive(f"entry {name!r}: NUL byte in its name")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_PATH:
        raise UnsafeArchive(f"entry {name[:100]!r}...: name longer than {MAX_PATH} bytes")
    if name.startswith("/"):
        raise UnsafeArchive(f"entry {name!r}: absolute path")
    parts = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise UnsafeArchive(f"entry {name!r}: '..' in its path")
        if len(part.encode("utf-8", "surrogateescape")) > MAX_NAME:
            raise UnsafeArchive(f"entry {name[:100]!r}: a name longer than {MAX_NAME} bytes")
        parts.append(part)
    return tuple(parts)


def check_symlink_target(parts: tuple[str, ...], target: str) -> None:
    """Refuse a symlink whose target is absolute or could resolve outside the destination."""
    where = "/".join(parts)
    if not target or "\x00" in target:
        raise UnsafeArchive(f"symlink {where!r}: empty or invalid target")
    if target.startswith("/"):
        raise UnsafeArchive(f"symlink {where!r} points to an absolute path ({target!r})")
    depth = len(parts) - 1  # the directory holding the link, below the destination
    seen_name = False
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if seen_name:
                # `a/..` resolves `..` from wherever `a` leads, which may be another symlink.
                raise UnsafeArchive(f"symlink {where!r}: '..' after a name in {target!r}")
            depth -= 1
            if depth < 0:
                raise UnsafeArchive(f"symlink {where!r} points outside the destination")
        else:
            seen_name = True


# --- extraction --------------------------------------------------------------------------------


class _Walker:
    """Directory descriptors below a root, each opened by us with O_NOFOLLOW (a small cache)."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self._fds: collections.OrderedDict[tuple[str, ...], int] = collections.OrderedDict()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _remember(self, parts: tuple[str, ...], fd: int) -> None:
        self._fds[parts] = fd
        while len(self._fds) > MAX_DIR_FDS:
            _, old = self._fds.popitem(last=False)
            os.close(old)

    def directory(self, parts: tuple[str, ...], *, create: bool) -> int:
        """The descriptor of the directory at `parts` (borrowed: do not close it)."""
        if not parts:
            return self.root_fd
        fd = self._fds.get(parts)
        if fd is not None:
            self._fds.move_to_end(parts)
            return fd
        # Start from the longest prefix already open.
        start = len(parts) - 1
        while start > 0 and parts[:start] not in self._fds:
            start -= 1
        parent = self._fds[parts[:start]] if start else self.root_fd
        for i in range(start, len(parts)):
            fd = self._open_child(parent, parts[: i + 1], create)
            self._remember(parts[: i + 1], fd)
            parent = fd
        return parent

    def _open_child(self, parent: int, parts: tuple[str, ...], create: bool) -> int:
        name = parts[-1]
        try:
            return os.open(name, DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                self._refuse_non_directory(parent, parts)
            raise
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
        except FileExistsError:
            pass  # created meanwhile: opened (and checked) below
        try:
            return os.open(name, DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                self._refuse_non_directory(parent, parts)
            raise

    @staticmethod
    def _refuse_non_directory(parent: int, parts: tuple[str, ...]) -> None:
        where = "/".join(parts)
        st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeArchive(f"{where!r} is a symlink: entries may not pass through one")
        raise ArchiveConflict(f"{where!r} exists and is not a directory")


class Extractor:
    def __init__(self, root_fd: int, *, max_entries: int, max_bytes: int) -> None:
        self.walker = _Walker(root_fd)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.entries = 0
        self.bytes = 0
        self._files: set[tuple[str, ...]] = set()  # regular files written by this extraction
        self._dirs: list[tuple[tuple[str, ...], int, float]] = []  # modes and times, set last

    def extract(self, fileobj: BinaryIO) -> dict[str, int]:
        try:
            archive = tarfile.open(fileobj=fileobj, mode="r|*", bufsize=BUFFER)
        except (tarfile.TarError, EOFError, zlib.error, OSError, ValueError) as exc:
            raise BadArchive(f"not a tar archive (plain, gzip, bzip2 or xz): {exc}") from None
        try:
            while True:
                try:
                    member = archive.next()
                except MemoryError:
                    raise BadArchive("an entry's header is too large") from None
                except (tarfile.TarError, EOFError, zlib.error, OSError, ValueError) as exc:
                    raise BadArchive(
                        f"damaged archive after {self.entries} entries: {exc}"
                    ) from None
                if member is None:
                    break
                archive.members = []  # a stream: keep no list of every entry seen
                self._add(archive, member)
            self._check_trailer(archive)
            self._finish_dirs()
        finally:
            self.walker.close()
        return {"entries": self.entries, "bytes": self.bytes}

    def _check_trailer(self, archive: tarfile.TarFile) -> None:
        """After the end-of-archive marker only zeros may follow, and the compressed stream must
        be complete: otherwise the archive was truncated or damaged mid-way."""
        stream: Any = archive.fileobj
        seen = 0
        try:
            while chunk := stream.read(BUFFER):
                seen += len(chunk)
                if chunk.count(0) != len(chunk):
                    raise BadArchive("damaged archive: an invalid header or data after its end")
                if seen > TRAILER_LIMIT:
                    raise BadArchive("damaged archive: too much data after its end")
        except (tarfile.TarError, EOFError, zlib.error, OSError, ValueError) as exc:
            raise BadArchive(f"damaged archive: {exc}") from None
        decompressor = getattr(stream, "cmp", None)
        if decompressor is not None and getattr(decompressor, "eof", True) is False:
            raise BadArchive("truncated archive: the compressed stream ends early")

    def _add(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        self.entries += 1
        if self.entries > self.max_entries:
            raise ArchiveTooLarge(f"more than {self.max_entries} entries")
        parts = entry_parts(member.name)
        if not parts:
            if member.isdir():
                return  # the destination itself (`.`): left as it is
            raise UnsafeArchive(f"entry {member.name!r} has no name")
        if member.isdir():
            self.walker.directory(parts, create=True)
            self._files.discard(parts)
            self._dirs.append((parts, member.mode & 0o777, member.mtime))
        elif member.isreg():
            self._write_file(archive, member, parts)
        elif member.issym():
            check_symlink_target(parts, member.linkname)
            parent = self._replaceable(parts)
            os.symlink(member.linkname, parts[-1], dir_fd=parent)
            self._files.discard(parts)
            _set_times(parts[-1], parent, member.mtime)
        elif member.islnk():
            target = entry_parts(member.linkname)
            if target not in self._files:
                raise UnsafeArchive(
                    f"hardlink {member.name!r} to {member.linkname!r}: only links to a file "
                    "extracted earlier from the same archive are accepted"
                )
            source_dir = self.walker.directory(target[:-1], create=False)
            parent = self._replaceable(parts)
            os.link(
                target[-1],
                parts[-1],
                src_dir_fd=source_dir,
                dst_dir_fd=parent,
                follow_symlinks=False,
            )
            self._files.add(parts)
        else:
            kind = (
                "a device"
                if member.ischr() or member.isblk()
                else "a FIFO"
                if member.isfifo()
                else f"of type {member.type!r}"
            )
            raise UnsafeArchive(f"entry {member.name!r} is {kind}: not accepted")

    def _replaceable(self, parts: tuple[str, ...]) -> int:
        """The parent's descriptor, with any file or symlink at the name removed."""
        parent = self.walker.directory(parts[:-1], create=True)
        try:
            st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return parent
        if stat.S_ISDIR(st.st_mode):
            raise ArchiveConflict(f"{'/'.join(parts)!r} exists as a directory")
        os.unlink(parts[-1], dir_fd=parent)
        return parent

    def _write_file(
        self, archive: tarfile.TarFile, member: tarfile.TarInfo, parts: tuple[str, ...]
    ) -> None:
        if self.bytes + member.size > self.max_bytes:
            raise ArchiveTooLarge(f"more than {self.max_bytes} bytes once uncompressed")
        self.bytes += member.size
        parent = self.walker.directory(parts[:-1], create=True)
        # Written under a temporary name, renamed into place once complete: a damaged archive
        # never leaves a partial file under a real name, and the rename replaces a file or a
        # symlink there without following it.
        temp = f".{parts[-1][:200]}.corral-{os.getpid()}-{os.urandom(4).hex()}"
        fd = os.open(temp, FILE_FLAGS, 0o600, dir_fd=parent)
        try:
            try:
                source = archive.extractfile(member)
                remaining = member.size
                while remaining > 0:
                    try:
                        data = source.read(min(BUFFER, remaining)) if source else b""
                    except (tarfile.TarError, EOFError, zlib.error, OSError, ValueError) as exc:
                        raise BadArchive(f"damaged archive in {member.name!r}: {exc}") from None
                    if not data:
                        raise BadArchive(f"truncated archive: {member.name!r} is incomplete")
                    _write_all(fd, data)
                    remaining -= len(data)
                os.fchmod(fd, member.mode & 0o777)
                os.utime(fd, (member.mtime, member.mtime))
            finally:
                os.close(fd)
            self._check_replaceable(parent, parts)
            os.rename(temp, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
        except BaseException:
            try:
                os.unlink(temp, dir_fd=parent)
            except OSError:
                pass
            raise
        self._files.add(parts)

    @staticmethod
    def _check_replaceable(parent: int, parts: tuple[str, ...]) -> None:
        try:
            st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise ArchiveConflict(f"{'/'.join(parts)!r} exists as a directory")

    def _finish_dirs(self) -> None:
        # Deepest first, so that a read-only directory does not stop the ones below it.
        for parts, mode, mtime in reversed(self._dirs):
            try:
                fd = self.walker.directory(parts, create=False)
            except (OSError, ArchiveError):
                continue  # replaced by a later entry
            os.fchmod(fd, mode | 0o700 if mode & 0o200 else mode)
            try:
                os.utime(fd, (mtime, mtime))
            except OSError:
                pass


def extract(
    fileobj: BinaryIO, destination_fd: int, *, max_entries: int, max_bytes: int
) -> dict[str, int]:
    """Extract a tar stream (plain, gzip, bzip2 or xz) below the directory `destination_fd`."""
    return Extractor(destination_fd, max_entries=max_entries, max_bytes=max_bytes).extract(fileobj)


def open_destination(path: str, *, create: bool) -> int:
    """A descriptor of the directory `path`, walked from `/` without following any symlink.

    Missing directories are created (with `create`). A symlink anywhere on the way is refused: an
    archive is extracted exactly where it was asked to be, never where a link leads.
    """
    if not path.startswith("/"):
        raise ValueError("the destination must be an absolute path")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"destination {path!r}: '..' in the path")
    fd = os.open("/", DIR_FLAGS)
    try:
        done: list[str] = []
        for name in parts:
            done.append(name)
            try:
                child = os.open(name, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(name, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                child = _open_checked(fd, name, done)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    child = _open_checked(fd, name, done)
                else:
                    raise
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


def _open_checked(parent: int, name: str, done: list[str]) -> int:
    try:
        return os.open(name, DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        where = "/" + "/".join(done)
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeArchive(
                f"destination {where!r} is a symlink; give the directory's real path"
            ) from None
        raise ArchiveConflict(f"destination {where!r} exists and is not a directory") from None


def _set_times(name: str, dir_fd: int, mtime: float) -> None:
    try:
        os.utime(name, (mtime, mtime), dir_fd=dir_fd, follow_symlinks=False)
    except (OSError, NotImplementedError):
        pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# --- creation ----------------------------------------------------------------------------------


class GzipWriter:
    """A file-like sink that gzips what is written to it and hands it on in large pieces."""

    def __init__(self, write: Callable[[bytes], Any], level: int = 1) -> None:
        self._write = write
        self._compressor = zlib.compressobj(level, zlib.DEFLATED, 31)
        self._buffer = bytearray()

    def write(self, data: bytes) -> int:
        out = self._compressor.compress(data)
        if out:
            self._buffer += out
            if len(self._buffer) >= BUFFER:
                self._write(bytes(self._buffer))
                self._buffer.clear()
        return len(data)

    def close(self) -> None:
        self._buffer += self._compressor.flush()
        self._write(bytes(self._buffer))
        self._buffer.clear()


class _Sink:
    """Uncompressed: large pieces, straight on."""

    def __init__(self, write: Callable[[bytes], Any]) -> None:
        self._write = write
        self._buffer = bytearray()

    def write(self, data: bytes) -> int:
        self._buffer += data
        if len(self._buffer) >= BUFFER:
            self._write(bytes(self._buffer))
            self._buffer.clear()
        return len(data)

    def close(self) -> None:
        if self._buffer:
            self._write(bytes(self._buffer))
        self._buffer.clear()


def write_archive(
    root: str, write: Callable[[bytes], Any], *, level: int | None = 1, name: str = ""
) -> dict[str, int]:
    """Write the tree at `root` as a tar stream (gzip at `level`, or plain with None) to `write`.

    With `root` a directory, entries are its contents, relative to it (prefixed with `name/`
    when given); with a file, the one entry `name` (default: its base name). Symlinks are stored
    as symlinks, never followed below `root`; hardlinks as hardlinks; sockets are skipped. As
    tar does, what the sandbox user may not read (or what vanishes while the tree is walked) is
    left out, and counted as `skipped`, rather than breaking the stream half-way.
    """
    sink: GzipWriter | _Sink = GzipWriter(write, level) if level is not None else _Sink(write)
    archive = tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT, bufsize=BUFFER)  # type: ignore[call-overload]
    archive.copybufsize = BUFFER
    counts = {"entries": 0, "bytes": 0, "skipped": 0}

    def add(path: str, arcname: str) -> None:
        try:
            info = archive.gettarinfo(path, arcname)
            if info is None:
                return  # a socket: nothing to store
            if info.isreg():
                with open(path, "rb") as f:
                    archive.addfile(info, f)
                counts["bytes"] += info.size
            else:
                archive.addfile(info)
        except (PermissionError, FileNotFoundError) as exc:
            # Nothing was written for it yet (the open comes before the header).
            counts["skipped"] += 1
            print(f"skipped {arcname}: {exc.strerror}", file=sys.stderr)
            return
        counts["entries"] += 1

    if os.path.isdir(root):
        prefix = name.strip("/")

        def fail(exc: OSError) -> None:
            if isinstance(exc, PermissionError | FileNotFoundError):
                counts["skipped"] += 1  # a directory it may not list: left out with its contents
                return
            raise exc

        for top, dirs, files in os.walk(root, onerror=fail):
            dirs.sort()
            relative = os.path.relpath(top, root)
            base = "" if relative == "." else relative
            if base:
                add(top, _join(prefix, base))
            elif prefix:
                add(top, prefix)
            for entry in sorted(files):
                add(os.path.join(top, entry), _join(prefix, base, entry))
            # os.walk lists symlinks to directories among dirs: store them as links.
            for entry in [d for d in dirs if os.path.islink(os.path.join(top, d))]:
                add(os.path.join(top, entry), _join(prefix, base, entry))
                dirs.remove(entry)
    else:
        add(root, name or os.path.basename(root.rstrip("/")))
    archive.close()
    sink.close()
    return counts


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)
