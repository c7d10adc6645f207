"""Unpacking one OCI layer tarball into a directory that overlayfs can stack as a lower dir.

Written here rather than left to a tool because it is the security-critical step: a layer is
untrusted input that the node, as root, writes to its own disk. The rules:

- Every name is checked before anything is written: an absolute name or a `..` component
  refuses the whole layer (no tool that builds images writes either), as do names longer than
  NAME_MAX per component or the path limit overall.
- Parents are reached one component at a time from a descriptor of the layer's root, with
  O_NOFOLLOW|O_DIRECTORY: a symlink met on the way (`l -> /` then `l/etc/x`) refuses the layer,
  whatever it points to. Nothing is ever written through a path string that the kernel could
  resolve through a symlink.
- Symlinks are created as they are (their target is never looked at nor followed).
- A hard link must name a file already in this layer, reached the same way; a target outside
  the root, through a symlink, a directory or a whiteout refuses the layer.
- Character and block devices and FIFOs are skipped and counted (a sandbox has no use for them
  and a device node is a way out); so are other special entries. Extended attributes in the tar
  are not applied (counted): `trusted.overlay.*` ones would forge whiteouts, and file
  capabilities are left out on purpose.
- setuid/setgid bits are kept. The file belongs to the image's uid (root, for sudo); inside a
  sandbox the user namespace maps that to the sandbox's own unprivileged host uid, so a setuid
  binary gives at most the sandbox's root, which is what `sudo` in an image is for. On the host
  the layer dirs sit under the store's 0700 root-owned directory, so no host user can run them,
  and the kernel ignores setuid for owners unmapped in a caller's namespace.
- Ownership: when the node runs as root (it does in production) the image's own uid/gid are
  applied with fchown/lchown. The layer keeps the image's ids so that one copy serves every
  sandbox; the writable root maps them per sandbox (an idmapped mount of the lower dirs, or a
  user namespace that maps the image's id range). The highest ids seen are in the stats, so the
  mapping can be sized.
- Limits: bytes of file content (after decompression, counted while streaming, so a gzip bomb
  stops at the limit), entries, and name lengths, each with a clear error.

Whiteouts are written in overlayfs' own format, so the layer dirs stack directly as lower dirs:
`.wh.NAME` becomes a character device 0/0 named NAME, and `.wh..wh..opq` sets the
`trusted.overlay.opaque=y` xattr on its directory. Both need root (mknod, trusted.* xattrs).

`unpack_layer` creates `dest` and, on any failure, removes it: nothing half-made is left.
"""

from __future__ import annotations

import contextlib
import errno
import io
import math
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from corral.runtime.images.errors import (
    HostileLayerError,
    ImageStoreFullError,
    LayerError,
    LayerLimitError,
    UnsupportedImageError,
)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
NAME_MAX = 255
CHUNK = 1 << 20

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

GiB = 1 << 30


@dataclass(frozen=True)
class UnpackLimits:
    """Per-layer and per-image limits on what unpacking may write."""

    max_layer_bytes: int = 16 * GiB  # file content of one layer, decompressed
    max_image_bytes: int = 32 * GiB  # the sum over an image's layers
    max_entries: int = 1_000_000  # tar entries in one layer
    max_path_bytes: int = 4096  # PATH_MAX, for entry names and symlink targets


@dataclass
class LayerStats:
    """What one layer's unpacking wrote and skipped."""

    entries: int = 0
    bytes: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    whiteouts: int = 0
    opaque_dirs: int = 0
    skipped_devices: int = 0  # character/block devices, FIFOs, other special entries
    skipped_xattrs: int = 0
    max_uid: int = 0
    max_gid: int = 0
    owners_applied: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LayerStats:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


MAX_HEADER_BYTES = 1 << 20  # one pax or GNU long-name header: tarfile reads it into memory
MAX_ID = 2**32 - 2  # the largest uid/gid (2**32 - 1 is "no change" to chown)
MAX_MTIME = 2**34  # seconds: far enough past 2038, small enough for every file system


class _BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses header blocks too big to read into memory (a layer could declare
    a pax header of many gigabytes). `_proc_member` is tarfile's documented extension point."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        headers = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                   tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)  # fmt: skip
        if self.type in headers and self.size > MAX_HEADER_BYTES:
            raise LayerLimitError(
                f"a tar header block of {self.size} bytes (limit {MAX_HEADER_BYTES})"
            )
        return super()._proc_member(tarfile_)  # type: ignore[misc]


