"""The images API against a real server and a real registry (Debian's docker-registry): pull,
import, list, get, delete, the errors of each, sandboxes from an image, the SDK and the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from corral import AsyncClient, Client, ConflictError, NotFoundError
from tests.conftest import Server, make_data_dir
from tests.engines import Registry
from tests.host_image import host_tools_layer, shell_layer
from tests.integration.test_sdk_cli import run_cli
from tests.oci_images import BuiltImage, layer_tar
from tests.unit.test_image_unpack import E, hard, layer, sym

pytestmark = pytest.mark.registry

MAX_IMAGE_BYTES = 16 * 1024 * 1024  # room for a layer of the host's bash and its libraries
BASE = layer_tar({"bin/": None, "bin/hello": b"#!/bin/sh\necho hello\n", "etc/": None,
                  "etc/os-release": b"ID=corraltest\n"})  # fmt: skip
OS_RELEASE = layer_tar({"etc/": None, "etc/os-release": b"ID=corraltest\n"})
APP = layer_tar({"app/": None, "app/a.txt": b"a\n"})
CONFIG = {
    "Env": ["PATH=/opt/img/bin:/usr/bin:/bin", "GREETING=hi there", "ONLY_IMAGE=1"],
    "WorkingDir": "/tmp",
    "User": "1000:1000",
    "Cmd": ["/bin/hello"],
}


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    reg = Registry().start()
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def auth_registry() -> Iterator[Registry]:
    reg = Registry(users={"alice": "s3cret-pw"}).start()
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def server(registry: Registry, auth_registry: Registry) -> Iterator[Server]:
    srv = Server(
        make_data_dir("corral-test-images-"),
        env={
            "CORRAL_INSECURE_REGISTRIES": f"{registry.host}, {auth_registry.host}",
            "CORRAL_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
        },
    )
    srv.start()
    yield srv
    srv.stop()
    shutil.rmtree(srv.data_dir, ignore_errors=True)


def push(
    reg: Registry, tmp_path: Path, name: str, image: BuiltImage, creds: str | None = None
) -> str:
    ref = f"{reg.host}/{name}"
    image.push(tmp_path / f"push-{name.replace('/', '_').replace(':', '_')}", ref, creds)
    return ref


def store_records(server: Server) -> set[str]:
    """The image ids in the node's store (its records), and nothing half-made in its tmp."""
    store = server.data_dir / "images"
    assert not any((store / "tmp").iterdir()), list((store / "tmp").iterdir())
    return {"sha256:" + p.stem for p in (store / "images").glob("*.json")}


def error(resp: httpx.Response) -> dict[str, object]:
    body = resp.json()
    assert set(body) >= {"error", "request_id"}, body
    return dict(body["error"])


def test_pull_list_get_and_delete(server: Server, registry: Registry, tmp_path: Path) -> None:
    built = BuiltImage([BASE, APP], CONFIG)
    ref = push(registry, tmp_path, "api/app:1", built)
    with server.client() as api:
        pulled = api.post("/v1/images", json={"reference": ref})
        assert pulled.status_code == 201, pulled.text
        image = pulled.json()
        assert image["id"] == built.config_digest and image["references"] == [ref]
        assert (image["node_id"], image["layers"], image["used_by"]) == ("local", 2, [])
        assert image["env"] == CONFIG["Env"] and image["working_dir"] == "/tmp"
        assert image["user"] == "1000:1000" and image["cmd"] == ["/bin/hello"]
        assert image["created"] == "2026-01-02T03:04:05Z" and image["os"] == "linux"
        assert image["size"] == len(built.manifest_bytes) + len(built.config_bytes) + sum(
            map(len, built.blobs)
        )
        listed = api.get("/v1/images").json()["items"]
        assert [i for i in listed if i["id"] == image["id"]] == [image]
        for name in (image["id"], ref, image["id"].removeprefix("sha256:")[:12]):
            got = api.get(f"/v1/images/{name}")
            assert got.status_code == 200 and got.json() == image, (name, got.text)
        assert api.get("/v1/images", params={"node": "elsewhere"}).json()["items"] == []
        # A second pull of what the node has is the same image (its layers are not fetched).
        again = api.post("/v1/images", json={"reference": ref})
        assert again.status_code == 201 and again.json()["id"] == image["id"]
        assert image["id"] in store_records(server)
        assert api.delete(f"/v1/images/{ref}").status_code == 204
        assert api.get(f"/v1/images/{image['id']}").status_code == 404
        assert image["id"] not in {i["id"] for i in api.get("/v1/images").json()["items"]}
        assert image["id"] not in store_records(server)
        blobs = server.data_dir / "images" / "blobs" / "sha256"
        assert not (blobs / built.config_digest.removeprefix("sha256:")).exists()


