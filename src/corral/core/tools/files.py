"""File operations inside a sandbox, as the sandbox's user: `python3 -I -S files.py OP JSON`.

Run by the node for the files API (never by host-root code walking sandbox paths). Answers:
  - metadata operations print one JSON object on stdout;
  - `read` and `archive` print one JSON line (the header), then the raw bytes;
  - `write` and `extract` read the bytes from stdin;
  - `watch` prints one JSON line (the header), then one JSON line per change in the directory
    (inotify), until it is stopped;
  - a failure prints `{"error": {"code", "message"}}` as the last line of stderr and exits 1
    (before any output on stdout whenever it can be known in advance).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
import stat
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# This directory, by design (-I leaves it off sys.path).
import archive

BUFFER = 1 << 20
LIST_LIMIT = 10_000
PATH_MAX = 4095  # bytes, without the NUL
MEMORY_LIMIT = 512 << 20  # address space of the extractor: bounds what a hostile header costs


class Fail(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


ERRNO_CODES = {
    errno.ENOENT: "not_found",
    errno.EEXIST: "exists",
    errno.ENOTEMPTY: "not_empty",
    errno.ENOTDIR: "not_a_directory",
    errno.EISDIR: "is_a_directory",
    errno.EACCES: "forbidden_path",
    errno.EPERM: "forbidden_path",
    errno.EROFS: "forbidden_path",
    errno.ENOSPC: "no_space",
    errno.EDQUOT: "no_space",
    errno.EFBIG: "too_large",
    errno.ENAMETOOLONG: "invalid_path",
    errno.ELOOP: "invalid_path",
    errno.EXDEV: "invalid_path",
    errno.EINVAL: "invalid_path",
    errno.EBUSY: "forbidden_path",
    errno.ENXIO: "not_a_file",  # a device with nothing behind it (/dev/tty without a terminal)
    errno.ENODEV: "not_a_file",
    errno.ETXTBSY: "busy",
    errno.EMLINK: "no_space",
    errno.EOVERFLOW: "too_large",
}


def _type(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "char_device"),
        (stat.S_ISBLK, "block_device"),
    ):
        if test(mode):
            return name
    return "other"


def info(path: str, st: os.stat_result | None = None) -> dict:
    st = st or os.lstat(path)
    result = {
        "path": path,
        "name": os.path.basename(path.rstrip("/")) or "/",
        "type": _type(st.st_mode),
        "size": st.st_size,
        "mode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "modified_at": st.st_mtime,
    }
    if stat.S_ISLNK(st.st_mode):
        try:
            result["link_target"] = os.readlink(path)
        except OSError:
            pass
    return result


def absolute(path: str) -> str:
    if not isinstance(path, str) or not path or "\x00" in path:
        raise Fail("invalid_path", "a path is required")
    full = os.path.normpath(os.path.join("/workspace", path))
    if len(full.encode("utf-8", "surrogateescape")) > PATH_MAX:
        raise Fail("invalid_path", f"the path is longer than {PATH_MAX} bytes")
    return full


def make_dirs(path: str, mode: int = 0o777) -> None:
    """`os.makedirs(path, mode, exist_ok=True)` without recursion: the depth of a path costs
    no stack."""
    missing = []
    head = path
    while not os.path.isdir(head):
        missing.append(head)
        parent = os.path.dirname(head)
        if parent == head:
            break
        head = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise


def _emit(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")))
    sys.stdout.flush()


def _header(obj: object) -> None:
    data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
    _write_all(1, data)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# --- metadata ----------------------------------------------------------------------------------


def op_stat(args: dict) -> None:
    path = absolute(args["path"])
    st = os.stat(path) if args.get("follow") else os.lstat(path)
    _emit(info(path, st))


def op_list(args: dict) -> None:
    path = absolute(args["path"])
    limit = int(args.get("limit") or LIST_LIMIT)
    if not os.path.isdir(path):
        os.lstat(path)  # not_found when missing
        raise Fail("not_a_directory", f"{path} is not a directory")
    entries = []
    truncated = False
    with os.scandir(path) as it:
        names = sorted(it, key=lambda e: e.name)
    for entry in names:
        if len(entries) >= limit:
            truncated = True
            break
        try:
            entries.append(info(entry.path, entry.stat(follow_symlinks=False)))
        except FileNotFoundError:
            continue
    _emit({"path": path, "entries": entries, "truncated": truncated})


def op_mkdir(args: dict) -> None:
    path = absolute(args["path"])
    mode = int(args.get("mode", 0o755)) & 0o7777
    if args.get("parents", True):
        make_dirs(path, mode)
        if not os.path.isdir(path):
            raise Fail("exists", f"{path} exists and is not a directory")
    else:
        os.mkdir(path, mode)
    _emit(info(path))


def op_move(args: dict) -> None:
    source = absolute(args["source"])
    destination = absolute(args["destination"])
    os.lstat(source)
    if source == "/" or destination == "/":
        raise Fail("invalid_path", "cannot move the root")
    if not args.get("overwrite") and os.path.lexists(destination):
        raise Fail("exists", f"{destination} exists (set overwrite to replace it)")
    os.rename(source, destination)
    _emit(info(destination))


def op_delete(args: dict) -> None:
    path = absolute(args["path"])
    if path in ("/", "/workspace", "/tmp"):
        raise Fail("forbidden_path", f"{path} cannot be deleted")
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        if args.get("recursive"):
            shutil.rmtree(path)  # descriptor-based on Linux: never follows symlinks
        else:
            os.rmdir(path)
    else:
        os.unlink(path)
    _emit({"path": path, "deleted": True})


# --- contents ----------------------------------------------------------------------------------


def _regular(path: str, st: os.stat_result) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise Fail("is_a_directory", f"{path} is a directory (download it as an archive)")
    if not stat.S_ISREG(st.st_mode):
        raise Fail("not_a_file", f"{path} is not a regular file")


def op_read(args: dict) -> None:
    path = absolute(args["path"])
    # A device or FIFO is never opened (opening one can block, fail or act); fstat below
    # covers a swap between the two.
    _regular(path, os.stat(path))
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        _regular(path, st)
        os.set_blocking(fd, True)
        size = st.st_size
        _header({"size": size, "info": info(path, st)})
        remaining = size
        while remaining > 0:
            data = os.read(fd, min(BUFFER, remaining))
            if not data:
                raise Fail("changed", f"{path} shrank while it was read")
            _write_all(1, data)
            remaining -= len(data)
    finally:
        os.close(fd)


def op_write(args: dict) -> None:
    path = absolute(args["path"])
    parent, name = os.path.split(path)
    if not name:
        raise Fail("invalid_path", "a file name is required")
    if args.get("parents", True):
        make_dirs(parent)
    if os.path.isdir(path) and not os.path.islink(path):
        raise Fail("is_a_directory", f"{path} is a directory")
    dir_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    temp = f".{name[:200]}.corral-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        mode = int(args["mode"]) & 0o777 if args.get("mode") is not None else None
        if mode is None:
            try:
                mode = stat.S_IMODE(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
            except FileNotFoundError:
                mode = 0o644
        fd = os.open(temp, archive.FILE_FLAGS, 0o600, dir_fd=dir_fd)
        try:
            size = 0
            while data := os.read(0, BUFFER):
                _write_all(fd, data)
                size += len(data)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        # Replaces what was there, a symlink included (never written through).
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(temp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    finally:
        os.close(dir_fd)
    _emit(info(path))


def op_extract(args: dict) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    destination = absolute(args["path"])
    try:
        fd = archive.open_destination(destination, create=True)
    except archive.ArchiveError as exc:
        raise Fail(exc.code, exc.message) from None
    try:
        stdin = os.fdopen(0, "rb", buffering=0, closefd=False)
        counts = archive.extract(
            stdin, fd, max_entries=int(args["max_entries"]), max_bytes=int(args["max_bytes"])
        )
    except archive.ArchiveError as exc:
        raise Fail(exc.code, exc.message) from None
    finally:
        os.close(fd)
    _emit({"path": destination, **counts})


def op_archive(args: dict) -> None:
    path = absolute(args["path"])
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise Fail("not_a_directory", f"{path} is not a directory (download it as a file)")
    os.listdir(path)  # unreadable: an error now rather than a broken stream later
    level = args.get("level", 1)
    _header({"path": path})
    archive.write_archive(path, lambda data: _write_all(1, data), level=level)


def op_take_result(args: dict) -> None:
    """A code run's result (written by its prelude in a private directory), then the directory
    removed."""
    directory = args["dir"]
    limit = int(args["max_bytes"])
    out: dict = {}
    try:
        for key, name in (("value", "value.json"), ("error", "error.json"), ("error", "error.txt")):
            try:
                with open(os.path.join(directory, name), "rb") as f:
                    data = f.read(limit + 1)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if len(data) > limit:
                out["error"] = {"message": f"the {key} is larger than {limit} bytes"}
                continue
            text = data.decode("utf-8", "replace")
            if name == "error.txt":
                out.setdefault("error", {"name": None, "message": text.strip()})
                continue
            try:
                value = json.loads(text)
            except ValueError as exc:
                out["error"] = {"name": "ResultError", "message": f"the {key} is not JSON: {exc}"}
                continue
            if key == "value":
                out["has_value"] = True
                out["value"] = value
            elif isinstance(value, dict):
                out.setdefault("error", value)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    _emit(out)


# inotify(7): the events `watch` reports, and what each is called.
IN_MODIFY, IN_ATTRIB = 0x2, 0x4
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_Q_OVERFLOW, IN_IGNORED, IN_ISDIR = 0x4000, 0x8000, 0x40000000
WATCH_MASK = IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
WATCH_EVENTS = (
    (IN_CREATE | IN_MOVED_TO, "create"),
    (IN_MODIFY, "write"),
    (IN_DELETE, "remove"),
    (IN_MOVED_FROM, "rename"),
    (IN_ATTRIB, "chmod"),
)
MAX_WATCHES = 8192


def op_watch(args: dict) -> None:
    """Changes in a directory (and with `recursive` its subdirectories, as they come), as
    `{"name": <path relative to it>, "type": create|write|remove|rename|chmod}` lines."""
    import ctypes
    import struct

    root = absolute(args["path"])
    if not stat.S_ISDIR(os.stat(root).st_mode):
        raise Fail("not_a_directory", f"{root} is not a directory")
    recursive = bool(args.get("recursive"))
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1")
    watched: dict[int, str] = {}

    def add(directory: str) -> None:
        if len(watched) >= MAX_WATCHES:
            return
        wd = libc.inotify_add_watch(fd, os.fsencode(directory), WATCH_MASK)
        if wd < 0:
            if directory == root:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), directory)
            return  # gone again, or not ours to read: its changes are not reported
        watched[wd] = directory
        if recursive:
            with contextlib.suppress(OSError), os.scandir(directory) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        add(entry.path)

    add(root)
    _header({"path": root})
    header = struct.Struct("iIII")
    while True:
        data = os.read(fd, 1 << 16)
        at = 0
        while at + header.size <= len(data):
            wd, mask, _cookie, length = header.unpack_from(data, at)
            name = data[at + header.size : at + header.size + length].split(b"\0", 1)[0]
            at += header.size + length
            if mask & IN_Q_OVERFLOW:
                _header({"overflow": True})
                continue
            if mask & IN_IGNORED:
                watched.pop(wd, None)
                continue
            directory = watched.get(wd)
            if directory is None or not name:
                continue
            path = os.path.join(directory, os.fsdecode(name))
            if recursive and mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
                add(path)
            for bit, kind in WATCH_EVENTS:
                if mask & bit:
                    _header({"name": os.path.relpath(path, root), "type": kind})


OPS = {
    "stat": op_stat,
    "list": op_list,
    "mkdir": op_mkdir,
    "move": op_move,
    "delete": op_delete,
    "read": op_read,
    "write": op_write,
    "extract": op_extract,
    "archive": op_archive,
    "take_result": op_take_result,
    "watch": op_watch,
}


def main() -> int:
    try:
        op = OPS[sys.argv[1]]
        args = json.loads(sys.argv[2])
    except (IndexError, KeyError, ValueError):
        return _fail("bad_request", "usage: files.py OP JSON")
    try:
        op(args)
    except Fail as exc:
        return _fail(exc.code, exc.message)
    except archive.ArchiveError as exc:
        return _fail(exc.code, exc.message)
    except BrokenPipeError:
        return _fail("aborted", "the reader went away")
    except OSError as exc:
        where = exc.filename if exc.filename is not None else args.get("path", "")
        text = f"{where}: {exc.strerror}" if where else str(exc.strerror or exc)
        return _fail(ERRNO_CODES.get(exc.errno or 0, "io_error"), text)
    except MemoryError:
        return _fail("bad_archive", "out of memory: an entry's header is too large")
    except RecursionError:
        return _fail("too_deep", "the directory tree is nested too deeply")
    return 0


def _fail(code: str, message: str) -> int:
    sys.stderr.write("\n" + json.dumps({"error": {"code": code, "message": message}}) + "\n")
    sys.stderr.flush()
    return 1


if __name__ == "__main__":
    sys.exit(main())