class _Prefixed(io.RawIOBase):
    """A stream with the bytes already read from its head put back in front."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b)
        if self._head:
            n = min(len(view), len(self._head))
            view[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._rest.read(len(view))
        view[: len(data)] = data
        return len(data)


def unpack_layer(
    source: Path | IO[bytes],
    dest: Path,
    *,
    limits: UnpackLimits | None = None,
    lowers: Sequence[Path] = (),
) -> LayerStats:
    """Unpack one layer (a tar, optionally gzip/bzip2/xz compressed) into `dest`, which must
    not exist yet; returns what was written. On any error `dest` is removed and a LayerError
    (HostileLayerError, LayerLimitError) or UnsupportedImageError is raised.

    `lowers` are the unpacked layers below this one, top-most first: a parent directory the
    layer does not list (`usr/bin/x` with no `usr/` entry) takes its mode and owner from there,
    as it would in a merged tree; without one it is 0755 root's. In an overlay the upper-most
    copy of a directory gives the merged one its mode, so a default 0700 would hide it."""
    limits = limits or UnpackLimits()
    dest.mkdir(mode=0o755)
    try:
        with contextlib.ExitStack() as stack:
            if isinstance(source, Path):
                stream: IO[bytes] = stack.enter_context(source.open("rb"))
            else:
                stream = source
            head = stream.read(6)
            if head.startswith(_ZSTD_MAGIC):
                raise UnsupportedImageError("zstd-compressed layers are not supported")
            reader = io.BufferedReader(_Prefixed(head, stream), CHUNK)
            root_fd = os.open(dest, _DIR_FLAGS)
            stack.callback(os.close, root_fd)
            return _Unpacker(root_fd, limits, lowers).run(reader)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _mtime(value: float) -> int:
    """A tar mtime as whole seconds in range (pax gives floats, and anything: inf, nan)."""
    if not math.isfinite(value):
        return 0
    return min(max(int(value), 0), MAX_MTIME)


def _split(name: str, limits: UnpackLimits, what: str = "entry") -> tuple[str, ...]:
    if len(os.fsencode(name)) > limits.max_path_bytes:
        raise LayerLimitError(f"{what} name longer than {limits.max_path_bytes} bytes")
    if name.startswith("/"):
        raise HostileLayerError(f"{what} {name!r} is an absolute path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise HostileLayerError(f"{what} {name!r} has a '..' component")
    for part in parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise LayerLimitError(
                f"{what} {name[:64]!r}...: a component longer than {NAME_MAX} bytes"
            )
    return parts


class _Unpacker:
    def __init__(self, root_fd: int, limits: UnpackLimits, lowers: Sequence[Path]) -> None:
        self.root_fd = root_fd
        self.limits = limits
        self.lowers = list(lowers)
        self.implicit: set[tuple[str, ...]] = set()
        self.stats = LayerStats(owners_applied=os.geteuid() == 0)
        self.dirs: dict[tuple[str, ...], tarfile.TarInfo] = {}
        self._cached: tuple[tuple[str, ...], int] | None = None

    # -- walking without following symlinks ---------------------------------------------------

    def _drop_cache(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    def _open_dir(self, parts: tuple[str, ...], *, create: bool, name: str) -> int:
        """A new descriptor of the directory `parts` under the root, reached without following
        any symlink; missing directories are made (0700 until their own entry sets the mode)
        when `create`. The caller closes it."""
        if self._cached is not None and self._cached[0] == parts:
            return os.dup(self._cached[1])
        fd = os.dup(self.root_fd)
        try:
            for i, part in enumerate(parts):
                try:
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise LayerError(
                            f"{name!r}: {'/'.join(parts[: i + 1])} is not in this layer"
                        ) from None
                    os.mkdir(part, 0o700, dir_fd=fd)
                    self.implicit.add(parts[: i + 1])
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    where = "/".join(parts[: i + 1])
                    # O_DIRECTORY|O_NOFOLLOW on a symlink fails with ENOTDIR or ELOOP: look.
                    if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                        raise HostileLayerError(
                            f"{name!r} goes through the symlink {where!r}"
                        ) from None
                    raise LayerError(f"{name!r}: {where!r} is not a directory") from None
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        self._drop_cache()
        self._cached = (parts, os.dup(fd))
        return fd

    def _clear(self, parent: int, name: str, *, keep_dir: bool) -> bool:
        """Remove what is at `name` (never following it); True if a directory was kept."""
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            self._drop_cache()
            shutil.rmtree(name, dir_fd=parent)  # the fd-based walk: it never follows symlinks
        else:
            os.unlink(name, dir_fd=parent)
        return False

    # -- entries ------------------------------------------------------------------------------

    def run(self, reader: IO[bytes]) -> LayerStats:
        try:
            with tarfile.open(fileobj=reader, mode="r|*", tarinfo=_BoundedTarInfo) as tar:
                for member in tar:
                    self.stats.entries += 1
                    if self.stats.entries > self.limits.max_entries:
                        raise LayerLimitError(
                            f"more than {self.limits.max_entries} entries in a layer"
                        )
                    try:
                        self._entry(tar, member)
                    except OSError as e:
                        if e.errno in (errno.ENOSPC, errno.EDQUOT):
                            raise ImageStoreFullError(
                                "the node's image store is out of space"
                            ) from None
                        raise LayerError(f"{member.name!r}: {e.strerror or e}") from None
                    except ValueError:  # a NUL byte in a name, from a pax header
                        raise HostileLayerError(
                            f"{member.name!r}: a name with a NUL byte"
                        ) from None
                self._finish_dirs()
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise LayerError(f"not a readable tar layer: {e}") from None
        except RecursionError:  # tarfile follows chained pax headers recursively
            raise LayerError("not a readable tar layer: too many chained headers") from None
        finally:
            self._drop_cache()
        return self.stats

    def _entry(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = _split(m.name, self.limits)
        if m.pax_headers and any(k.startswith("SCHILY.xattr.") for k in m.pax_headers):
            self.stats.skipped_xattrs += sum(k.startswith("SCHILY.xattr.") for k in m.pax_headers)
        if not parts:  # the layer's root itself
            if m.isdir() and 0 <= m.uid <= MAX_ID and 0 <= m.gid <= MAX_ID:
                m.mtime = _mtime(m.mtime)
                self.dirs[()] = m
            return
        base = parts[-1]
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parts, m.name)
            return
        if (
            m.ischr()
            or m.isblk()
            or m.isfifo()
            or not (m.isreg() or m.isdir() or m.issym() or m.islnk())
        ):
            self.stats.skipped_devices += 1
            return
        if not (0 <= m.uid <= MAX_ID and 0 <= m.gid <= MAX_ID):
            raise LayerError(f"{m.name!r}: uid/gid out of range")
        m.mtime = _mtime(m.mtime)
        self.stats.max_uid = max(self.stats.max_uid, m.uid)
        self.stats.max_gid = max(self.stats.max_gid, m.gid)
        parent = self._open_dir(parts[:-1], create=True, name=m.name)
        try:
            if m.isdir():
                if not self._clear(parent, base, keep_dir=True):
                    os.mkdir(base, 0o700, dir_fd=parent)
                self.dirs[parts] = m
                self.stats.dirs += 1
            elif m.isreg():
                self._file(tar, m, parent, base)
            elif m.issym():
                self._symlink(m, parent, base)
            else:
                self._hardlink(m, parts, parent, base)
        finally:
            os.close(parent)

    def _file(self, tar: tarfile.TarFile, m: tarfile.TarInfo, parent: int, base: str) -> None:
        if self.stats.bytes + m.size > self.limits.max_layer_bytes:
            raise LayerLimitError(
                f"layer content over the limit of {self.limits.max_layer_bytes} bytes"
            )
        self._clear(parent, base, keep_dir=False)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(base, flags, 0o600, dir_fd=parent)
        try:
            data = tar.extractfile(m)
            if data is not None:
                while chunk := data.read(CHUNK):
                    self.stats.bytes += len(chunk)
                    if self.stats.bytes > self.limits.max_layer_bytes:
                        raise LayerLimitError(
                            f"layer content over the limit of {self.limits.max_layer_bytes} bytes"
                        )
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
            if self.stats.owners_applied:
                os.fchown(fd, m.uid, m.gid)
            os.fchmod(fd, m.mode & 0o7777)  # after chown, which clears setuid/setgid
            os.utime(fd, ns=(m.mtime * 10**9, m.mtime * 10**9))
        finally:
            os.close(fd)
        self.stats.files += 1

    def _symlink(self, m: tarfile.TarInfo, parent: int, base: str) -> None:
        target = m.linkname
        if not target or len(os.fsencode(target)) > self.limits.max_path_bytes:
            raise LayerError(f"{m.name!r}: symlink target empty or too long")
        self._clear(parent, base, keep_dir=False)
        os.symlink(target, base, dir_fd=parent)
        if self.stats.owners_applied:
            os.chown(base, m.uid, m.gid, dir_fd=parent, follow_symlinks=False)
        with contextlib.suppress(OSError):
            os.utime(base, ns=(m.mtime * 10**9,) * 2, dir_fd=parent, follow_symlinks=False)
        self.stats.symlinks += 1

    def _hardlink(self, m: tarfile.TarInfo, parts: tuple[str, ...], parent: int, base: str) -> None:
        target = _split(m.linkname, self.limits, "hard link target")
        if not target:
            raise HostileLayerError(f"{m.name!r}: hard link to the layer's root")
        if target == parts:
            raise LayerError(f"{m.name!r}: hard link to itself")
        tparent = self._open_dir(target[:-1], create=False, name=m.linkname)
        try:
            try:
                st = os.stat(target[-1], dir_fd=tparent, follow_symlinks=False)
            except FileNotFoundError:
                raise LayerError(
                    f"{m.name!r}: hard link target {m.linkname!r} is not in this layer"
                ) from None
            if stat.S_ISDIR(st.st_mode) or stat.S_ISCHR(st.st_mode):
                raise HostileLayerError(f"{m.name!r}: hard link to a directory or a whiteout")
            self._clear(parent, base, keep_dir=False)
            os.link(target[-1], base, src_dir_fd=tparent, dst_dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(tparent)
        self.stats.hardlinks += 1

    def _whiteout(self, parts: tuple[str, ...], name: str) -> None:
        base = parts[-1]
        if base == OPAQUE_MARKER:
            fd = self._open_dir(parts[:-1], create=True, name=name)
            try:
                os.setxattr(fd, OVERLAY_OPAQUE_XATTR, b"y")
            finally:
                os.close(fd)
            self.stats.opaque_dirs += 1
            return
        if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            return  # other aufs bookkeeping (.wh..wh.plnk and the like): nothing to hide
        hidden = base[len(WHITEOUT_PREFIX) :]
        if hidden in ("", ".", ".."):
            raise HostileLayerError(f"whiteout {name!r} names no entry, or '..'")
        parent = self._open_dir(parts[:-1], create=True, name=name)
        try:
            self._clear(parent, hidden, keep_dir=False)
            try:
                os.mknod(hidden, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=parent)
            except PermissionError:
                raise LayerError("whiteouts need root (mknod of an overlay whiteout)") from None
        finally:
            os.close(parent)
        self.stats.whiteouts += 1

    def _finish_dirs(self) -> None:
        """Directory modes, owners and times last: entries written into a directory change
        its mtime, and a read-only mode must not stop the writes."""
        for parts in self.implicit - self.dirs.keys():
            self.dirs[parts] = self._lower_dir(parts)
        for parts in sorted(self.dirs, key=len, reverse=True):
            m = self.dirs[parts]
            try:
                fd = self._open_dir(parts, create=False, name=m.name)
            except (LayerError, OSError):
                continue  # replaced by a later entry of the layer
            try:
                if self.stats.owners_applied:
                    os.fchown(fd, m.uid, m.gid)
                os.fchmod(fd, m.mode & 0o7777)
                os.utime(fd, ns=(m.mtime * 10**9,) * 2)
            finally:
                os.close(fd)
        self._drop_cache()
        if () not in self.dirs:
            os.fchmod(self.root_fd, 0o755)

    def _lower_dir(self, parts: tuple[str, ...]) -> tarfile.TarInfo:
        """The attributes of directory `parts` as the layers below show it (the top-most one
        that has the path; a non-directory there hides any below), else 0755 root's."""
        info = tarfile.TarInfo("/".join(parts))
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
        for lower in self.lowers:
            st = _lstat_below(lower, parts)
            if st is None:
                continue
            if stat.S_ISDIR(st.st_mode):
                info.mode, info.uid, info.gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
                info.mtime = int(st.st_mtime)
            break
        return info


def _lstat_below(root: Path, parts: tuple[str, ...]) -> os.stat_result | None:
    """lstat of `parts` under `root`, every parent reached without following symlinks."""
    try:
        fd = os.open(root, _DIR_FLAGS)
    except OSError:
        return None
    try:
        for part in parts[:-1]:
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
    except OSError:
        return None
    finally:
        os.close(fd)
