"""A sandbox from a real Debian image (mmdebstrap-built, tests/debian_image.py): its root
installs a package with apt-get, adds users and switches to them, and none of it reaches a
second sandbox of the same image."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from corral import Client
from corral.runtime.base import Limits
from tests.conftest import Server, make_data_dir
from tests.deb_packages import HELLO_MARKER, HELLO_OUTPUT
from tests.debian_image import DebianImage
from tests.engines import Registry
from tests.integration.image_nodes import Node, image_node, run
from tests.integration.test_sdk_cli import run_cli

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def node(
    debian_image: DebianImage, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Node]:
    archive = await asyncio.to_thread(
        debian_image.oci_archive, tmp_path_factory.mktemp("debian") / "debian.tar"
    )
    async with image_node(archive) as made:
        yield made


def put(node: Node, index: int, source: Path) -> str:
    """Copy a file into the workspace of the node's `index`th sandbox; its path inside."""
    config = node.started[index][0]
    target = node.runtime.workspace(config) / source.name
    shutil.copyfile(source, target)
    os.chown(target, node.runtime.host_uid(config), node.runtime.host_uid(config))
    return f"/workspace/{source.name}"


async def test_apt_get_install_and_useradd_in_a_debian_sandbox(
    node: Node, corral_hello_deb: Path
) -> None:
    first = await node.start(node.config(limits=Limits(disk_mb=512)))
    deb = put(node, 0, corral_hello_deb)
    code, out, err = await run(first, f"apt-get install -y {deb}", user="root")
    assert code == 0, out + err
    code, out, _ = await run(first, f"corral-hello; cat {HELLO_MARKER}; dpkg -s corral-hello")
    assert code == 0 and out.startswith(f"{HELLO_OUTPUT}\nconfigured"), out
    assert "Status: install ok installed" in out

    code, out, err = await run(
        first, "useradd -m alice && su alice -c 'touch ~/x; id -un' && stat -c %U /home/alice/x",
        user="root",
    )  # fmt: skip
    assert (code, out) == (0, "alice\nalice\n"), err
    code, out, _ = await run(first, "echo $HOME; getent passwd alice", user="root")
    assert out.startswith("/root\nalice:x:") and ":/home/alice:" in out, out

    second = await node.start(node.config())
    code, out, err = await run(second, "dpkg -s corral-hello; id alice; ls -A /home")
    assert "not installed" in err and "no such user" in err and out == "", (out, err)


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    reg = Registry().start()
    yield reg
    reg.stop()


@pytest.mark.registry
def test_through_the_api_the_sdk_and_the_cli(
    debian_image: DebianImage, corral_hello_deb: Path, registry: Registry
) -> None:
    """The same, as a user does it: the image pulled from a registry, the .deb uploaded, the
    commands run as the sandbox's root; the CLI lists the image."""
    ref = debian_image.push(f"{registry.host}/corral/debian:bookworm")
    srv = Server(
        make_data_dir("corral-test-debian-"), env={"CORRAL_INSECURE_REGISTRIES": registry.host}
    )
    srv.start()
    try:
        with Client(srv.url, token=srv.admin_key, timeout=300) as sdk:
            image = sdk.pull_image(ref)
            assert image.references == [ref] and image.user == ""
            listed = run_cli(srv, "image", "ls")
            assert listed.returncode == 0 and image.id.removeprefix("sha256:")[:12] in listed.stdout
            first = sdk.create_sandbox(image=ref, disk_mb=1024)
            sdk.write_file(first.id, "/workspace/hello.deb", corral_hello_deb.read_bytes())
            installed = sdk.exec(first.id, "apt-get install -y ./hello.deb", user="root",
                                 timeout_ms=300_000)  # fmt: skip
            assert installed.exit_code == 0, installed.stdout + installed.stderr
            assert sdk.exec(first.id, "corral-hello").stdout == f"{HELLO_OUTPUT}\n"
            users = sdk.exec(
                first.id, "useradd -m alice && su alice -c 'touch ~/x' && ls /home/alice",
                user="root",
            )  # fmt: skip
            assert (users.exit_code, users.stdout) == (0, "x\n"), users.stderr
            second = sdk.create_sandbox(image=ref)
            missing = sdk.exec(second.id, "command -v corral-hello || id alice || echo clean")
            assert missing.stdout.strip().endswith("clean"), missing
            for box in (first, second):
                sdk.delete_sandbox(box.id)
            sdk.delete_image(ref)
    finally:
        srv.stop()
        shutil.rmtree(srv.data_dir, ignore_errors=True)