def test_plain_http_only_for_insecure_registries_and_the_store_cap(
    registry: Registry, tmp_path: Path
) -> None:
    ref = push(registry, tmp_path, "api/plain:1", BuiltImage([BASE]))
    strict = Server(
        make_data_dir("corral-test-images-strict-"),
        env={"CORRAL_IMAGE_STORE_MAX_BYTES": "4096"},
    )
    strict.start()
    try:
        with strict.client() as api:
            refused = api.post("/v1/images", json={"reference": ref})
            assert refused.status_code == 502, refused.text
            assert error(refused)["code"] == "registry_error"
            assert "http" in str(error(refused)["message"]).lower()
            # At create, the image that cannot be had is the request's fault: 422 on `image`.
            create = api.post("/v1/sandboxes", json={"image": ref})
            assert create.status_code == 422, create.text
            assert error(create)["code"] == "registry_error"
            assert error(create)["details"] == [{"loc": ["body", "image"], "msg": "registry_error"}]
            assert api.get("/v1/sandboxes").json()["items"] == []
            # The store holds at most 4 KiB: a bigger archive is refused, nothing kept.
            big = BuiltImage([layer_tar({"big": os.urandom(8000)})])
            archive = big.oci_archive(tmp_path / "big.tar").read_bytes()
            full = api.post("/v1/images/import", content=archive)
            assert full.status_code == 507, full.text
            assert error(full)["code"] == "insufficient_storage"
            assert api.get("/v1/images").json()["items"] == []
            assert store_records(strict) == set()
    finally:
        strict.stop()
        shutil.rmtree(strict.data_dir, ignore_errors=True)


def test_a_registry_with_basic_auth(
    server: Server, auth_registry: Registry, tmp_path: Path
) -> None:
    built = BuiltImage([BASE], {"Env": ["SECRET_IMAGE=1"]})
    ref = push(auth_registry, tmp_path, "private/img:1", built, creds="alice:s3cret-pw")
    with server.client() as api:
        anonymous = api.post("/v1/images", json={"reference": ref})
        assert anonymous.status_code == 403, anonymous.text
        assert error(anonymous)["code"] == "registry_unauthorized"
        wrong = api.post(
            "/v1/images",
            json={"reference": ref, "auth": {"username": "alice", "password": "wrong-pw-123"}},
        )
        assert wrong.status_code == 403 and "wrong-pw-123" not in wrong.text
        half = api.post("/v1/images", json={"reference": ref, "auth": {"username": "alice"}})
        assert half.status_code == 422, half.text
        both = api.post(
            "/v1/images",
            json={"reference": ref, "auth": {"username": "a", "password": "b", "token": "c"}},
        )
        assert both.status_code == 422, both.text
        good = api.post(
            "/v1/images",
            json={"reference": ref, "auth": {"username": "alice", "password": "s3cret-pw"}},
        )
        assert good.status_code == 201, good.text
        assert good.json()["id"] == built.config_digest
        assert "s3cret-pw" not in good.text
        api.delete(f"/v1/images/{ref}")
    assert "s3cret-pw" not in server.log_path.read_text(errors="replace")
    assert "wrong-pw-123" not in server.log_path.read_text(errors="replace")


