"""The layer unpacker, on hand-made tar layers: a battery of hostile layers (each must write
nothing outside the unpack root and be refused or neutralised with a clear reason), and the
overlayfs lower-dir format checked through a real overlay mount."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import re
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from corral.runtime.images import (
    HostileLayerError,
    LayerError,
    LayerLimitError,
    UnpackLimits,
    UnsupportedImageError,
    unpack_layer,
)
from corral.runtime.images.unpack import OVERLAY_OPAQUE_XATTR

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mknod and trusted.* xattrs need root")


@dataclass
class E:
    """One tar entry of a hand-made layer."""

    name: str
    kind: bytes = tarfile.REGTYPE
    data: bytes = b""
    link: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    pax: dict[str, str] | None = None


def layer(*entries: E, compress: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type = e.kind
            info.mode = e.mode
            info.uid, info.gid = e.uid, e.gid
            info.mtime = 1_700_000_000
            info.linkname = e.link
            if e.pax:
                info.pax_headers = e.pax
            if e.kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                info.devmajor, info.devminor = 1, 3
            if e.kind == tarfile.REGTYPE:
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
            else:
                tar.addfile(info)
    data = buf.getvalue()
    return gzip.compress(data) if compress else data


def d(name: str, mode: int = 0o755) -> E:
    return E(name, tarfile.DIRTYPE, mode=mode)


def sym(name: str, target: str) -> E:
    return E(name, tarfile.SYMTYPE, link=target)


def hard(name: str, target: str) -> E:
    return E(name, tarfile.LNKTYPE, link=target)


def snapshot(top: Path, skip: Path) -> dict[str, tuple[int, int, str]]:
    """Every path under `top` but `skip`, with mode, size and content hash, never following
    symlinks."""
    seen: dict[str, tuple[int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [n for n in dirnames if Path(dirpath, n) != skip]
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            st = p.lstat()
            digest = ""
            if stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                digest = os.readlink(p)
            seen[str(p.relative_to(top))] = (st.st_mode, st.st_size, digest)
        seen[str(Path(dirpath).relative_to(top)) + "/"] = (Path(dirpath).stat().st_mode, 0, "")
    return seen


@pytest.fixture
def outer(tmp_path: Path) -> Path:
    """A parent dir with things an escaping layer would overwrite: the unpack root goes
    inside it (`outer/root`)."""
    top = tmp_path / "outer"
    (top / "etc").mkdir(parents=True)
    (top / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (top / "x").write_text("outside\n")
    (top / "victim").mkdir()
    (top / "victim" / "keep").write_text("keep\n")
    return top


def unpack(outer: Path, data: bytes, **limits: int) -> tuple[Path, object]:
    root = outer / "root"
    stats = unpack_layer(io.BytesIO(data), root, limits=UnpackLimits(**limits))
    return root, stats


# -- the hostile-layer battery ---------------------------------------------------------------

# (case id, layer entries, the error class, a phrase of its message); each layer is refused.
REFUSED = [
    ("dotdot", [E("../x", data=b"pwned")], HostileLayerError, "'..'"),
    ("absolute", [E("{outer}/x", data=b"pwned")], HostileLayerError, "absolute"),
    ("dotdot-inside", [d("a"), E("a/../../x", data=b"pwned")], HostileLayerError, "'..'"),
    # Through `l -> /` to the outer dir, never to the host's own files: were the unpacker
    # broken, the test must not damage the machine it runs on.
    (
        "symlink-to-root-then-through",
        [sym("l", "/"), E("l{outer}/x", data=b"pwned")],
        HostileLayerError,
        "symlink 'l'",
    ),
    (
        "symlink-up-then-through",
        [sym("l", "../.."), E("l/x", data=b"pwned")],
        HostileLayerError,
        "symlink 'l'",
    ),
    (
        "symlink-abs-outer-then-through",
        [sym("l", "{outer}"), E("l/x", data=b"pwned")],
        HostileLayerError,
        "symlink 'l'",
    ),
    ("hardlink-to-etc-passwd", [hard("p", "/etc/passwd")], HostileLayerError, "absolute"),
    ("hardlink-dotdot", [hard("p", "../x")], HostileLayerError, "'..'"),
    (
        "hardlink-through-symlinked-parent",
        [sym("l", "{outer}/etc"), hard("p", "l/passwd")],
        HostileLayerError,
        "symlink 'l'",
    ),
    ("dir-through-symlink", [sym("l", "{outer}"), d("l/newdir")], HostileLayerError, "symlink"),
    ("whiteout-dotdot", [E(".wh...", data=b"")], HostileLayerError, "'..'"),
    ("whiteout-in-parent", [E("../.wh.x")], HostileLayerError, "'..'"),
    ("whiteout-through-symlink", [sym("l", "{outer}"), E("l/.wh.x")], HostileLayerError, "symlink"),
    (
        "opaque-on-symlink",
        [sym("l", "{outer}/victim"), E("l/.wh..wh..opq")],
        HostileLayerError,
        "symlink 'l'",
    ),
    ("long-component", [E("a" * 300, data=b"x")], LayerLimitError, "longer than 255"),
    ("long-path", [E("/".join(["d" * 200] * 30), data=b"x")], LayerLimitError, "longer than 4096"),
    ("hardlink-to-missing", [hard("p", "etc/passwd")], LayerError, "not in this layer"),
    ("hardlink-to-dir", [d("a"), hard("p", "a")], HostileLayerError, "directory"),
    ("nul-in-name", [E("x", pax={"path": "a\x00b"})], HostileLayerError, "NUL"),
    ("huge-uid", [E("x", pax={"uid": str(2**40)})], LayerError, "uid/gid out of range"),
    ("huge-pax-header", [E("x", pax={"comment": "c" * (2 << 20)})], LayerLimitError, "header"),
]


@needs_root
@pytest.mark.parametrize(
    ("entries", "error", "phrase"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_hostile_layer_is_refused_and_writes_nothing_outside(
    outer: Path, entries: list[E], error: type[Exception], phrase: str
) -> None:
    entries = [
        E(
            e.name.replace("{outer}", str(outer)),
            e.kind,
            e.data,
            e.link.replace("{outer}", str(outer)),
            e.mode,
            pax=e.pax,
        )
        for e in entries
    ]
    before = snapshot(outer, outer / "root")
    with pytest.raises(error, match=re.escape(phrase)):
        unpack(outer, layer(*entries))
    assert snapshot(outer, outer / "root") == before
    assert not (outer / "root").exists()  # nothing half-made


@needs_root
def test_a_hard_link_to_a_symlink_links_the_symlink_itself(outer: Path) -> None:
    before = snapshot(outer, outer / "root")
    root, _ = unpack(outer, layer(sym("s", str(outer / "x")), hard("h", "s")))
    assert os.readlink(root / "h") == str(outer / "x")
    assert (root / "h").lstat().st_ino == (root / "s").lstat().st_ino
    assert snapshot(outer, outer / "root") == before


@needs_root
def test_pax_float_and_hostile_mtimes_are_accepted(outer: Path) -> None:
    root, _ = unpack(
        outer,
        layer(
            E("a", pax={"mtime": "1700000000.75"}),
            E("b", pax={"mtime": "1e300"}),
            E("c", pax={"mtime": "1e999"}),
            E("d", pax={"mtime": "nan"}),
        ),
    )
    assert (root / "a").lstat().st_mtime == 1_700_000_000
    assert (root / "b").exists() and (root / "c").exists() and (root / "d").exists()


@needs_root
def test_opaque_marker_on_symlink_sets_no_xattr_outside(outer: Path) -> None:
    with pytest.raises(HostileLayerError):
        unpack(outer, layer(sym("l", str(outer / "victim")), E("l/.wh..wh..opq")))
    with pytest.raises(OSError):
        os.getxattr(outer / "victim", OVERLAY_OPAQUE_XATTR)


@needs_root
@pytest.mark.parametrize(
    ("kind", "name"),
    [(tarfile.CHRTYPE, "chr"), (tarfile.BLKTYPE, "blk"), (tarfile.FIFOTYPE, "fifo")],
)
def test_device_nodes_and_fifos_are_skipped_and_counted(
    outer: Path, kind: bytes, name: str
) -> None:
    before = snapshot(outer, outer / "root")
    root, stats = unpack(outer, layer(d("dev"), E(f"dev/{name}", kind), E("ok", data=b"1")))
    assert stats.skipped_devices == 1  # type: ignore[attr-defined]
    assert not os.path.lexists(root / "dev" / name)
    assert (root / "ok").read_bytes() == b"1"
    assert snapshot(outer, outer / "root") == before


@needs_root
def test_file_replacing_a_dir_with_a_symlink_inside_removes_only_inside(outer: Path) -> None:
    before = snapshot(outer, outer / "root")
    root, _ = unpack(
        outer,
        layer(d("d"), sym("d/l", str(outer / "victim")), sym("d/m", "../.."), E("d", data=b"file")),
    )
    assert (root / "d").read_bytes() == b"file"
    assert snapshot(outer, outer / "root") == before
    assert (outer / "victim" / "keep").read_text() == "keep\n"


@needs_root
def test_file_over_a_symlink_replaces_the_link_not_its_target(outer: Path) -> None:
    before = snapshot(outer, outer / "root")
    root, _ = unpack(outer, layer(sym("x", str(outer / "x")), E("x", data=b"inside")))
    assert (root / "x").read_bytes() == b"inside" and not (root / "x").is_symlink()
    assert snapshot(outer, outer / "root") == before


@needs_root
def test_xattrs_in_the_tar_are_not_applied(outer: Path) -> None:
    pax = {"SCHILY.xattr.trusted.overlay.opaque": "y"}
    root, stats = unpack(outer, layer(E("dir", tarfile.DIRTYPE, mode=0o755, pax=pax)))
    assert stats.skipped_xattrs == 1  # type: ignore[attr-defined]
    with pytest.raises(OSError):
        os.getxattr(root / "dir", OVERLAY_OPAQUE_XATTR)


@needs_root
def test_too_many_entries(outer: Path) -> None:
    with pytest.raises(LayerLimitError, match="more than 5 entries"):
        unpack(outer, layer(*[E(f"f{i}") for i in range(6)]), max_entries=5)
    assert not (outer / "root").exists()


@needs_root
def test_layer_bigger_than_the_limit(outer: Path) -> None:
    with pytest.raises(LayerLimitError, match="over the limit of 1000 bytes"):
        unpack(outer, layer(E("a", data=b"x" * 600), E("b", data=b"y" * 600)), max_layer_bytes=1000)
    assert not (outer / "root").exists()


@needs_root
def test_gzip_bomb_stops_at_the_limit(outer: Path) -> None:
    # 64 MiB of zeros compress to ~64 KiB; the limit applies to what is written, while streaming.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("zeros")
        info.size = 64 << 20
        tar.addfile(info, io.BytesIO(bytes(64 << 20)))
    bomb = gzip.compress(buf.getvalue(), compresslevel=1)
    assert len(bomb) < 1 << 20
    with pytest.raises(LayerLimitError):
        unpack(outer, bomb, max_layer_bytes=1 << 20)
    assert not (outer / "root").exists()


def test_zstd_layers_are_refused_clearly(outer: Path) -> None:
    with pytest.raises(UnsupportedImageError, match="zstd"):
        unpack(outer, b"\x28\xb5\x2f\xfd" + bytes(100))
    assert not (outer / "root").exists()


def test_garbage_is_not_a_layer(outer: Path) -> None:
    with pytest.raises(LayerError, match="not a readable tar"):
        unpack(outer, b"\x1f\x8b" + os.urandom(200))
    assert not (outer / "root").exists()


# -- correctness -----------------------------------------------------------------------------


@needs_root
def test_files_modes_owners_symlinks_and_hardlinks(outer: Path) -> None:
    root, stats = unpack(
        outer,
        layer(
            d("usr", 0o755), d("usr/bin", 0o755),
            E("usr/bin/sudo", data=b"#!", mode=0o4755, uid=0, gid=0),
            E("usr/bin/wall", data=b"#!", mode=0o2755, uid=0, gid=5),
            d("home", 0o755), d("home/alice", 0o700),
            E("home/alice/notes", data=b"hi", mode=0o600, uid=1000, gid=1000),
            sym("etc-link", "/etc/passwd"), sym("rel", "usr/bin/sudo"),
            hard("usr/bin/sudoedit", "usr/bin/sudo"),
            d("ro", 0o555), E("ro/file", data=b"r", mode=0o444),
            compress=True,
        ),
    )  # fmt: skip
    sudo = (root / "usr/bin/sudo").lstat()
    assert stat.S_IMODE(sudo.st_mode) == 0o4755  # setuid kept (see the module docstring)
    assert stat.S_IMODE((root / "usr/bin/wall").lstat().st_mode) == 0o2755
    assert (root / "usr/bin/wall").lstat().st_gid == 5
    alice = (root / "home/alice").lstat()
    assert stat.S_IMODE(alice.st_mode) == 0o700
    assert (root / "home/alice/notes").lstat().st_uid == 1000
    assert os.readlink(root / "etc-link") == "/etc/passwd"  # kept as it is, never followed
    assert os.readlink(root / "rel") == "usr/bin/sudo"
    assert (root / "usr/bin/sudoedit").lstat().st_ino == sudo.st_ino
    assert stat.S_IMODE((root / "ro").lstat().st_mode) == 0o555
    assert (root / "ro/file").read_bytes() == b"r"
    assert (root / "home/alice/notes").lstat().st_mtime == 1_700_000_000
    assert stats.hardlinks == 1 and stats.symlinks == 2 and stats.max_uid == 1000  # type: ignore[attr-defined]


@contextlib.contextmanager
def overlay(lowers: list[Path], work: Path) -> Iterator[Path]:
    """A real overlay mount of the layer dirs (top-most first) with a writable upper dir."""
    upper, wd, merged = work / "upper", work / "work", work / "merged"
    for p in (upper, wd, merged):
        p.mkdir(parents=True)
    lowerdir = ":".join(str(p) for p in lowers)
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir={lowerdir},upperdir={upper},workdir={wd}", str(merged)],
        check=True,
    )  # fmt: skip
    try:
        yield merged
    finally:
        subprocess.run(["umount", str(merged)], check=True)


@needs_root
def test_whiteouts_and_opaque_dirs_hide_lower_files_in_a_real_overlay(tmp_path: Path) -> None:
    bottom = layer(
        d("a"), E("a/keep", data=b"k"), E("a/gone", data=b"g"), d("a/gonedir"), E("a/gonedir/f"),
        d("o"), E("o/old1", data=b"1"), d("o/sub"), E("o/sub/old2", data=b"2"),
        E("top", data=b"t"),
    )  # fmt: skip
    middle = layer(E("a/.wh.gone"), E("a/.wh.gonedir"), d("o"), E("o/.wh..wh..opq"), E("o/new"))
    top = layer(E("a/gone", data=b"back"))  # a file whited out below comes back above
    l1 = tmp_path / "l1"
    l2 = tmp_path / "l2"
    l3 = tmp_path / "l3"
    unpack_layer(io.BytesIO(bottom), l1)
    stats = unpack_layer(io.BytesIO(middle), l2)
    unpack_layer(io.BytesIO(top), l3)
    assert stats.whiteouts == 2 and stats.opaque_dirs == 1
    wh = (l2 / "a" / "gone").lstat()
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == os.makedev(0, 0)  # overlay's whiteout
    assert os.getxattr(l2 / "o", OVERLAY_OPAQUE_XATTR) == b"y"
    assert not os.path.lexists(l2 / "a" / ".wh.gone")

    with overlay([l2, l1], tmp_path / "m2") as merged:
        assert sorted(os.listdir(merged / "a")) == ["keep"]
        assert sorted(os.listdir(merged / "o")) == ["new"]
        assert (merged / "top").read_bytes() == b"t"
        (merged / "a" / "written").write_text("upper")  # the sandbox's writes go up
    assert not (l1 / "a" / "written").exists() and not (l2 / "a" / "written").exists()
    with overlay([l3, l2, l1], tmp_path / "m3") as merged:
        assert sorted(os.listdir(merged / "a")) == ["gone", "keep"]
        assert (merged / "a" / "gone").read_bytes() == b"back"


@needs_root
def test_a_later_entry_replaces_an_earlier_one_in_the_same_layer(outer: Path) -> None:
    root, _ = unpack(
        outer, layer(d("x"), E("x/f"), E("x", data=b"file"), E("y", data=b"1"), d("y"), E("y/z"))
    )
    assert (root / "x").read_bytes() == b"file"
    assert (root / "y").is_dir() and (root / "y" / "z").exists()


@needs_root
def test_parents_the_layer_does_not_list_take_the_lower_layers_attributes(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    unpack_layer(
        io.BytesIO(layer(d("usr", 0o755), E("opt", tarfile.DIRTYPE, mode=0o750, gid=5))), lower
    )
    upper = tmp_path / "upper"
    unpack_layer(io.BytesIO(layer(E("usr/bin/tool", data=b"t"), E("opt/x"), E("new/y"))), upper,
                 lowers=[lower])  # fmt: skip
    assert stat.S_IMODE((upper / "usr").stat().st_mode) == 0o755
    assert stat.S_IMODE((upper / "usr/bin").stat().st_mode) == 0o755  # nowhere below: default
    opt = (upper / "opt").stat()
    assert (stat.S_IMODE(opt.st_mode), opt.st_gid) == (0o750, 5)
    assert stat.S_IMODE((upper / "new").stat().st_mode) == 0o755


@needs_root
def test_dot_slash_names_as_docker_writes_them(outer: Path) -> None:
    root, _ = unpack(outer, layer(d("./", 0o755), d("./etc"), E("./etc/hostname", data=b"h")))
    assert (root / "etc/hostname").read_bytes() == b"h"
    assert stat.S_IMODE(root.stat().st_mode) == 0o755
