"""A sandbox made by a version before copy-on-write roots and per-slot uid blocks starts again
with its files: the earlier layout (its own etc/, usr-local/, workspace/ over a read-only
/usr), its files handed to its slot's new uids."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from corral.runtime.base import SandboxConfig
from corral.runtime.namespaces import NamespacesRuntime
from tests.conftest import make_data_dir, next_uid_block
from tests.integration.image_nodes import run

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_old_sandbox(config: SandboxConfig, uid_base: int) -> None:
    """The directories an earlier version left: files/ with etc, usr-local and workspace,
    owned by the slot's two old host uids (root: base + 2 x slot, user: the next)."""
    old_root, old_user = uid_base + 2 * config.slot, uid_base + 2 * config.slot + 1
    files = config.dir / "files"
    for name in ("etc", "usr-local", "workspace", "workspace/project"):
        (files / name).mkdir(parents=True)
    (files / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/usr/sbin/nologin\nuser:x:1000:1000::/workspace:/bin/bash\n"
    )
    (files / "workspace" / "project" / "notes").write_text("kept\n")
    (files / "usr-local" / "tool").write_text("#!/bin/sh\necho tool\n")
    os.chmod(files / "usr-local" / "tool", 0o755)
    for path in [*(files / "etc").rglob("*"), files / "etc", files / "usr-local",
                 files / "usr-local" / "tool"]:  # fmt: skip
        os.chown(path, old_root, old_root)
    for path in [files / "workspace", *(files / "workspace").rglob("*")]:
        os.chown(path, old_user, old_user)
    os.chown(config.dir, old_user, old_user)


async def test_an_old_sandbox_keeps_its_layout_and_files() -> None:
    data = make_data_dir("corral-legacy-")
    uid_base = next_uid_block()
    runtime = NamespacesRuntime(
        data_dir=data, uid_base=uid_base, cgroup_name="corral-test-" + data.name
    )
    await runtime.prepare()
    config = SandboxConfig(id="old", slot=3, dir=data / "sandboxes" / "old")
    await asyncio.to_thread(make_old_sandbox, config, uid_base)
    sandbox = await runtime.start(config)
    try:
        assert not runtime.overlay_root(config)
        code, out, err = await run(
            sandbox, "cat project/notes; echo more >> project/notes; /usr/local/tool; "
                     "stat -c %u project/notes",
        )  # fmt: skip
        assert (code, out) == (0, "kept\ntool\n1000\n"), err
        # Its /usr is still the host's, read-only even to its root.
        code, _, _ = await run(sandbox, "touch /usr/bin/corral-legacy-probe", user="root")
        assert code != 0
        owner = os.stat(config.dir / "files" / "workspace" / "project" / "notes").st_uid
        assert owner == runtime.host_uid(config)
    finally:
        await sandbox.stop()
        await runtime.remove_files(config)
        await runtime.close()
        await asyncio.to_thread(
            subprocess.run, ["rm", "-rf", "--one-file-system", str(data)], check=False
        )
    assert not await asyncio.to_thread(Path(config.dir).exists)
