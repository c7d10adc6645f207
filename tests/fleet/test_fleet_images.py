"""Images in a fleet: each lives in one node's store; listing says which, and a sandbox from an
image goes to a node that has it. Pulls and imports go through the node protocol (an import's
archive crosses NATS in pieces)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.runtime import images
from tests.engines import PostgresCluster, Registry
from tests.fleet.fleet import Fleet
from tests.host_image import shell_layer
from tests.oci_images import BuiltImage, layer_tar

pytestmark = pytest.mark.registry

BASE = layer_tar({"etc/": None, "etc/os-release": b"ID=fleetimage\n", "big": b"z" * 3_000_000})


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    reg = Registry(listen_address="0.0.0.0").start()  # the hosts reach it at their gateway
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def fleet(postgres: PostgresCluster) -> Iterator[Fleet]:
    running = Fleet(postgres, nodes=("n1", "n2")).start()
    yield running
    running.stop()


def test_an_image_lives_on_its_node_and_its_sandboxes_go_there(
    fleet: Fleet, registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # n2 reaches the plain-HTTP registry at its gateway; only there is it insecure.
    from_n2 = f"{fleet.hosts['n2'].gateway}:{registry.port}"
    monkeypatch.setenv("CORRAL_INSECURE_REGISTRIES", from_n2)
    agent = fleet.agents["n2"]
    # An image put in n2's store behind the fleet's back: listed once n2 registers again.
    local = BuiltImage([layer_tar({"local": b"1"})], {"Cmd": ["local"]})
    images.import_archive(
        local.oci_archive(tmp_path / "local.tar"), agent.data_dir / "images",
        reference="example.com/fleet/local:1",
    )  # fmt: skip
    with fleet.client(0) as api:
        epoch = api.get("/v1/nodes/n2").json()["epoch"]
        agent.stop()
        agent.start()
        deadline = time.monotonic() + 60
        while api.get("/v1/nodes/n2").json()["epoch"] == epoch:  # registered again
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.1)
    fleet.wait_online("n2")
    with fleet.client(1) as api:
        deadline = time.monotonic() + 30
        while not api.get("/v1/images", params={"node": "n2"}).json()["items"]:
            assert time.monotonic() < deadline, "n2's images were not listed after it registered"
            time.sleep(0.1)
        assert api.delete("/v1/images/example.com/fleet/local:1").status_code == 204
    pulled_image = BuiltImage([BASE, shell_layer()], {"Env": ["FROM=pull"], "WorkingDir": "/tmp"})
    pulled_image.push(tmp_path / "push", f"{registry.host}/fleet/app:1")
    ref = f"{from_n2}/fleet/app:1"
    with fleet.client(0) as a, fleet.client(1) as b:
        pulled = a.post("/v1/images", json={"reference": ref, "node": "n2"})
        assert pulled.status_code == 201, pulled.text
        assert (
            pulled.json()["node_id"] == "n2" and pulled.json()["id"] == pulled_image.config_digest
        )
        # n1 is not allowed plain HTTP to that registry: a clear refusal, nothing kept.
        refused = b.post("/v1/images", json={"reference": ref, "node": "n1"})
        assert refused.status_code == 502, refused.text
        # An archive imported on n1 through the other replica (3 MB: several pieces).
        imported_image = BuiltImage([BASE], {"Env": ["FROM=import"]})
        archive = imported_image.oci_archive(tmp_path / "img.tar", ref="example.com/fleet/imp:1")
        imported = b.post("/v1/images/import", params={"node": "n1"}, content=archive.read_bytes())
        assert imported.status_code == 201, imported.text
        assert imported.json()["node_id"] == "n1"
        listed = {(i["id"], i["node_id"]) for i in a.get("/v1/images").json()["items"]}
        assert listed == {
            (pulled_image.config_digest, "n2"),
            (imported.json()["id"], "n1"),
        }
        # Placement follows the image, by reference or by id, whichever replica is asked.
        placed = []
        for api, image in ((a, ref), (b, pulled_image.config_digest), (a, ref)):
            made = api.post("/v1/sandboxes", json={"image": image})
            assert made.status_code == 201 and made.json()["node_id"] == "n2", made.text
            placed.append(made.json()["id"])
        run = b.post(f"/v1/sandboxes/{placed[0]}/exec", json={"command": "echo $FROM; pwd"})
        assert run.json()["stdout"] == "pull\n/tmp\n", run.text
        on_n1 = a.post("/v1/sandboxes", json={"image": "example.com/fleet/imp:1"})
        assert on_n1.status_code == 201 and on_n1.json()["node_id"] == "n1", on_n1.text
        placed.append(on_n1.json()["id"])
        # An id n1 lacks cannot be pulled there.
        elsewhere = a.post(
            "/v1/sandboxes", json={"image": pulled_image.config_digest, "node": "n1"}
        )
        assert elsewhere.status_code == 422 and "n1" in elsewhere.text
        busy = b.delete(f"/v1/images/{ref}")
        assert busy.status_code == 409, busy.text
        for sid in placed:
            assert a.delete(f"/v1/sandboxes/{sid}").status_code == 200
        assert b.delete(f"/v1/images/{ref}").status_code == 204
        assert a.delete("/v1/images/example.com/fleet/imp:1").status_code == 204
        assert a.get("/v1/images").json()["items"] == []
    for node in ("n1", "n2"):
        records = fleet.agents[node].data_dir / "images" / "images"
        assert list(records.iterdir()) == []
        assert not any((fleet.agents[node].data_dir / "images" / "tmp").iterdir())
