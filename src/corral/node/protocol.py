"""The node protocol's messages: what replicas and agents say to each other over the bus.

Requests go to `corral.node.<id>.in.rpc` as `{"v", "op", "args"}` (see node/bus.py for the
framing); the ops and their arguments are the `Node` and `Execution` calls of node/base.py,
named here. Events from a node go to `corral.node.<id>.out.event` as requests that one replica
(of the queue group `replicas`) answers once it has applied them: the node keeps an event until
it is acknowledged, so nothing a node reports is lost while replicas restart.

Every value crosses as JSON; output and file data travel as the binary part of a message.
Errors the core handles cross by name (`ERRORS`) and are raised again on the caller's side as
the same node-level types.
"""

from __future__ import annotations

import base64
from datetime import datetime
from pathlib import Path
from typing import Any

from corral.core.models import CommandStatus
from corral.node.base import (
    CommandOutcome,
    CommandSpec,
    HostFailure,
    PortUnreachable,
    SnapshotsUnsupported,
    TooManyCommands,
)
from corral.node.bus import RemoteError
from corral.node.images import ImageInUse
from corral.node.output_log import CorruptLog
from corral.runtime.base import (
    Injection,
    NeedsRestart,
    SandboxConfig,
    SandboxDied,
    SpawnError,
    StartUnknown,
    VolumeBind,
)
from corral.runtime.images import Image
from corral.runtime.images import errors as image_errors
from corral.runtime.limits import Limits

REPLICAS_QUEUE = "replicas"  # the queue group of replicas taking node events
COMMAND_DONE = "corral.command.{}.done"  # replicas -> replicas: a command's result is stored
READ_BYTES = 256 * 1024  # the most one output or file read carries
FOLLOW_WAIT = 2.0  # how long a read of a live log waits for more before answering
# Port tunnels (`port_open`, then `port_read` / `port_write` / `port_write_eof` /
# `port_close` on the tunnel id it answers): a connection to a sandbox's port, opened by its node
# inside the sandbox's network namespace. Both directions are pulls of at most READ_BYTES, each
# answered within FOLLOW_WAIT (`pending` when nothing moved), so a quiet connection never looks
# like a node that does not answer; a tunnel nobody asks about for TUNNEL_IDLE seconds (its
# replica went away) is closed by the node.
TUNNEL_IDLE = 30.0

# Node events (`out.event` requests), answered `{"ok": true}` once applied.
EVENT_REGISTER = "register"  # {"info"} -> {"epoch", "sandboxes": [config...]}
EVENT_HEARTBEAT = "heartbeat"  # {"epoch", "load"} -> {"ok"} ({"ok": false}: register again)
EVENT_ENDED = "ended"  # {"epoch", "command_id", "outcome"}
EVENT_DIED = "died"  # {"epoch", "sandbox_id", "failure"}


class InternalFailure(RuntimeError):
    """The node hit a bug; its log has the whole error."""


class HostExecRefused(PermissionError):
    """The node runs no commands on its host (its agent has no --host-exec)."""


class UnknownCommand(LookupError):
    """The node has no such command (it ended long ago, or the node restarted since)."""


ERRORS: dict[str, type[BaseException]] = {
    "sandbox_died": SandboxDied,
    "spawn_error": SpawnError,
    "start_unknown": StartUnknown,
    "needs_restart": NeedsRestart,
    "corrupt_log": CorruptLog,
    "broken_pipe": BrokenPipeError,
    "host_failure": HostFailure,
    "snapshots_unsupported": SnapshotsUnsupported,
    "os_error": OSError,
    "unknown_command": UnknownCommand,
    "host_exec_refused": HostExecRefused,
    "too_many_commands": TooManyCommands,
    "port_unreachable": PortUnreachable,
    # The image store's, each by its own name: the core maps each to its status.
    "image_in_use": ImageInUse,
    "image_not_found": image_errors.ImageNotFoundError,
    "registry_auth": image_errors.RegistryAuthError,
    "registry_error": image_errors.RegistryError,
    "digest_mismatch": image_errors.DigestMismatchError,
    "unsupported_image": image_errors.UnsupportedImageError,
    "image_archive": image_errors.ImageArchiveError,
    "image_too_large": image_errors.ImageTooLargeError,
    "image_store_full": image_errors.ImageStoreFullError,
    "hostile_layer": image_errors.HostileLayerError,
    "layer_limit": image_errors.LayerLimitError,
    "layer_error": image_errors.LayerError,
    "image_error": image_errors.ImageError,
}
_NAMES = {cls: name for name, cls in ERRORS.items()}


