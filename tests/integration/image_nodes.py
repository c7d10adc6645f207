"""A namespaces runtime of its own, with an image imported, for tests that drive sandboxes from
images through the runtime itself (no server)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from corral.runtime import images
from corral.runtime.base import ProcessSpec, SandboxConfig, SandboxHandle
from corral.runtime.namespaces import NamespacesRuntime
from tests.conftest import make_data_dir, next_uid_block


class Node:
    def __init__(self, runtime: NamespacesRuntime, image: images.Image) -> None:
        self.runtime = runtime
        self.image = image
        self.started: list[tuple[SandboxConfig, SandboxHandle]] = []
        self._slot = 0

    def config(self, **fields: object) -> SandboxConfig:
        self._slot += 1
        name = f"sbx{self._slot}"
        fields.setdefault("image", self.image.id)
        return SandboxConfig(
            id=name, slot=self._slot, dir=self.runtime.data_dir / "sandboxes" / name, **fields
        )  # type: ignore[arg-type]

    async def start(self, config: SandboxConfig) -> SandboxHandle:
        handle = await self.runtime.start(config)
        self.started.append((config, handle))
        return handle


@contextlib.asynccontextmanager
async def image_node(image_archive: Path) -> AsyncIterator[Node]:
    """A runtime with the image of `image_archive` imported; every sandbox started through
    it is stopped and removed at the end, and nothing may stay mounted."""
    data = make_data_dir("corral-imageroot-")
    runtime = NamespacesRuntime(
        data_dir=data, uid_base=next_uid_block(), cgroup_name="corral-test-" + data.name
    )
    await runtime.prepare()
    image = await asyncio.to_thread(
        images.import_archive, image_archive, runtime.images_dir, reference="test/host:1"
    )
    node = Node(runtime, image)
    try:
        yield node
    finally:
        for config, handle in node.started:
            await handle.stop()
            await runtime.remove_files(config)
        await runtime.close()
        mounts = await asyncio.to_thread(Path("/proc/self/mounts").read_text)
        await asyncio.to_thread(
            subprocess.run, ["rm", "-rf", "--one-file-system", str(data)], check=False
        )
        left = [line for line in mounts.splitlines() if str(data) in line]
        assert left == [], left


async def run(
    sandbox: SandboxHandle, script: str, *, user: str = "user"
) -> tuple[int | None, str, str]:
    spec = ProcessSpec(
        id=uuid.uuid4().hex[:12], argv=["/bin/bash", "-c", script],
        env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
        cwd="/workspace", user=user,
    )  # fmt: skip
    process = await sandbox.spawn(spec)
    if process.stdin_fd is not None:
        os.close(process.stdin_fd)

    def drain(fd: int | None) -> bytes:
        if fd is None:
            return b""
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
        os.close(fd)
        return data

    out, err = await asyncio.gather(
        asyncio.to_thread(drain, process.stdout_fd), asyncio.to_thread(drain, process.stderr_fd)
    )
    status = await process.wait()
    return status.exit_code, out.decode(), err.decode()