def test_unknown_images_and_bad_references(server: Server, registry: Registry) -> None:
    with server.client() as api:
        missing = api.post("/v1/images", json={"reference": f"{registry.host}/api/nope:1"})
        assert missing.status_code == 404, missing.text
        assert error(missing)["code"] == "not_found"
        for name in ("sha256:" + "0" * 64, "nope", f"{registry.host}/api/nope:1"):
            assert api.get(f"/v1/images/{name}").status_code == 404
            assert api.delete(f"/v1/images/{name}").status_code == 404
        for bad in ("Bad Reference", "", "x" * 2000, "-leading/dash", "sha256:" + "0" * 64):
            resp = api.post("/v1/images", json={"reference": bad})
            assert resp.status_code == 422, (bad, resp.text)
        create = api.post("/v1/sandboxes", json={"image": f"{registry.host}/api/nope:1"})
        assert create.status_code == 422 and error(create)["details"], create.text
        by_id = api.post("/v1/sandboxes", json={"image": "sha256:" + "1" * 64})
        assert by_id.status_code == 422, by_id.text
        both = api.post("/v1/sandboxes", json={"image": "a.example/x:1", "template": "other"})
        assert both.status_code == 422 and "template" in both.text
        assert api.get("/v1/sandboxes").json()["items"] == []


def test_a_blob_that_does_not_match_its_digest_leaves_nothing(
    server: Server, registry: Registry, tmp_path: Path
) -> None:
    built = BuiltImage([layer_tar({"tampered": b"original content\n"})])
    ref = push(registry, tmp_path, "api/tampered:1", built)
    data = registry.blob_data(built.layer_digests[0])
    blob = bytearray(data.read_bytes())
    blob[-5] ^= 0xFF
    data.write_bytes(bytes(blob))
    with server.client() as api:
        resp = api.post("/v1/images", json={"reference": ref})
        assert resp.status_code == 502, resp.text
        assert error(resp)["code"] == "digest_mismatch"
        assert built.config_digest not in {i["id"] for i in api.get("/v1/images").json()["items"]}
    assert built.config_digest not in store_records(server)
    blobs = server.data_dir / "images" / "blobs" / "sha256"
    assert not (blobs / built.layer_digests[0].removeprefix("sha256:")).exists()


def test_a_hostile_layer_is_refused_and_nothing_is_left(
    server: Server, registry: Registry, tmp_path: Path
) -> None:
    hostile = BuiltImage([BASE, layer_tar({"../escape": b"pwned"})])
    archive = hostile.oci_archive(tmp_path / "hostile.tar").read_bytes()
    with server.client() as api:
        imported = api.post("/v1/images/import", content=archive)
        assert imported.status_code == 422, imported.text
        assert error(imported)["code"] == "hostile_layer"
        # The same from a registry.
        ref = push(registry, tmp_path, "api/hostile:1", hostile)
        pulled = api.post("/v1/images", json={"reference": ref})
        assert pulled.status_code == 422 and error(pulled)["code"] == "hostile_layer"
        assert hostile.config_digest not in {i["id"] for i in api.get("/v1/images").json()["items"]}
    assert hostile.config_digest not in store_records(server)
    layers = server.data_dir / "images" / "layers"
    assert not (layers / hostile.diff_ids[1].removeprefix("sha256:")).exists()
    assert not (server.data_dir / "images" / "escape").exists()
    assert not (server.data_dir / "escape").exists()


HOSTILE = [
    ("dotdot", [E("../escape", data=b"pwned")], 422, "hostile_layer"),
    ("absolute", [E("/tmp/corral-escape", data=b"pwned")], 422, "hostile_layer"),
    (
        "through-a-symlink-out",
        [sym("l", "{victim}"), E("l/x", data=b"pwned")],
        422,
        "hostile_layer",
    ),
    ("hard-link-out", [hard("p", "/etc/passwd")], 422, "hostile_layer"),
    ("hard-link-dotdot", [hard("p", "../x")], 422, "hostile_layer"),
    ("hard-link-to-nothing", [hard("p", "etc/passwd")], 422, "bad_layer"),
    ("name-too-long", [E("a" * 300, data=b"x")], 413, "image_too_large"),
]