def error_name(exc: BaseException) -> str | None:
    """The protocol name of a node-level error (its nearest known class), or None."""
    for cls in type(exc).__mro__:
        if cls in _NAMES:
            return _NAMES[cls]
    return None


def raise_remote(exc: RemoteError) -> None:
    """Raise a node's error again as its node-level type (unknown ones as InternalFailure)."""
    cls = ERRORS.get(exc.type)
    if cls is None:
        raise InternalFailure(exc.message) from None
    raise cls(exc.message) from None


# --- values ---


def config_to_wire(config: SandboxConfig) -> dict[str, Any]:
    # Without `dir`: where the files live is the node's own business.
    return {
        "id": config.id,
        "slot": config.slot,
        "env": config.env,
        "limits": {
            "cpu": config.limits.cpu,
            "memory_mb": config.limits.memory_mb,
            "pids": config.limits.pids,
            "disk_mb": config.limits.disk_mb,
        },
        "template": config.template,
        "network": config.network,
        "allow": list(config.allow),
        "inject": injections_to_wire(config.inject),
        "volumes": [{"id": v.id, "path": v.path, "read_only": v.read_only} for v in config.volumes],
        "snapshot": config.snapshot,
        "image": config.image,
        "user": config.user,
    }


def injections_to_wire(inject: tuple[Injection, ...]) -> list[dict[str, str]]:
    # Header values hold secrets: they cross only to the sandbox's node, never into a log.
    return [{"host": i.host, "header": i.header, "value": i.value} for i in inject]


def injections_from_wire(data: Any) -> tuple[Injection, ...]:
    return tuple(Injection(str(i["host"]), str(i["header"]), str(i["value"])) for i in data or ())


def config_from_wire(data: dict[str, Any], sandboxes_dir: Path) -> SandboxConfig:
    sandbox_id = str(data["id"])
    if "/" in sandbox_id or sandbox_id in ("", ".", ".."):
        raise ValueError(f"not a sandbox id: {sandbox_id!r}")
    limits = data.get("limits") or {}
    return SandboxConfig(
        id=sandbox_id,
        slot=int(data["slot"]),
        dir=sandboxes_dir / sandbox_id,
        env={str(k): str(v) for k, v in (data.get("env") or {}).items()},
        limits=Limits(
            cpu=limits.get("cpu"),
            memory_mb=limits.get("memory_mb"),
            pids=limits.get("pids"),
            disk_mb=limits.get("disk_mb"),
        ),
        template=str(data.get("template", "host")),
        network=str(data.get("network", "none")),
        allow=tuple(str(a) for a in data.get("allow") or ()),
        inject=injections_from_wire(data.get("inject")),
        volumes=tuple(
            VolumeBind(str(v["id"]), str(v["path"]), bool(v.get("read_only")))
            for v in data.get("volumes") or ()
        ),
        snapshot=None if data.get("snapshot") is None else snapshot_id(data["snapshot"]),
        image=str(data["image"]) if data.get("image") else None,
        user=str(data.get("user") or ""),
    )


def snapshot_id(value: Any) -> str:
    """A snapshot id from the wire: it names a directory on the node."""
    checked = str(value)
    if "/" in checked or checked in ("", ".", ".."):
        raise ValueError(f"not a snapshot id: {checked!r}")
    return checked


def spec_to_wire(spec: CommandSpec) -> dict[str, Any]:
    return {
        "id": spec.id,
        "sandbox_id": spec.sandbox_id,
        "argv": spec.argv,
        "env": spec.env,
        "cwd": spec.cwd,
        "timeout_ms": spec.timeout_ms,
        "max_output_bytes": spec.max_output_bytes,
        "interactive": spec.interactive,
        "tty": spec.tty,
        "rows": spec.rows,
        "cols": spec.cols,
        "raw_stdout": spec.raw_stdout,
        "keep_log": spec.keep_log,
        "report": spec.report,
        "max_running": spec.max_running,
        "rlimits": spec.rlimits,
        "user": spec.user,
    }


