"""The Debian test image (tests/debian_image.py) through a real registry and the node's image
store, and the local .deb installed in it offline: what the writable-root tests build on."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.runtime import images
from tests.deb_packages import HELLO_MARKER, HELLO_OUTPUT
from tests.debian_image import IMAGE_PATH, DebianImage
from tests.engines import Registry

pytestmark = pytest.mark.registry


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    reg = Registry().start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def pulled(
    debian_image: DebianImage, registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> tuple[images.Image, Path, list[Path]]:
    """The image pushed to the registry, pulled into a fresh store, its layers unpacked."""
    ref = debian_image.push(f"{registry.host}/corral/debian:bookworm")
    store = tmp_path_factory.mktemp("debian-store")
    image = images.pull(ref, store, insecure_registries=[registry.host])
    return image, store, images.layer_dirs(store, image)


def passwd_uid(root: Path, user: str) -> int:
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2])
    raise AssertionError(f"{user} is not in the image's /etc/passwd")


def test_the_image_is_in_the_registry_with_its_layer_and_path(
    debian_image: DebianImage, registry: Registry, pulled: tuple[images.Image, Path, list[Path]]
) -> None:
    out = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false",
         f"docker://{registry.host}/corral/debian:bookworm"],
        check=True, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    inspected = json.loads(out.stdout)
    assert inspected["Digest"] == debian_image.manifest_digest
    assert inspected["Layers"] == [debian_image.layer_digest]
    assert inspected["Env"] == [f"PATH={IMAGE_PATH}"]
    assert inspected["Os"] == "linux" and inspected["Architecture"] == images.host_architecture()

    image, _, dirs = pulled
    assert image.id == debian_image.config_digest
    assert image.layers == (debian_image.layer_digest,)
    assert image.diff_ids == (debian_image.diff_id,)
    assert image.env == (f"PATH={IMAGE_PATH}",) and image.cmd == ("/bin/bash",)
    assert len(dirs) == 1


def test_the_image_imports_from_an_oci_archive(debian_image: DebianImage, tmp_path: Path) -> None:
    archive = debian_image.oci_archive(tmp_path / "debian.tar")
    image = images.import_archive(archive, tmp_path / "store", reference="corral/debian:bookworm")
    assert image.id == debian_image.config_digest
    assert image.layers == (debian_image.layer_digest,)


def test_the_unpacked_root_is_debian_with_its_owners(
    pulled: tuple[images.Image, Path, list[Path]],
) -> None:
    _, _, (root,) = pulled
    assert "bookworm" in (root / "etc/os-release").read_text()
    for tool in ("usr/bin/apt-get", "usr/bin/dpkg", "usr/sbin/useradd", "usr/sbin/groupadd",
                 "usr/bin/su", "usr/bin/login", "usr/bin/bash"):  # fmt: skip
        st = (root / tool).stat()
        assert stat.S_ISREG(st.st_mode) and st.st_mode & 0o111, tool
        assert (st.st_uid, st.st_gid) == (0, 0), tool
    assert (root / "usr/bin/su").stat().st_mode & stat.S_ISUID  # su needs its setuid bit
    assert os.readlink(root / "bin") == "usr/bin"  # merged /usr

    apt_uid = passwd_uid(root, "_apt")
    assert apt_uid != 0
    partial = (root / "var/cache/apt/archives/partial").stat()
    assert partial.st_uid == apt_uid and stat.S_IMODE(partial.st_mode) == 0o700
    assert (root / "var/lib/apt/lists/partial").stat().st_uid == apt_uid
    shadow = (root / "etc/shadow").stat()
    assert shadow.st_uid == 0 and shadow.st_gid == 42  # group shadow, as Debian ships it
    assert stat.S_IMODE(shadow.st_mode) == 0o640

    # No device nodes or the build host's network identity; slim: no docs or man pages.
    assert list((root / "dev").iterdir()) == []
    assert not (root / "etc/resolv.conf").exists() and not (root / "etc/hostname").exists()
    assert not (root / "usr/share/man/man8").exists()
    assert (root / "usr/share/doc/apt/copyright").exists()


def overlay_root(dirs: list[Path], work: Path) -> Path:
    """A writable root over the image's layers (as a sandbox gets one), mounted at work/root."""
    merged, upper, scratch = work / "root", work / "upper", work / "work"
    for d in (merged, upper, scratch):
        d.mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir={images.overlay_lowerdir(dirs)},upperdir={upper},workdir={scratch}",
         str(merged)],
        check=True, timeout=30,
    )  # fmt: skip
    return merged


def in_root(root: Path, script: str) -> subprocess.CompletedProcess[str]:
    """`script` as root in `root`, with no network (apt must not need the mirror)."""
    return subprocess.run(
        ["bwrap", "--bind", str(root), "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
         "--unshare-net", "--unshare-pid", "--unshare-ipc", "--die-with-parent", "--clearenv",
         "--setenv", "PATH", IMAGE_PATH, "--setenv", "HOME", "/root",
         "--", "/bin/sh", "-euc", script],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.sandbox
def test_the_local_deb_installs_offline_and_users_can_be_added(
    pulled: tuple[images.Image, Path, list[Path]], corral_hello_deb: Path, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounts an overlay and runs as root in it")
    _, _, dirs = pulled
    first = overlay_root(dirs, tmp_path / "first")
    try:
        second = overlay_root(dirs, tmp_path / "second")
        try:
            (first / "root" / corral_hello_deb.name).write_bytes(corral_hello_deb.read_bytes())
            script = f"""
                cd /root
                apt-get install -y ./{corral_hello_deb.name}
                corral-hello
                cat {HELLO_MARKER}
                dpkg-query -W -f '${{Status}}\\n' corral-hello
                useradd -m alice && su alice -c 'touch ~/x'
                stat -c '%U %a' /home/alice /home/alice/x
            """
            done = in_root(first, script)
            assert done.returncode == 0, done.stdout + done.stderr
            lines = done.stdout.splitlines()
            assert HELLO_OUTPUT in lines
            assert "configured " in lines  # the postinst ran (a first install: no old version)
            assert "install ok installed" in lines
            assert lines[-2:] == ["alice 755", "alice 644"]

            # The other root over the same layers saw none of it.
            other = in_root(second, "command -v corral-hello || echo absent; id alice || true")
            assert other.stdout.splitlines()[0] == "absent", other.stdout + other.stderr
            assert "no such user" in other.stderr
            assert not (dirs[0] / "usr/bin/corral-hello").exists()  # nor did the layer
        finally:
            subprocess.run(["umount", str(second)], check=True, timeout=30)
    finally:
        subprocess.run(["umount", str(first)], check=True, timeout=30)