@pytest.mark.parametrize(
    ("entries", "status", "code"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE]
)
def test_hostile_layers_in_an_archive(
    server: Server, tmp_path: Path, entries: list[E], status: int, code: str
) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    entries = [
        E(e.name, e.kind, e.data, e.link.replace("{victim}", str(victim)), e.mode) for e in entries
    ]
    hostile = BuiltImage([BASE, layer(*entries)])
    with server.client() as api:
        resp = api.post(
            "/v1/images/import", content=hostile.oci_archive(tmp_path / "h.tar").read_bytes()
        )
        assert resp.status_code == status, resp.text
        assert error(resp)["code"] == code
    assert hostile.config_digest not in store_records(server)
    layers = server.data_dir / "images" / "layers"
    assert not (layers / hostile.diff_ids[1].removeprefix("sha256:")).exists()
    assert list(victim.iterdir()) == []
    assert not Path("/tmp/corral-escape").exists()


def test_import_archives(server: Server, tmp_path: Path) -> None:
    oci = BuiltImage([BASE, APP], {"Cmd": ["oci"]})
    docker = BuiltImage([BASE], {"Cmd": ["docker"]})
    with server.client() as api:
        first = api.post(
            "/v1/images/import",
            content=oci.oci_archive(tmp_path / "oci.tar", ref="example.com/api/oci:2").read_bytes(),
        )
        assert first.status_code == 201, first.text
        assert first.json()["id"] == oci.config_digest
        assert first.json()["references"] == ["example.com/api/oci:2"]
        saved = docker.docker_archive(tmp_path / "docker.tar", "example.com/api/docker:1")
        named = api.post(
            "/v1/images/import",
            params={"reference": "example.com/api/renamed:3"},
            content=saved.read_bytes(),
        )
        assert named.status_code == 201, named.text
        assert named.json()["references"] == ["example.com/api/renamed:3"]
        got = api.get("/v1/images/example.com/api/renamed:3")
        # skopeo rewrites a docker config as an OCI one (another digest), the same image.
        assert got.json() == named.json() and got.json()["cmd"] == ["docker"]
        garbage = api.post("/v1/images/import", content=b"not a tar at all" * 100)
        assert garbage.status_code == 422 and error(garbage)["code"] == "bad_archive"
        empty = api.post("/v1/images/import", content=b"")
        assert empty.status_code == 400, empty.text
        too_big = api.post("/v1/images/import", content=b"\0" * (MAX_IMAGE_BYTES + 1))
        assert too_big.status_code == 413, too_big.text

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            for _ in range(MAX_IMAGE_BYTES // 65536 + 2):
                yield b"\0" * 65536

        streamed = api.post("/v1/images/import", content=chunks())
        assert streamed.status_code == 413, streamed.text
        bad_ref = api.post("/v1/images/import", params={"reference": "Bad Ref"}, content=b"x")
        assert bad_ref.status_code == 422
        ids = {first.json()["id"], named.json()["id"]}
        for image_id in ids:
            assert api.delete(f"/v1/images/{image_id}").status_code == 204
    assert not any((server.data_dir / "image-uploads").iterdir())
    assert store_records(server) & ids == set()


@pytest.mark.sandbox
def test_a_sandbox_from_an_image(server: Server, registry: Registry, tmp_path: Path) -> None:
    built = BuiltImage([BASE, shell_layer(), APP], CONFIG)
    ref = push(registry, tmp_path, "api/sandboxed:1", built)
    with server.client() as api:
        # Not on the node yet: the create pulls it.
        made = api.post("/v1/sandboxes", json={"image": ref, "env": {"GREETING": "mine"}})
        assert made.status_code == 201, made.text
        sandbox = made.json()
        assert (sandbox["image"], sandbox["image_id"]) == (ref, built.config_digest)
        sid = sandbox["id"]
        assert api.get(f"/v1/images/{ref}").json()["used_by"] == [sid]
        run = api.post(
            f"/v1/sandboxes/{sid}/exec",
            json={"command": 'echo "$GREETING|$ONLY_IMAGE|$PATH"; pwd'},
        )
        assert run.status_code == 200, run.text
        # The request's env wins over the image's; PATH and WorkingDir are the image's.
        assert run.json()["stdout"] == "mine|1|/opt/img/bin:/usr/bin:/bin\n/tmp\n", (
            run.json()["status"],
            run.json()["stderr"],
            run.json().get("error"),
        )
        here = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": "pwd", "cwd": "/workspace"})
        assert here.json()["stdout"] == "/workspace\n"
        busy = api.delete(f"/v1/images/{ref}")
        assert busy.status_code == 409 and sid in error(busy)["message"]
        # By id, a second sandbox of the same image.
        second = api.post("/v1/sandboxes", json={"image": built.config_digest})
        assert second.status_code == 201 and second.json()["image_id"] == built.config_digest
        for s in (sid, second.json()["id"]):
            assert api.delete(f"/v1/sandboxes/{s}").status_code == 200
        assert api.delete(f"/v1/images/{ref}").status_code == 204


@pytest.mark.sandbox
def test_a_sandbox_runs_on_the_images_root_as_its_user(
    server: Server, registry: Registry, tmp_path: Path
) -> None:
    built = BuiltImage(
        [host_tools_layer("bash", "cat", "id", "ls", "wc"), OS_RELEASE, APP],
        {**CONFIG, "WorkingDir": "/app"},
    )
    ref = push(registry, tmp_path, "api/rooted:1", built)
    with server.client() as api:
        made = api.post("/v1/sandboxes", json={"image": ref})
        assert made.status_code == 201, made.text
        sid = made.json()["id"]
        run = api.post(
            f"/v1/sandboxes/{sid}/exec",
            json={"command": "cat /etc/os-release /app/a.txt; pwd; id -u; ls /usr/bin | wc -l"},
        )
        # The image's root, not the host's: its /usr/bin holds its five programs only.
        assert run.json()["stdout"] == "ID=corraltest\na\n/app\n1000\n5\n", run.json()
        api.delete(f"/v1/sandboxes/{sid}")
        api.delete(f"/v1/images/{ref}")


def test_sdk_and_cli(
    server: Server, registry: Registry, auth_registry: Registry, tmp_path: Path
) -> None:
    built = BuiltImage([BASE], {"Env": ["FROM_SDK=1"]})
    ref = push(registry, tmp_path, "api/sdk:1", built)
    with Client(server.url, token=server.admin_key) as sdk:
        image = sdk.pull_image(ref)
        assert image.id == built.config_digest and image.references == [ref]
        assert sdk.get_image(ref) == image and sdk.get_image(image) == image
        assert image.id in {i.id for i in sdk.list_images()}
        with pytest.raises(NotFoundError):
            sdk.get_image("sha256:" + "2" * 64)
        archive = BuiltImage([APP], {"Cmd": ["imported"]})
        path = archive.oci_archive(tmp_path / "sdk.tar")
        imported = sdk.import_image(path, reference="example.com/api/sdk-import:1")
        assert imported.references == ["example.com/api/sdk-import:1"]
        sdk.delete_image(imported)
        with pytest.raises(NotFoundError):
            sdk.get_image(imported.id)

    async def the_async_client() -> None:
        async with AsyncClient(server.url, token=server.admin_key) as client:
            again = await client.import_image(path, reference="example.com/api/async:1")
            assert await client.get_image("example.com/api/async:1") == again
            assert again.id in {i.id for i in await client.list_images(node="local")}
            assert (await client.pull_image(ref)).id == image.id
            await client.delete_image(again)
            with pytest.raises(NotFoundError):
                await client.get_image(again.id)

    asyncio.run(the_async_client())
    # The CLI: ls, inspect, import, rm; a pull with credentials from stdin.
    listed = run_cli(server, "image", "ls")
    assert listed.returncode == 0 and built.config_digest.removeprefix("sha256:")[:12] in (
        listed.stdout
    ), listed.stderr
    shown = run_cli(server, "image", "inspect", ref)
    assert shown.returncode == 0 and json.loads(shown.stdout)["id"] == built.config_digest
    cli_archive = BuiltImage([APP], {"Cmd": ["cli"]}).docker_archive(
        tmp_path / "cli.tar", "example.com/api/cli:1"
    )
    done = run_cli(server, "image", "import", str(cli_archive))
    assert done.returncode == 0 and done.stdout.strip().startswith("sha256:"), done.stderr
    assert run_cli(server, "image", "rm", "example.com/api/cli:1").returncode == 0
    private = push(auth_registry, tmp_path, "private/cli:1", built, creds="alice:s3cret-pw")
    pulled = run_cli(
        server, "image", "pull", private, "-u", "alice", "--password-stdin", stdin="s3cret-pw\n"
    )
    assert pulled.returncode == 0 and pulled.stdout.strip() == built.config_digest, pulled.stderr
    refused = run_cli(server, "image", "pull", private)
    assert refused.returncode != 0 and "registry" in refused.stderr.lower()
    assert run_cli(server, "image", "rm", ref).returncode == 0
    with Client(server.url, token=server.admin_key) as sdk:
        assert built.config_digest not in {i.id for i in sdk.list_images()}


@pytest.mark.sandbox
def test_sdk_sandbox_from_an_image_and_delete_while_used(
    server: Server, registry: Registry, tmp_path: Path
) -> None:
    built = BuiltImage([BASE, shell_layer()], {"Env": ["FROM_SDK=yes"]})
    ref = push(registry, tmp_path, "api/sdk-box:1", built)
    with Client(server.url, token=server.admin_key) as sdk:
        box = sdk.create_sandbox(image=ref)
        assert box.image == ref and box.image_id == built.config_digest
        assert sdk.exec(box.id, "echo $FROM_SDK").stdout == "yes\n"
        with pytest.raises(ConflictError):
            sdk.delete_image(ref)
        cli = run_cli(server, "sandbox", "create", "--image", ref, "--json")
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout)["image_id"] == built.config_digest
        for sid in (box.id, json.loads(cli.stdout)["id"]):
            sdk.delete_sandbox(sid)
        sdk.delete_image(ref)


