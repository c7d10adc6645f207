"""Sandboxes from an image, driven through the namespaces runtime itself: a copy-on-write root
over the image's layers (idmapped into each sandbox's uids), the image's User, the disk limit
over the whole root, and snapshots that sandboxes start from without copying them."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral.runtime.base import Limits
from corral.runtime.snapshots import SnapshotError
from tests.host_image import host_image
from tests.integration.image_nodes import Node, image_node, run

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def image_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return host_image().oci_archive(tmp_path_factory.mktemp("image") / "host.tar")


@pytest.fixture
async def node(image_archive: Path) -> AsyncIterator[Node]:
    async with image_node(image_archive) as made:
        yield made


async def test_the_root_is_the_images_and_writable_per_sandbox(node: Node) -> None:
    first = await node.start(node.config())
    code, out, _ = await run(first, "cat /etc/os-release; stat -c '%u %U' /var/cache/apt-owned /")
    assert code == 0 and out == "ID=corral-test\n42 _apt\n0 root\n", out
    # No User in the image: commands run as the sandbox's root (unprivileged on the host).
    code, out, _ = await run(first, "id -u; echo new > /usr/bin/added; rm /etc/os-release")
    assert (code, out) == (0, "0\n")
    second = await node.start(node.config())
    code, out, _ = await run(second, "ls /usr/bin/added; cat /etc/os-release")
    assert code == 0 and "No such file" not in out and "ID=corral-test" in out
    code, out, err = await run(second, "cat /usr/bin/added")
    assert code == 1 and "No such file" in err
    # The mounts say nothing of the node's directories.
    _, mountinfo, _ = await run(first, "cat /proc/self/mountinfo")
    assert str(node.runtime.data_dir) not in mountinfo
    assert " / / " in mountinfo and "lowerdir=l0:l1,upperdir=root-upper" in mountinfo


async def test_changes_survive_a_restart_and_not_the_sandbox(node: Node) -> None:
    config = node.config()
    sandbox = await node.start(config)
    assert (await run(sandbox, "echo kept > /etc/kept; echo w > /workspace/w"))[0] == 0
    await sandbox.stop()
    sandbox = await node.start(config)
    code, out, _ = await run(sandbox, "cat /etc/kept /workspace/w")
    assert (code, out) == (0, "kept\nw\n")
    await sandbox.stop()
    await node.runtime.remove_files(config)
    assert not config.dir.exists()


async def test_the_images_user_and_the_sandboxs_uids(node: Node) -> None:
    sandbox = await node.start(node.config(user="web"))
    code, out, _ = await run(sandbox, "id -un; id -u; touch /workspace/mine; stat -c %U /workspace")
    assert (code, out) == (0, "web\n33\nweb\n")
    # sudo is the sandbox's root, which may become any user of the image.
    code, out, _ = await run(sandbox, "id -u; chown 42:42 /tmp; stat -c %u /tmp", user="root")
    assert (code, out) == (0, "0\n42\n")
    _, uid_map, _ = await run(sandbox, "cat /proc/self/uid_map")
    assert [line.split()[0] for line in uid_map.splitlines()] == ["0", "65520"]
    numeric = await node.start(node.config(user="1000:33"))
    assert (await run(numeric, "id -u; id -g"))[1] == "1000\n33\n"


@pytest.mark.parametrize("user", ["nosuch", "far", "1000:nogroup"])
async def test_a_user_the_sandbox_cannot_be_is_refused_at_start(node: Node, user: str) -> None:
    with pytest.raises(RuntimeError, match="did not start") as caught:
        await node.start(node.config(user=user))
    assert str(node.runtime.data_dir) not in str(caught.value)


async def test_the_disk_limit_covers_the_root(node: Node) -> None:
    sandbox = await node.start(node.config(limits=Limits(disk_mb=32)))
    code, _, err = await run(
        sandbox, "dd if=/dev/zero of=/usr/big bs=1M count=48 status=none", user="root"
    )
    assert code != 0 and "No space left" in err
    assert (await run(sandbox, "rm /usr/big; echo ok > /usr/small", user="root"))[0] == 0


async def test_snapshots_start_sandboxes_that_diverge(node: Node) -> None:
    source_config = node.config(user="user", limits=Limits(disk_mb=64))
    source = await node.start(source_config)
    setup = (
        "echo base > /etc/base; rm /etc/os-release; mkdir /opt; echo y > /opt/y; "
        "chown 42:42 /opt/y; ln -s /etc/base /opt/link"
    )
    assert (await run(source, setup, user="root"))[0] == 0
    assert (await run(source, "echo w > /workspace/w; dd if=/dev/zero of=/workspace/big "
                              "bs=1M count=8 status=none"))[0] == 0  # fmt: skip
    size = await node.runtime.snapshot(source_config, "snap1")
    assert 8 * 1024 * 1024 <= size < 10 * 1024 * 1024
    # The source runs on, unfrozen, and what it does next is not in the snapshot.
    assert (await run(source, "echo later > /workspace/later"))[0] == 0

    copies = []
    for _ in range(2):
        copy = await node.start(node.config(user="user", snapshot="snap1"))
        copies.append(copy)
        _, out, err = await run(
            copy, "cat /etc/base /workspace/w; stat -c %u /opt/y; readlink /opt/link; "
                  "ls /workspace; ls /etc/os-release",
        )  # fmt: skip
        assert out == "base\nw\n42\n/etc/base\nbig\nw\n" and "No such file" in err, (out, err)
    assert (await run(copies[0], "echo one > /workspace/w; echo one > /etc/base", user="root"))[
        0
    ] == 0
    assert (await run(copies[1], "cat /workspace/w /etc/base"))[1] == "w\nbase\n"
    # Shared, not copied: each copy's own layers hold only what it changed.
    for config, _ in node.started[1:]:
        assert not any((config.dir / "cow" / "root-upper").glob("opt"))

    # A snapshot of a copy holds only its own changes, over its parent's.
    copy_config = node.started[1][0]
    assert await node.runtime.snapshot(copy_config, "snap2") < 1024 * 1024
    grandchild = await node.start(node.config(user="user", snapshot="snap2"))
    assert (await run(grandchild, "cat /workspace/w /etc/base /opt/y"))[1] == "one\none\ny\n"
    # Removing the parent keeps its files while a snapshot builds on them.
    await node.runtime.remove_snapshot("snap1")
    snapshots_dir = node.runtime.snapshots_dir
    assert (snapshots_dir / "snap1" / "deleted").exists()
    another = await node.start(node.config(user="user", snapshot="snap2"))
    assert (await run(another, "cat /opt/y"))[1] == "y\n"
    for config, handle in node.started[3:]:
        await handle.stop()
        await node.runtime.remove_files(config)
    del node.started[3:]
    await node.runtime.remove_snapshot("snap2")
    assert not (snapshots_dir / "snap1").exists() and not (snapshots_dir / "snap2").exists()


async def test_what_cannot_be_snapshotted(node: Node) -> None:
    stopped_config = node.config()
    stopped = await node.start(stopped_config)
    await stopped.stop()
    with pytest.raises(SnapshotError, match="not running"):
        await node.runtime.snapshot(stopped_config, "s")
    with pytest.raises(RuntimeError, match="not on this node"):
        await node.start(node.config(snapshot="missing"))
    assert not (node.runtime.snapshots_dir / "s").exists()


async def test_a_snapshot_is_consistent_while_the_sandbox_writes(node: Node) -> None:
    config = node.config(user="user")
    sandbox = await node.start(config)
    # Two files written in lockstep, for three seconds: a copy taken mid-write would see them
    # differ by more than the one write between them.
    writer = asyncio.ensure_future(run(sandbox, (
        "end=$((SECONDS+3)); i=0; while [ $SECONDS -lt $end ]; do i=$((i+1)); "
        "echo $i >> /workspace/a; echo $i >> /workspace/b; done"
    )))  # fmt: skip
    await asyncio.sleep(0.3)
    await node.runtime.snapshot(config, "mid")
    await writer
    snap = node.runtime.snapshot_dir("mid") / "workspace"
    a, b = ((snap / name).read_text().count("\n") for name in ("a", "b"))
    assert a > 0 and a - b in (0, 1), (a, b)
    assert os.stat(snap / "a").st_uid == 1000  # stored with the uids inside


async def test_home_and_user_come_from_the_images_passwd(node: Node) -> None:
    sandbox = await node.start(node.config(user="web", env={"FROM_CONFIG": "1"}))
    code, out, _ = await run(sandbox, "echo $HOME $USER $LOGNAME $FROM_CONFIG")
    assert (code, out) == (0, "/var/www web web 1\n")
    code, out, _ = await run(sandbox, "echo $HOME $USER", user="root")
    assert (code, out) == (0, "/root root\n")