def spec_from_wire(data: dict[str, Any], stdin: bytes) -> CommandSpec:
    return CommandSpec(
        id=str(data["id"]),
        sandbox_id=str(data["sandbox_id"]),
        argv=[str(a) for a in data["argv"]],
        env={str(k): str(v) for k, v in (data.get("env") or {}).items()},
        cwd=str(data["cwd"]),
        stdin=stdin or None,
        timeout_ms=int(data["timeout_ms"]),
        max_output_bytes=int(data["max_output_bytes"]),
        interactive=bool(data.get("interactive")),
        tty=bool(data.get("tty")),
        rows=int(data.get("rows", 24)),
        cols=int(data.get("cols", 80)),
        raw_stdout=bool(data.get("raw_stdout")),
        keep_log=bool(data.get("keep_log", True)),
        report=bool(data.get("report", True)),
        max_running=int(data.get("max_running", 0)),
        rlimits={str(k): int(v) for k, v in (data.get("rlimits") or {}).items()},
        user=str(data.get("user", "user")),
    )


def outcome_to_wire(outcome: CommandOutcome) -> dict[str, Any]:
    return {
        "status": outcome.status.value,
        "exit_code": outcome.exit_code,
        "signal": outcome.signal,
        "stdout_bytes": outcome.stdout_bytes,
        "stderr_bytes": outcome.stderr_bytes,
        "stdout_truncated": outcome.stdout_truncated,
        "stderr_truncated": outcome.stderr_truncated,
        "started_at": outcome.started_at.isoformat(),
        "finished_at": outcome.finished_at.isoformat(),
        "error": outcome.error,
        "cpu_ms": outcome.cpu_ms,
        "peak_memory_bytes": outcome.peak_memory_bytes,
        "oom_killed": outcome.oom_killed,
    }


# A command's output up to this size (both streams) travels with its `ended` event, so that
# the replica answering a sync exec needs no `output` call (larger output: one or more calls).
INLINE_OUTPUT_BYTES = 64 * 1024


def output_to_wire(output: tuple[bytes, bytes]) -> dict[str, str] | None:
    stdout, stderr = output
    if len(stdout) + len(stderr) > INLINE_OUTPUT_BYTES:
        return None
    return {
        "stdout": base64.b64encode(stdout).decode(),
        "stderr": base64.b64encode(stderr).decode(),
    }


def output_from_wire(data: Any) -> tuple[bytes, bytes] | None:
    """The output an event carried, if any and well formed (otherwise asked for by a call)."""
    if not isinstance(data, dict):
        return None
    try:
        stdout = base64.b64decode(data["stdout"], validate=True)
        stderr = base64.b64decode(data["stderr"], validate=True)
    except (KeyError, TypeError, ValueError):
        return None
    if len(stdout) + len(stderr) > INLINE_OUTPUT_BYTES:
        return None
    return stdout, stderr


def outcome_from_wire(data: dict[str, Any]) -> CommandOutcome:
    return CommandOutcome(
        status=CommandStatus(data["status"]),
        exit_code=data.get("exit_code"),
        signal=data.get("signal"),
        stdout_bytes=int(data.get("stdout_bytes", 0)),
        stderr_bytes=int(data.get("stderr_bytes", 0)),
        stdout_truncated=bool(data.get("stdout_truncated")),
        stderr_truncated=bool(data.get("stderr_truncated")),
        started_at=datetime.fromisoformat(data["started_at"]),
        finished_at=datetime.fromisoformat(data["finished_at"]),
        error=data.get("error"),
        cpu_ms=data.get("cpu_ms"),
        peak_memory_bytes=data.get("peak_memory_bytes"),
        oom_killed=bool(data.get("oom_killed")),
    )


def image_from_wire(data: Any) -> Image:
    if not isinstance(data, dict):
        raise ValueError("not an image record")
    return Image.from_json(data)