@pytest.mark.sandbox
def test_a_snapshot_of_a_sandbox_from_an_image(
    server: Server, registry: Registry, tmp_path: Path
) -> None:
    built = BuiltImage([BASE, host_tools_layer("bash", "cat")], {"Env": ["FROM_IMAGE=1"]})
    ref = push(registry, tmp_path, "api/snapped:1", built)
    with server.client() as api:
        source = api.post("/v1/sandboxes", json={"image": ref}).json()
        wrote = api.post(
            f"/v1/sandboxes/{source['id']}/exec",
            json={"command": "echo kept > /etc/kept && echo w > /workspace/w", "user": "root"},
        )
        assert wrote.json()["exit_code"] == 0, wrote.text
        snap = api.post(f"/v1/sandboxes/{source['id']}/snapshots", json={})
        assert snap.status_code == 201, snap.text
        assert snap.json()["image"] == built.config_digest
        made = api.post("/v1/sandboxes", json={"snapshot": snap.json()["id"]})
        assert made.status_code == 201, made.text
        assert made.json()["image_id"] == built.config_digest
        seen = api.post(
            f"/v1/sandboxes/{made.json()['id']}/exec",
            json={"command": "cat /etc/kept /workspace/w /etc/os-release; echo $FROM_IMAGE"},
        )
        assert seen.json()["stdout"] == "kept\nw\nID=corraltest\n1\n", seen.text
        for sid in (made.json()["id"], source["id"]):
            api.delete(f"/v1/sandboxes/{sid}")
        assert api.delete(f"/v1/snapshots/{snap.json()['id']}").status_code == 204
        assert api.delete(f"/v1/images/{ref}").status_code == 204
