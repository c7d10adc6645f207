"""The image store against a real registry (Debian's docker-registry on a loopback port) with
images the test builds and pushes itself, and imports of OCI and `docker save` archives."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from corral.runtime import images
from corral.runtime.images import (
    DigestMismatchError,
    ImageNotFoundError,
    RegistryAuth,
    RegistryAuthError,
    RegistryError,
    UnsupportedImageError,
)
from tests.engines import Registry
from tests.oci_images import BuiltImage, layer_tar, push_index

pytestmark = pytest.mark.registry

BASE = layer_tar({"bin/": None, "bin/hello": b"#!/bin/sh\necho hello\n", "etc/": None,
                  "etc/os-release": b"ID=corraltest\n", "etc/motd": b"base\n"})  # fmt: skip
APP_A = layer_tar({"app/": None, "app/a.txt": b"a\n", "etc/.wh.motd": b""})
APP_B = layer_tar({"app/": None, "app/b.txt": b"b\n"})
CONFIG = {
    "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hi there"],
    "WorkingDir": "/app",
    "User": "1000:1000",
    "Entrypoint": ["/bin/hello"],
    "Cmd": ["--loud"],
    "Labels": {"org.example": "yes"},
}


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    reg = Registry().start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def auth_registry() -> Iterator[Registry]:
    reg = Registry(users={"alice": "s3cret-pw"}).start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


def push(
    reg: Registry, tmp_path: Path, name: str, image: BuiltImage, creds: str | None = None
) -> str:
    ref = f"{reg.host}/{name}"
    image.push(tmp_path / f"push-{name.replace('/', '_').replace(':', '_')}", ref, creds)
    return ref


def store_state(store: Path) -> tuple[list[str], list[str], list[str]]:
    def names(p: Path) -> list[str]:
        return sorted(x.name for x in p.iterdir()) if p.exists() else []

    return names(store / "blobs/sha256"), names(store / "images"), names(store / "tmp")


def test_pull_verifies_digests_and_reads_the_config(
    registry: Registry, tmp_path: Path, store: Path
) -> None:
    built = BuiltImage([BASE, APP_A], CONFIG)
    ref = push(registry, tmp_path, "corral/app:1", built)
    image = images.pull(ref, store, insecure_registries=[registry.host])
    assert image.id == built.config_digest
    assert image.manifest_digest == built.manifest_digest
    assert image.layers == tuple(built.layer_digests)
    assert image.diff_ids == tuple(built.diff_ids)
    assert image.references == (ref,)
    assert image.env == ("PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hi there")
    assert (image.working_dir, image.user) == ("/app", "1000:1000")
    assert (image.entrypoint, image.cmd) == (("/bin/hello",), ("--loud",))
    assert image.labels == {"org.example": "yes"}
    assert image.created == "2026-01-02T03:04:05Z"
    assert image.architecture == images.host_architecture() and image.os == "linux"
    assert image.size == len(built.manifest_bytes) + len(built.config_bytes) + sum(
        map(len, built.blobs)
    )
    # Content-addressed: every blob's file hashes to its name.
    for blob in (store / "blobs/sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    assert images.list_images(store) == [image]
    assert images.get_image(store, ref) == image
    assert images.get_image(store, image.id.removeprefix("sha256:")[:12]) == image

    dirs = images.layer_dirs(store, image)
    assert [d.parent.name for d in dirs] == [
        i.removeprefix("sha256:") for i in reversed(built.diff_ids)
    ]
    assert (dirs[-1] / "bin/hello").read_bytes().startswith(b"#!")
    assert stat.S_ISCHR((dirs[0] / "etc/motd").lstat().st_mode)  # the whiteout, overlay style
    merged, work = tmp_path / "merged", tmp_path / "ovl"
    merged.mkdir()
    (work / "u").mkdir(parents=True)
    (work / "w").mkdir()
    lowerdir = images.overlay_lowerdir(dirs)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lowerdir},upperdir={work / 'u'},workdir={work / 'w'}", str(merged)],
                   check=True)  # fmt: skip
    try:
        assert sorted(os.listdir(merged / "etc")) == ["os-release"]
        assert (merged / "app/a.txt").read_text() == "a\n"
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def test_a_shared_layer_is_fetched_and_stored_once(
    registry: Registry, tmp_path: Path, store: Path
) -> None:
    a, b = BuiltImage([BASE, APP_A], CONFIG), BuiltImage([BASE, APP_B], {"Cmd": ["sh"]})
    ref_a = push(registry, tmp_path, "shared/a:1", a)
    ref_b = push(registry, tmp_path, "shared/b:1", b)
    assert a.layer_digests[0] == b.layer_digests[0]
    image_a = images.pull(ref_a, store, insecure_registries=[registry.host])
    # The base layer's bytes are gone from the registry: the second pull can only succeed if it
    # does not fetch them again.
    base_data = registry.blob_data(a.layer_digests[0])
    saved = base_data.read_bytes()
    base_data.unlink()
    try:
        image_b = images.pull(ref_b, store, insecure_registries=[registry.host])
    finally:
        base_data.write_bytes(saved)
    blobs, records, tmp = store_state(store)
    # base + 2 app layers + 2 configs + 2 manifests, each once
    assert len(blobs) == 7 and len(records) == 2 and tmp == []
    assert images.layer_dirs(store, image_a)[-1] == images.layer_dirs(store, image_b)[-1]

    # Removing one image keeps what the other uses.
    images.remove_image(store, ref_a)
    blobs, records, _ = store_state(store)
    assert a.layer_digests[0].removeprefix("sha256:") in blobs
    assert a.layer_digests[1].removeprefix("sha256:") not in blobs
    assert not (store / "layers" / a.diff_ids[1].removeprefix("sha256:")).exists()
    assert (store / "layers" / a.diff_ids[0].removeprefix("sha256:")).exists()
    images.remove_image(store, image_b.id)
    assert store_state(store) == ([], [], [])
    assert list((store / "layers").iterdir()) == []
    with pytest.raises(ImageNotFoundError):
        images.remove_image(store, ref_b)


def test_concurrent_pulls_and_unpacks_of_images_sharing_a_layer(
    registry: Registry, tmp_path: Path, store: Path
) -> None:
    a, b = BuiltImage([BASE, APP_A], {"Cmd": ["a"]}), BuiltImage([BASE, APP_B], {"Cmd": ["b"]})
    refs = [push(registry, tmp_path, "race/a:1", a), push(registry, tmp_path, "race/b:1", b)]
    with ThreadPoolExecutor(4) as pool:
        pulled = list(
            pool.map(lambda r: images.pull(r, store, insecure_registries=[registry.host]), refs)
        )
        dirs = list(pool.map(lambda i: images.layer_dirs(store, i), [*pulled, *pulled]))
    assert {p.id for p in pulled} == {a.config_digest, b.config_digest}
    assert len({d[-1] for d in dirs}) == 1  # one base layer dir for all
    blobs, records, tmp = store_state(store)
    assert len(blobs) == 7 and len(records) == 2 and tmp == []
    assert len(list((store / "layers").iterdir())) == 3


def test_a_tampered_blob_is_refused_and_nothing_is_left(
    registry: Registry, tmp_path: Path, store: Path
) -> None:
    built = BuiltImage([layer_tar({"tampered": b"original content\n"})])
    ref = push(registry, tmp_path, "corral/tampered:1", built)
    data = registry.blob_data(built.layer_digests[0])
    blob = bytearray(data.read_bytes())
    blob[-5] ^= 0xFF
    data.write_bytes(bytes(blob))
    with pytest.raises(DigestMismatchError, match="digest"):
        images.pull(ref, store, insecure_registries=[registry.host])
    assert store_state(store) == ([], [], [])
    (store / "tmp" / "pull-left-by-a-crash" / "blobs").mkdir(parents=True)
    assert images.clean_staging(store) == 1 and store_state(store)[2] == []


def test_an_image_over_the_pull_limit_is_refused_before_fetching(
    registry: Registry, tmp_path: Path, store: Path
) -> None:
    built = BuiltImage([BASE, APP_A])
    ref = push(registry, tmp_path, "corral/big:1", built)
    total = sum(map(len, built.blobs))
    with pytest.raises(images.ImageTooLargeError, match=f"{total} bytes, over the limit of 100"):
        images.pull(ref, store, insecure_registries=[registry.host], max_bytes=100)
    assert store_state(store) == ([], [], [])
    image = images.pull(ref, store, insecure_registries=[registry.host], max_bytes=total)
    assert image.id == built.config_digest


def test_a_multi_platform_index_gives_this_nodes_image(
    registry: Registry, tmp_path: Path, store: Path
) -> None:
    foreign_arch = "s390x" if images.host_architecture() != "s390x" else "amd64"
    mine = BuiltImage([BASE], {"Cmd": ["mine"]})
    foreign = BuiltImage([APP_B], {"Cmd": ["foreign"]}, architecture=foreign_arch)
    ref = f"{registry.host}/corral/multi:1"
    push_index([foreign, mine], tmp_path / "index", ref)
    image = images.pull(ref, store, insecure_registries=[registry.host], max_bytes=10**6)
    assert image.id == mine.config_digest and image.cmd == ("mine",)
    assert foreign.layer_digests[0].removeprefix("sha256:") not in store_state(store)[0]
    only_foreign = f"{registry.host}/corral/foreign-only:1"
    push_index([foreign], tmp_path / "index2", only_foreign)
    with pytest.raises(UnsupportedImageError, match=f"linux/{images.host_architecture()}"):
        images.pull(only_foreign, store, insecure_registries=[registry.host], max_bytes=10**6)
    with pytest.raises(UnsupportedImageError, match="no image for this node's platform"):
        images.pull(only_foreign, store, insecure_registries=[registry.host])
    assert len(images.list_images(store)) == 1 and store_state(store)[2] == []


def test_unknown_image_and_plain_http_without_opt_in(registry: Registry, store: Path) -> None:
    with pytest.raises(ImageNotFoundError, match="no such image"):
        images.pull(f"{registry.host}/corral/nope:1", store, insecure_registries=[registry.host])
    with pytest.raises(RegistryError) as refused:
        images.pull(f"{registry.host}/corral/nope:1", store, insecure_registries=[])
    assert "http" in str(refused.value).lower()
    with pytest.raises(images.ImageError, match="not an image reference"):
        images.pull("--src-creds=x", store)
    assert store_state(store) == ([], [], [])


def test_basic_auth_registry(
    auth_registry: Registry, tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = BuiltImage([BASE], {"User": "root"})
    ref = push(auth_registry, tmp_path, "private/img:1", built, creds="alice:s3cret-pw")
    insecure = [auth_registry.host]
    with pytest.raises(RegistryAuthError):
        images.pull(ref, store, insecure_registries=insecure)
    with pytest.raises(RegistryAuthError, match="refused"):
        images.pull(ref, store, insecure_registries=insecure,
                    auth=RegistryAuth(username="alice", password="wrong"))  # fmt: skip
    assert store_state(store) == ([], [], [])
    # The password reaches skopeo in a 0600 file, never in its argv (visible in /proc to all).
    real_run, seen = subprocess.run, []

    def spy(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        authfile = Path(argv[argv.index("--src-authfile") + 1])
        seen.append((argv, stat.S_IMODE(authfile.stat().st_mode), authfile.read_text()))
        return real_run(argv, **kwargs)  # type: ignore[call-overload,no-any-return]

    monkeypatch.setattr(images.skopeo.subprocess, "run", spy)
    image = images.pull(ref, store, insecure_registries=insecure,
                        auth=RegistryAuth(username="alice", password="s3cret-pw"))  # fmt: skip
    monkeypatch.undo()
    ((argv, mode, content),) = seen
    assert not any("s3cret" in a for a in argv) and mode == 0o600
    assert auth_registry.host in content
    assert image.id == built.config_digest and image.user == "root"
    assert "s3cret" not in repr(RegistryAuth(username="alice", password="s3cret-pw"))
    assert store_state(store)[2] == []  # the auth file is gone


def test_import_oci_archive_and_docker_save(tmp_path: Path, store: Path) -> None:
    built = BuiltImage([BASE, APP_B], CONFIG)
    oci = built.oci_archive(tmp_path / "img.oci.tar", ref="example.com/corral/oci:2")
    image = images.import_archive(oci, store)
    assert image.id == built.config_digest and image.references == ("example.com/corral/oci:2",)
    assert image.working_dir == "/app"

    other = BuiltImage([BASE], {"Env": ["A=1"]})
    saved = other.docker_archive(tmp_path / "saved.tar", "example.com/corral/saved:3")
    with saved.open("rb") as stream:
        imported = images.import_archive(stream, store)
    # skopeo rewrites a docker config as an OCI one (new digest); the layers are the same.
    assert imported.diff_ids == tuple(other.diff_ids)
    assert imported.references == ("example.com/corral/saved:3",)
    assert imported.env == ("A=1",)
    assert len(images.list_images(store)) == 2
    assert images.layer_dirs(store, imported)[0].exists()

    renamed = images.import_archive(saved, store, reference="example.com/renamed:1")
    assert renamed.references == ("example.com/corral/saved:3", "example.com/renamed:1")

    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(images.ImageArchiveError):
        images.import_archive(bad, store)
    assert store_state(store)[2] == []


def test_an_image_for_another_architecture_is_refused(tmp_path: Path, store: Path) -> None:
    arch = "s390x" if images.host_architecture() != "s390x" else "amd64"
    built = BuiltImage([BASE], architecture=arch)
    with pytest.raises(UnsupportedImageError, match=f"linux/{arch}"):
        images.import_archive(built.oci_archive(tmp_path / "foreign.tar"), store)
    assert store_state(store) == ([], [], [])


def test_own_digest_check_catches_a_blob_the_copy_did_not(tmp_path: Path, store: Path) -> None:
    """The store hashes every blob after skopeo's copy: a layout whose blob was changed after
    it was written (here, in the staging layout itself) is refused, nothing committed."""
    from corral.runtime.images import store as store_mod

    built = BuiltImage([BASE])
    layout = built.oci_layout(tmp_path / "layout", ref=store_mod.STAGING_TAG)
    blob = layout / "blobs/sha256" / built.layer_digests[0].removeprefix("sha256:")
    data = bytearray(blob.read_bytes())
    data[20] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(DigestMismatchError, match="does not match"):
        store_mod._commit(store_mod._Store(store), layout, ["x/y:1"])
    assert store_state(store) == ([], [], [])


def test_a_hostile_layer_is_refused_at_unpack_and_leaves_no_layer_dir(
    tmp_path: Path, store: Path
) -> None:
    base_only = BuiltImage([BASE])
    hostile = BuiltImage([BASE, layer_tar({"../escape": b"pwned"})])
    kept = images.import_archive(base_only.oci_archive(tmp_path / "base.tar"), store)
    image = images.import_archive(hostile.oci_archive(tmp_path / "hostile.tar"), store)
    images.layer_dirs(store, kept)
    with pytest.raises(images.HostileLayerError, match=r"'\.\.'"):
        images.layer_dirs(store, image)
    layers = sorted(p.name for p in (store / "layers").iterdir())
    assert layers == [base_only.diff_ids[0].removeprefix("sha256:")]  # the good one only
    assert store_state(store)[2] == []
    assert not (tmp_path / "escape").exists() and not (store / "escape").exists()


def test_a_layer_not_matching_its_diff_id_is_refused(tmp_path: Path, store: Path) -> None:
    built = BuiltImage([BASE], wrong_diff_ids=True)
    image = images.import_archive(built.oci_archive(tmp_path / "img.tar"), store)
    with pytest.raises(DigestMismatchError, match="hashes to"):
        images.layer_dirs(store, image)
    assert list((store / "layers").iterdir()) == [] and store_state(store)[2] == []


def test_the_image_size_limit_covers_all_layers(tmp_path: Path, store: Path) -> None:
    big = layer_tar({"a": b"x" * 3000})
    built = BuiltImage([big, layer_tar({"b": b"y" * 3000})])
    image = images.import_archive(built.oci_archive(tmp_path / "img.tar"), store)
    limits = images.UnpackLimits(max_layer_bytes=4000, max_image_bytes=5000)
    with pytest.raises(images.LayerLimitError, match="image's content"):
        images.layer_dirs(store, image, limits=limits)
