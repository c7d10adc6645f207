"""Snapshots: how long a capture takes, how long a sandbox takes to start from one, and how
much disk the sandboxes started from one take.

    .venv/bin/python -m bench.snapshots [--workspace-mb 1024] [--sandboxes 10]
        [--image REF | --image-archive debian.tar] [--put hello.deb:/workspace/hello.deb]
        [--setup 'apt-get install -y ./hello.deb' --setup-user root]

A source sandbox fills its workspace with `--workspace-mb` MiB of random data (nothing for a
file system to compress or share by accident) and runs `--setup`, if given; the snapshot of it
is timed, then `--sandboxes` sandboxes are started from it one after the other, each checked
to see the same data, then each writes a file of its own. The disk figures are what the
server's data dir takes (`du -sx`: allocated blocks, each hard link once), before and after.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Sample, Server, pick_uid_base
from corral.runtime.uids import pool_range

ADMIN_KEY = "crl_bench_snapshots_0123456789"
MIB = 1024 * 1024


def disk_used(path: Path) -> int:
    """Blocks allocated under `path`, not counting what is mounted below it (sandboxes' views
    of shared layers, some of them on the same file system)."""
    mounts = [
        line.split()[1]
        for line in Path("/proc/self/mounts").read_text().splitlines()
        if line.split()[1].startswith(str(path) + "/")
    ]
    out = subprocess.run(
        ["du", "-sx", "--block-size=1", *[f"--exclude={m}" for m in mounts], str(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(out.stdout.split()[0])


def run(
    api: Any, sandbox: str, command: str, timeout_ms: int = 600_000, user: str | None = None
) -> dict[str, Any]:
    body = {"command": command, "timeout_ms": timeout_ms, **({"user": user} if user else {})}
    resp = api.post(f"/v1/sandboxes/{sandbox}/exec", json=body)
    resp.raise_for_status()
    done = resp.json()
    if done["exit_code"] != 0:
        raise SystemExit(f"`{command}` failed in {sandbox}: {done['stderr'] or done['stdout']}")
    return dict(done)


def timed_post(api: Any, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    resp = api.post(path, json=body)
    took = (time.perf_counter() - started) * 1000
    if resp.status_code != 201:
        raise SystemExit(f"POST {path}: {resp.status_code} {resp.text}")
    return dict(resp.json()), took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace-mb", type=int, default=1024)
    parser.add_argument("--sandboxes", type=int, default=10)
    parser.add_argument("--image", help="Start the source from this image")
    parser.add_argument(
        "--image-archive", type=Path, help="Import this OCI or docker-save archive and use it"
    )
    parser.add_argument(
        "--put", action="append", default=[], metavar="LOCAL:PATH",
        help="Upload a file into the source before the setup",
    )  # fmt: skip
    parser.add_argument("--setup", help="A command the source runs before the snapshot")
    parser.add_argument("--setup-user", default=None, help="'root' to run the setup as root")
    parser.add_argument("--check", help="A command every sandbox from the snapshot must pass")
    args = parser.parse_args()
    if args.sandboxes < 1 or args.workspace_mb < 1:
        raise SystemExit("--sandboxes and --workspace-mb must be at least 1")
    if os.geteuid() != 0:
        raise SystemExit("run as root: the server makes real sandboxes")
    disk_mb = args.workspace_mb + 2048  # room for the data and the setup's packages
    server = Server(
        uid_base=pick_uid_base(700_000, len(pool_range(0, 64))),
        uid_count=64,
        admin_key=ADMIN_KEY,
        env={"CORRAL_WARM_POOL": "0"},
        tag="bench-snapshots",
    )
    server.start()
    try:
        with server.client() as api:
            api.timeout = httpx.Timeout(1800)  # a capture or a start of a large workspace
            spec: dict[str, Any] = {"disk_mb": disk_mb}
            if args.image_archive:
                with args.image_archive.open("rb") as archive:
                    imported = api.post("/v1/images/import", content=archive)
                imported.raise_for_status()
                args.image = imported.json()["id"]
            if args.image:
                spec["image"] = args.image
            source, _ = timed_post(api, "/v1/sandboxes", spec)
            sid = source["id"]
            count = args.workspace_mb
            run(api, sid, f"head -c {count * MIB} /dev/urandom > /workspace/data && sync")
            for item in args.put:
                local, _, path = item.partition(":")
                put = api.put(
                    f"/v1/sandboxes/{sid}/files", params={"path": path},
                    content=Path(local).read_bytes(),
                )  # fmt: skip
                put.raise_for_status()
            if args.setup:
                run(api, sid, args.setup, user=args.setup_user)
            digest = run(api, sid, "sha256sum /workspace/data")["stdout"].split()[0]
            before = disk_used(server.data_dir)
            snapshot, capture_ms = timed_post(api, f"/v1/sandboxes/{sid}/snapshots", {})
            after_capture = disk_used(server.data_dir)
            starts: list[float] = []
            children: list[str] = []
            for _ in range(args.sandboxes):
                child, took = timed_post(
                    api, "/v1/sandboxes", {"snapshot": snapshot["id"], "disk_mb": disk_mb}
                )
                starts.append(took)
                children.append(child["id"])
            after_starts = disk_used(server.data_dir)
            for child_id in children:
                seen = run(api, child_id, "sha256sum /workspace/data")["stdout"].split()[0]
                if seen != digest:
                    raise SystemExit(f"{child_id} does not see the snapshot's data")
                if args.check:
                    run(api, child_id, args.check)
                run(api, child_id, f"echo {child_id} > /workspace/own")
            for i, child_id in enumerate(children):
                own = run(api, child_id, "cat /workspace/own")["stdout"].strip()
                if own != child_id:
                    raise SystemExit(f"sandbox {i} sees another's file: {own}")
            sample = Sample(starts)
            used = after_starts - after_capture
            copies = args.sandboxes * args.workspace_mb * MIB
            print(f"workspace                     {args.workspace_mb} MiB")
            print(f"snapshot time                 {capture_ms:.0f} ms")
            print(f"snapshot size (reported)      {int(snapshot['size_bytes']) / MIB:.1f} MiB")
            print(f"snapshot disk (du)            {(after_capture - before) / MIB:.1f} MiB")
            print(
                f"start from snapshot           p50 {sample.median or 0:.0f} ms, "
                f"max {max(starts):.0f} ms ({args.sandboxes} sandboxes)"
            )
            print(
                f"disk of the {args.sandboxes} sandboxes       {used / MIB:.1f} MiB "
                f"({used / copies:.1%} of {args.sandboxes} copies of the workspace)"
            )
            for child_id in [*children, sid]:
                api.delete(f"/v1/sandboxes/{child_id}")
            api.delete(f"/v1/snapshots/{snapshot['id']}")
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
