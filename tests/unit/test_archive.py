"""The tar reader and writer used in sandboxes (uploads) and by the SDK (downloads): hostile
archives write nothing outside the destination and fail with a clear error."""

from __future__ import annotations

import bz2
import gzip
import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from corral.core.tools import archive
from corral.core.tools.archive import (
    ArchiveConflict,
    ArchiveTooLarge,
    BadArchive,
    UnsafeArchive,
)

LIMITS = {"max_entries": 1000, "max_bytes": 10 << 20}


def make_tar(add: Callable[[tarfile.TarFile], None], compression: str = "gz") -> bytes:
    buf = io.BytesIO()
    mode = "w:" + compression if compression else "w"
    with tarfile.open(fileobj=buf, mode=mode) as tf:  # type: ignore[call-overload]
        add(tf)
    return buf.getvalue()


def add_file(tf: tarfile.TarFile, name: str, data: bytes = b"data", mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    tf.addfile(info, io.BytesIO(data))


def add_entry(tf: tarfile.TarFile, name: str, kind: bytes, linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    tf.addfile(info)


def extract(data: bytes, dest: Path, **limits: int) -> dict[str, int]:
    dest.mkdir(parents=True, exist_ok=True)
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return archive.extract(io.BytesIO(data), fd, **{**LIMITS, **limits})
    finally:
        os.close(fd)


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def box(tmp_path: Path) -> Path:
    """A scratch area: `dest` is extracted into, everything else must stay untouched."""
    (tmp_path / "dest").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("secret")
    return tmp_path


def assert_outside_untouched(box: Path) -> None:
    assert tree(box) - {"dest"} - {p for p in tree(box) if p.startswith("dest/")} == {
        "outside",
        "outside/secret",
    }
    assert (box / "outside" / "secret").read_text() == "secret"


# --- the hostile battery -----------------------------------------------------------------------

HOSTILE: dict[str, tuple[Callable[[tarfile.TarFile], None], type[Exception], str]] = {
    "dotdot": (lambda tf: add_file(tf, "../outside/evil"), UnsafeArchive, "'..'"),
    "dotdot-deep": (lambda tf: add_file(tf, "a/b/../../../outside/evil"), UnsafeArchive, "'..'"),
    "absolute": (lambda tf: add_file(tf, "/tmp/corral-test-evil"), UnsafeArchive, "absolute"),
    "symlink-absolute": (
        lambda tf: add_entry(tf, "link", tarfile.SYMTYPE, "/etc/passwd"),
        UnsafeArchive,
        "absolute",
    ),
    "symlink-escapes": (
        lambda tf: add_entry(tf, "a/link", tarfile.SYMTYPE, "../../outside"),
        UnsafeArchive,
        "outside",
    ),
    "symlink-dotdot-after-name": (
        # `x/..` resolves from where x leads: refused even though it looks like it stays inside.
        lambda tf: add_entry(tf, "link", tarfile.SYMTYPE, "sub/../.."),
        UnsafeArchive,
        "'..' after a name",
    ),
    "write-through-own-symlink": (
        lambda tf: (
            add_entry(tf, "sub", tarfile.DIRTYPE),
            add_entry(tf, "ok", tarfile.SYMTYPE, "sub"),
            add_file(tf, "ok/file"),
        ),
        UnsafeArchive,
        "symlink",
    ),
    "hardlink-outside": (
        lambda tf: add_entry(tf, "h", tarfile.LNKTYPE, "../outside/secret"),
        UnsafeArchive,
        "'..'",
    ),
    "hardlink-absolute": (
        lambda tf: add_entry(tf, "h", tarfile.LNKTYPE, "/etc/passwd"),
        UnsafeArchive,
        "absolute",
    ),
    "hardlink-not-from-archive": (
        lambda tf: add_entry(tf, "h", tarfile.LNKTYPE, "elsewhere"),
        UnsafeArchive,
        "extracted earlier",
    ),
    "char-device": (lambda tf: add_entry(tf, "null", tarfile.CHRTYPE), UnsafeArchive, "device"),
    "block-device": (lambda tf: add_entry(tf, "sda", tarfile.BLKTYPE), UnsafeArchive, "device"),
    "fifo": (lambda tf: add_entry(tf, "pipe", tarfile.FIFOTYPE), UnsafeArchive, "FIFO"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_is_refused(box: Path, case: str) -> None:
    build, error, words = HOSTILE[case]
    with pytest.raises(error) as info:
        extract(make_tar(build), box / "dest")
    assert words in info.value.message
    assert info.value.code == ("unsafe_archive" if error is UnsafeArchive else info.value.code)
    assert_outside_untouched(box)
    assert not Path("/tmp/corral-test-evil").exists()


def test_symlink_planted_in_the_destination_is_never_followed(box: Path) -> None:
    dest = box / "dest"
    (dest / "planted").symlink_to(box / "outside")
    (dest / "planted_file").symlink_to(box / "outside" / "secret")
    # Through a planted directory link: refused.
    with pytest.raises(UnsafeArchive, match="symlink"):
        extract(make_tar(lambda tf: add_file(tf, "planted/evil")), dest)
    # Onto a planted file link: the link is replaced, the file it pointed to is not written.
    extract(make_tar(lambda tf: add_file(tf, "planted_file", b"new")), dest)
    assert not (dest / "planted_file").is_symlink()
    assert (dest / "planted_file").read_bytes() == b"new"
    assert_outside_untouched(box)


def test_symlinked_destination_is_refused(box: Path) -> None:
    (box / "link").symlink_to(box / "outside")
    with pytest.raises(UnsafeArchive, match="symlink"):
        archive.open_destination(str(box / "link"), create=True)
    with pytest.raises(UnsafeArchive, match="symlink"):
        archive.open_destination(str(box / "link" / "below"), create=True)
    assert not (box / "outside" / "below").exists()


def test_destination_is_created_component_by_component(box: Path) -> None:
    fd = archive.open_destination(str(box / "dest" / "a" / "b"), create=True)
    os.close(fd)
    assert (box / "dest" / "a" / "b").is_dir()
    with pytest.raises(FileNotFoundError):
        archive.open_destination(str(box / "missing"), create=False)


def test_entry_limit(box: Path) -> None:
    def many(tf: tarfile.TarFile) -> None:
        for i in range(20):
            add_file(tf, f"f{i}", b"")

    with pytest.raises(ArchiveTooLarge, match="more than 10 entries"):
        extract(make_tar(many), box / "dest", max_entries=10)


def test_tar_bomb_is_stopped_before_it_is_written(box: Path) -> None:
    def bomb(tf: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("zeros")
        info.size = 64 << 20
        tf.addfile(info, io.BytesIO(bytes(info.size)))

    data = make_tar(bomb)
    assert len(data) < 1 << 20  # small compressed, large expanded
    with pytest.raises(ArchiveTooLarge, match="uncompressed"):
        extract(data, box / "dest", max_bytes=16 << 20)
    assert not (box / "dest" / "zeros").exists()


def test_truncated_and_damaged_archives(box: Path) -> None:
    good = make_tar(lambda tf: (add_file(tf, "a", os.urandom(100_000)), add_file(tf, "b")))
    with pytest.raises(BadArchive):
        extract(good[: len(good) // 2], box / "d1")
    assert list((box / "d1").iterdir()) == []  # no partial file, no temporary left behind
    with pytest.raises(BadArchive, match="not a tar archive"):
        extract(b"this is not an archive", box / "d2")
    with pytest.raises(BadArchive, match="not a tar archive"):
        extract(b"", box / "d3")
    plain = make_tar(lambda tf: add_file(tf, "a"), compression="")
    with pytest.raises(BadArchive, match="damaged"):
        extract(plain[:1024] + b"\x01" * 1024 + plain[1024:], box / "d4")


def test_conflicts_with_the_destination(box: Path) -> None:
    dest = box / "dest"
    (dest / "dir").mkdir()
    (dest / "file").write_text("x")
    with pytest.raises(ArchiveConflict, match="directory"):
        extract(make_tar(lambda tf: add_file(tf, "dir")), dest)
    with pytest.raises(ArchiveConflict, match="not a directory"):
        extract(make_tar(lambda tf: add_file(tf, "file/below")), dest)


def test_good_archive_round_trips_with_modes_links_and_times(box: Path) -> None:
    src = box / "src"
    (src / "sub" / "deep").mkdir(parents=True)
    (src / "a.txt").write_text("hello")
    (src / "run.sh").write_text("#!/bin/sh\n")
    (src / "run.sh").chmod(0o755)
    (src / "sub" / "big").write_bytes(os.urandom(3 << 20))
    (src / "sub" / "link").symlink_to("../a.txt")
    (src / "sub" / "dirlink").symlink_to("deep")
    os.link(src / "a.txt", src / "hard")
    (src / "sub" / "deep" / "ro").mkdir()
    (src / "sub" / "deep" / "ro" / "f").write_text("x")
    (src / "sub" / "deep" / "ro").chmod(0o555)
    os.utime(src / "a.txt", (1_000_000_000, 1_000_000_000))
    for level in (1, 0, None):
        chunks: list[bytes] = []
        counts = archive.write_archive(str(src), chunks.append, level=level)
        data = b"".join(chunks)
        if level is not None:
            assert gzip.decompress(data)  # a gzip stream
        dest = box / f"out-{level}"
        result = extract(data, dest)
        assert result["entries"] == counts["entries"]
        assert tree(dest) == tree(src)
        assert (dest / "sub" / "big").read_bytes() == (src / "sub" / "big").read_bytes()
        assert os.readlink(dest / "sub" / "link") == "../a.txt"
        assert os.readlink(dest / "sub" / "dirlink") == "deep"
        assert (dest / "hard").stat().st_ino == (dest / "a.txt").stat().st_ino
        assert (dest / "run.sh").stat().st_mode & 0o777 == 0o755
        assert (dest / "sub" / "deep" / "ro").stat().st_mode & 0o777 == 0o555
        assert (dest / "a.txt").stat().st_mtime == 1_000_000_000
    (src / "sub" / "deep" / "ro").chmod(0o755)


def test_other_compressions_and_setuid_bits(box: Path) -> None:
    def files(tf: tarfile.TarFile) -> None:
        add_file(tf, "./x/suid", b"#!", mode=0o4755)

    for compression in ("bz2", "xz", ""):
        dest = box / f"dest-{compression or 'plain'}"
        extract(make_tar(files, compression), dest)
        assert (dest / "x" / "suid").stat().st_mode & 0o7777 == 0o755
    assert bz2  # imported for the bz2 codec's presence


def test_symlink_rules() -> None:
    archive.check_symlink_target(("a", "b", "link"), "../../top")  # to the destination's top
    archive.check_symlink_target(("link",), "sub/file")
    archive.check_symlink_target(("a", "link"), "./x/./y")
    for parts, target in [
        (("link",), ".."),
        (("a", "link"), "../../x"),
        (("link",), "/abs"),
        (("link",), "x/../y"),
        (("link",), ""),
    ]:
        with pytest.raises(UnsafeArchive):
            archive.check_symlink_target(parts, target)


def test_names() -> None:
    assert archive.entry_parts("./a//b/./c") == ("a", "b", "c")
    assert archive.entry_parts(".") == ()
    for bad in ("/x", "../x", "a/../b", "a/" + "n" * 300):
        with pytest.raises(UnsafeArchive):
            archive.entry_parts(bad)
