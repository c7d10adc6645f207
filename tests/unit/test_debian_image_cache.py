"""The Debian test image's cache (tests/debian_image.py): one build per recipe even when several
test processes ask at once, nothing half-made ever visible, and a valid OCI layout. The build
itself (mmdebstrap) is replaced by a tiny tar here; tests/integration/test_debian_image.py uses
the real one."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests import debian_image as debian
from tests.debian_image import DebianImageError, DebianRecipe

RECIPE = DebianRecipe(mirror="http://deb.example/debian", architecture="amd64")


def tiny_tar(path: Path) -> Path:
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("./etc/os-release")
        data = b"ID=debian\n"
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


class FakeBuild:
    """Stands in for mmdebstrap: slow enough for builds to overlap, counts its runs."""

    def __init__(self, fail: bool = False) -> None:
        self.runs = 0
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self, recipe: DebianRecipe, work: Path) -> None:
        with self.lock:
            self.runs += 1
        time.sleep(0.3)
        if self.fail:
            (work / "layout").mkdir()  # half-made
            raise DebianImageError("mmdebstrap failed: the mirror is unreachable")
        debian._write_layout(recipe, tiny_tar(work / "layer.tar"), work / "layout", 0.3)


def test_concurrent_requests_build_once_and_share_the_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build = FakeBuild()
    monkeypatch.setattr(debian, "_build", build)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: debian.debian_image(RECIPE, cache=tmp_path), range(4)))
    assert build.runs == 1
    assert len({g.manifest_digest for g in got}) == 1
    root = tmp_path / "images"
    assert sorted(p.name for p in root.iterdir()) == [".lock", RECIPE.key]  # no build dir left
    again = debian.debian_image(RECIPE, cache=tmp_path)
    assert build.runs == 1 and again == got[0]


def test_a_failed_build_leaves_nothing_and_the_next_run_builds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(debian, "_build", FakeBuild(fail=True))
    with pytest.raises(DebianImageError, match="unreachable"):
        debian.debian_image(RECIPE, cache=tmp_path)
    assert [p.name for p in (tmp_path / "images").iterdir()] == [".lock"]

    # A build killed half-way (its temp dir) and an emptied entry are cleared, not reused.
    (tmp_path / "images" / f".build-{RECIPE.key}-killed" / "layout").mkdir(parents=True)
    (tmp_path / "images" / RECIPE.key / "blobs").mkdir(parents=True)
    build = FakeBuild()
    monkeypatch.setattr(debian, "_build", build)
    image = debian.debian_image(RECIPE, cache=tmp_path)
    assert build.runs == 1 and image.layout == tmp_path / "images" / RECIPE.key
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [".lock", RECIPE.key]


def test_the_recipe_names_its_entry(tmp_path: Path) -> None:
    assert RECIPE.key == DebianRecipe(mirror=RECIPE.mirror, architecture="amd64").key
    assert RECIPE.key.startswith("debian-bookworm-")
    assert len({
        RECIPE.key,
        DebianRecipe(mirror=RECIPE.mirror, architecture="amd64", include=("passwd",)).key,
        DebianRecipe(mirror=RECIPE.mirror, architecture="arm64").key,
        DebianRecipe(mirror="http://other.example/debian", architecture="amd64").key,
    }) == 4  # fmt: skip
    assert RECIPE.sources() == [
        "deb http://deb.example/debian bookworm main",
        "deb http://deb.example/debian bookworm-updates main",
        "deb http://deb.example/debian-security bookworm-security main",
    ]


def test_the_host_mirror_is_read_from_apt_sources() -> None:
    mirror = debian.host_mirror()
    assert mirror.startswith(("http://", "https://")) and mirror.endswith("/debian")


def test_the_layout_is_one_that_skopeo_reads(tmp_path: Path) -> None:
    tar = tiny_tar(tmp_path / "layer.tar")
    debian._write_layout(RECIPE, tar, tmp_path / "layout", 1.0)
    image = debian._load(tmp_path / "layout")
    assert image is not None and image.tar_bytes == tar.stat().st_size
    out = subprocess.run(
        ["skopeo", "inspect", f"oci:{tmp_path / 'layout'}:{image.tag}"],
        check=True, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    inspected = json.loads(out.stdout)
    assert inspected["Layers"] == [image.layer_digest]
    assert inspected["Env"] == [f"PATH={debian.IMAGE_PATH}"]
    config = subprocess.run(
        ["skopeo", "inspect", "--config", f"oci:{tmp_path / 'layout'}:{image.tag}"],
        check=True, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert json.loads(config.stdout)["rootfs"]["diff_ids"] == [image.diff_id]
    # Reproducible: the same tar gives the same digests.
    debian._write_layout(RECIPE, tar, tmp_path / "again", 2.0)
    assert debian._load(tmp_path / "again").manifest_digest == image.manifest_digest  # type: ignore[union-attr]
