"""The Vercel face's router, error shape, request bodies and the JSON of its sandboxes,
sessions, commands and snapshots: shaped to pass the validators of `@vercel/sandbox`."""

from __future__ import annotations

import json
import os
import signal as signals
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from corral.api.auth import usable_sandbox
from corral.api.faces._common import Problem, authenticate, face_router, shell_exit_code
from corral.core.commands import default_cwd
from corral.core.errors import BadRequest, Conflict, CorralError, NotFound
from corral.core.models import (
    MAX_MILLISECONDS,
    Command,
    CommandStatus,
    Cpus,
    MemoryMb,
    Milliseconds,
    NetworkMode,
    PortNumber,
    Snapshot,
    SnapshotState,
)
from corral.core.tokens import Principal
from corral.hostnames import check_pattern, is_cidr
from corral.services import Services
from corral.store.tables import SandboxRow

TAG = "Vercel Sandbox (seed 004)"
NDJSON = "application/x-ndjson"
REGION = "local"
FACE_LABEL = "face"  # the label Corral puts on sandboxes made here; not one of the tags
DEFAULT_TIMEOUT_MS = 5 * 60 * 1000  # Vercel's default lifetime of a session
MEMORY_PER_VCPU = 2048  # MiB, as Vercel gives
NO_LIFETIME_MS = MAX_MILLISECONDS  # what a sandbox without a ttl reports as its timeout
CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    410: "sandbox_stopped",
    413: "payload_too_large",
    429: "too_many_requests",
    500: "internal_server_error",
    503: "service_unavailable",
}
KEPT_CODES = ("sudo_unavailable", "file_not_found", "snapshot_not_found", "unsupported")


class VercelErrorBody(BaseModel):
    code: str = Field(description="bad_request, not_found, sandbox_stopped, ...")
    message: str


class VercelError(BaseModel):
    """Vercel's error body."""

    error: VercelErrorBody


class SandboxGone(Conflict):
    status, code = 410, "sandbox_stopped"


class SnapshotGone(CorralError):
    """A missing snapshot as a sandbox's source: what the SDK's `getOrCreate` takes for a
    stale one."""

    status, code = 410, "snapshot_not_found"


class SudoUnavailable(BadRequest):
    code = "sudo_unavailable"


class Unsupported(BadRequest):
    """An option of the real service that Corral does not offer."""

    code = "unsupported"


def render(request: Request, problem: Problem) -> Response:
    status = problem.status
    if status == 422:
        status = 400
    code = problem.code if problem.code in KEPT_CODES else CODES.get(status, "error")
    body = {"error": {"code": code, "message": problem.message}}
    return JSONResponse(body, status_code=status)


router = face_router(
    TAG,
    render,
    error_model=VercelError,
    extra_errors={410: "The session is stopped"},
)


async def caller(request: Request) -> Principal:
    return await authenticate(request)


# --- request bodies ----------------------------------------------------------------------------


class Resources(BaseModel):
    vcpus: Cpus | None = None
    memory: MemoryMb | None = Field(default=None, description="MiB; default 2048 per vCPU")


class Source(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str = Field(description="Only `snapshot` is served")
    snapshotId: str | None = None


class NetworkSubnets(BaseModel):
    allow: list[str] = Field(default_factory=list)
    deny: list[str] = Field(default_factory=list)


class NetworkPolicy(BaseModel):
    """`{"mode": "allow-all" | "deny-all"}`, or `{"allow": [...], "subnets": {...}}`."""

    model_config = ConfigDict(extra="ignore")
    mode: Literal["allow-all", "deny-all", "custom"] | None = None
    allow: list[str] | dict[str, Any] | None = None
    subnets: NetworkSubnets | None = None
    allowedDomains: list[str] | None = None
    allowedCIDRs: list[str] | None = None
    deniedCIDRs: list[str] | None = None


class CreateSandbox(BaseModel):
    model_config = ConfigDict(extra="ignore")
    resources: Resources | None = None
    timeout: Annotated[Milliseconds, Field(ge=1000)] | None = Field(
        default=None, description="Lifetime of a session in milliseconds (default 5 minutes)"
    )
    name: str | None = Field(default=None, description="A unique sandbox name")
    env: dict[str, str] | None = Field(default=None, description="Env for every command")
    tags: dict[str, str] | None = None
    source: Source | None = Field(default=None, description="`{type: snapshot, snapshotId}`")
    image: str | None = Field(default=None, description="A container image Corral can pull")
    persistent: bool | None = Field(default=None, description="Always true in Corral")
    networkPolicy: NetworkPolicy | None = None
    ports: list[PortNumber] | None = Field(
        default=None, max_length=64, description="Served to anyone with the URL (`routes`)"
    )
    network: Literal["none", "allow", "outbound"] | None = Field(
        default=None, description="Corral: no network (default), `allow` CIDRs, or `outbound`"
    )
    allow: list[str] | None = Field(default=None, description="Corral: IPv4 CIDRs")


class UpdateSandbox(BaseModel):
    """What `Sandbox.update()` sends. The SDK itself then extends the running session by the
    timeout's increase and posts the network policy to the session's route."""

    model_config = ConfigDict(extra="ignore")
    timeout: Annotated[Milliseconds, Field(ge=1000)] | None = None
    networkPolicy: NetworkPolicy | None = None
    persistent: bool | None = None
    ports: list[PortNumber] | None = Field(default=None, max_length=64)
    tags: dict[str, str] | None = None
    resources: dict[str, Any] | None = None
    mounts: dict[str, Any] | None = None
    region: str | None = None
    currentSnapshotId: str | None = None


class RunCommand(BaseModel):
    model_config = ConfigDict(extra="ignore")
    command: str = Field(min_length=1, description="The program, without arguments")
    args: list[str] = Field(default_factory=list)
    cwd: str | None = Field(default=None, description="Default: the sandbox's /workspace")
    env: dict[str, str] = Field(default_factory=dict)
    sudo: bool = False
    wait: bool = False
    logs: bool = False
    timeout: Milliseconds | None = Field(default=None, description="Milliseconds, then SIGKILL")


class KillCommand(BaseModel):
    model_config = ConfigDict(extra="ignore")
    signal: int | str = Field(default=int(signals.SIGTERM))


class ExtendTimeout(BaseModel):
    duration: Annotated[Milliseconds, Field(description="Milliseconds to add")]


class CreateSnapshot(BaseModel):
    model_config = ConfigDict(extra="ignore")
    expiration: Annotated[int, Field(ge=0, le=MAX_MILLISECONDS)] | None = Field(
        default=None, description="Milliseconds; 0 for none"
    )


class FilePath(BaseModel):
    model_config = ConfigDict(extra="ignore")
    path: str = Field(min_length=1)
    cwd: str | None = None


# --- lookups -----------------------------------------------------------------------------------


async def live_sandbox(services: Services, principal: Principal, ref: str) -> SandboxRow:
    """A sandbox (by name or id) the caller may use; a deleted one is gone (404)."""
    row = await usable_sandbox(services, principal, ref)
    if row.state == "deleted":
        raise NotFound(f"no sandbox {ref!r}")
    return row


async def session_row(services: Services, principal: Principal, ref: str) -> SandboxRow:
    """The running session `ref`; a stopped (or paused) one answers 410, which the SDK takes
    as its cue to resume the sandbox."""
    row = await live_sandbox(services, principal, ref)
    if row.state in ("stopped", "error", "paused"):
        raise SandboxGone(f"sandbox {row.id} is {row.state}")
    return await services.sandboxes.check_running(row)


# --- answers -----------------------------------------------------------------------------------


def epoch_ms(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp() * 1000)


def _host_memory_mb() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (1 << 20)
    except (ValueError, OSError):
        return 0


def _status(row: SandboxRow) -> str:
    return {
        "creating": "pending",
        "running": "running",
        "paused": "stopped",  # frozen: commands wait for a resume
        "error": "failed",
    }.get(row.state, "stopped")


def network_policy(spec: dict[str, Any]) -> dict[str, Any]:
    """Corral's network mode in Vercel's terms (the legacy shape its SDK reads)."""
    network, allow = spec.get("network", "none"), list(spec.get("allow") or ())
    if network == "outbound":
        return {"mode": "allow-all"}
    if network == "allow":
        policy: dict[str, Any] = {"mode": "custom"}
        domains = [entry for entry in allow if not is_cidr(entry)]
        cidrs = [entry for entry in allow if is_cidr(entry)]
        if domains:
            policy["allowedDomains"] = domains
        if cidrs or not domains:
            policy["allowedCIDRs"] = cidrs
        return policy
    return {"mode": "deny-all"}


def corral_network(policy: NetworkPolicy) -> tuple[NetworkMode, list[str]]:
    """A Vercel network policy as Corral's (network, allow): allowed domains (`*.` wildcards
    too) and subnets are one allow-list. Header transforms, forwards and denied subnets have no
    equivalent here: 400 rather than a policy that does less or lets through more than asked."""
    if policy.mode == "allow-all":
        return "outbound", []
    if policy.mode == "deny-all":
        return "none", []
    domains = policy.allow if policy.allow is not None else policy.allowedDomains or []
    if isinstance(domains, dict):
        if any(rules for rules in domains.values()):
            raise Unsupported(
                "domain rules (transform, forwardURL) are not supported: give the domains "
                "alone, and Corral's inject rules for headers (docs/secrets.md)"
            )
        domains = list(domains)
    for domain in domains:
        try:
            check_pattern(domain)
        except ValueError as exc:
            raise BadRequest(f"networkPolicy.allow: {exc}") from None
    subnets = policy.subnets or NetworkSubnets(
        allow=policy.allowedCIDRs or [], deny=policy.deniedCIDRs or []
    )
    if subnets.deny:
        raise Unsupported("denied subnets are not supported: give only subnets.allow")
    allow = [*domains, *subnets.allow]
    return ("allow", allow) if allow else ("none", [])


def _lifetime(row: SandboxRow) -> tuple[int, int | None]:
    """The session's timeout (ms) and when it started (epoch ms): the deadline less the ttl."""
    ttl = row.spec.get("ttl_seconds")
    if not ttl:
        return NO_LIFETIME_MS, epoch_ms(row.created_at)
    if row.expires_at is None:
        return ttl * 1000, epoch_ms(row.created_at)
    return ttl * 1000, epoch_ms(row.expires_at - timedelta(seconds=ttl))


def _resources(row: SandboxRow) -> tuple[float, int]:
    spec = row.spec
    vcpus = spec.get("cpu") or float(os.cpu_count() or 1)
    return vcpus, spec.get("memory_mb") or _host_memory_mb()


def session_json(row: SandboxRow) -> dict[str, Any]:
    spec = row.spec
    timeout, started = _lifetime(row)
    vcpus, memory = _resources(row)
    out: dict[str, Any] = {
        "id": row.id,
        "sandboxId": row.id,
        "memory": memory,
        "vcpus": vcpus,
        "region": REGION,
        "timeout": timeout,
        "status": _status(row),
        "requestedAt": epoch_ms(row.created_at),
        "createdAt": epoch_ms(row.created_at),
        "cwd": default_cwd(row),
        "updatedAt": epoch_ms(row.updated_at),
        "networkPolicy": network_policy(spec),
    }
    if not isinstance(spec.get("image"), dict):
        out["runtime"] = row.template
    if started is not None:
        out["startedAt"] = started
    if row.state in ("stopped", "deleted"):
        out["stoppedAt"] = epoch_ms(row.updated_at)
    if spec.get("snapshot"):
        out["sourceSnapshotId"] = spec["snapshot"]
    return out


def sandbox_json(row: SandboxRow) -> dict[str, Any]:
    spec = row.spec
    timeout, _ = _lifetime(row)
    vcpus, memory = _resources(row)
    image = spec.get("image")
    labels = dict(spec.get("labels") or {})
    if labels.get(FACE_LABEL) == "vercel":
        del labels[FACE_LABEL]
    out: dict[str, Any] = {
        "id": row.id,
        "name": row.name or row.id,
        "persistent": True,
        "region": REGION,
        "memory": memory,
        "vcpus": vcpus,
        "timeout": timeout,
        "networkPolicy": network_policy(spec),
        "status": _status(row),
        "cwd": default_cwd(row),
        "tags": labels,
        "currentSessionId": row.id,
        "createdAt": epoch_ms(row.created_at),
        "updatedAt": epoch_ms(row.updated_at),
        "statusUpdatedAt": epoch_ms(row.updated_at),
        "requestedAt": epoch_ms(row.created_at),
    }
    if isinstance(image, dict):
        out["image"] = image.get("reference")
    else:
        out["runtime"] = row.template
    if row.expires_at is not None and row.state in ("running", "paused", "creating"):
        out["expiresAt"] = epoch_ms(row.expires_at)
    if spec.get("snapshot"):
        out["currentSnapshotId"] = spec["snapshot"]
    return out


def snapshot_json(snapshot: Snapshot) -> dict[str, Any]:
    created = epoch_ms(snapshot.created_at)
    out: dict[str, Any] = {
        "id": snapshot.id,
        "sourceSessionId": snapshot.sandbox_id,
        "region": REGION,
        "status": "deleted" if snapshot.state is SnapshotState.deleting else "created",
        "sizeBytes": snapshot.size_bytes or 0,
        "createdAt": created,
        "updatedAt": created,
        "creationMethod": "snapshot",
    }
    if snapshot.expires_at is not None:
        out["expiresAt"] = epoch_ms(snapshot.expires_at)
    return out


def command_json(command: Command) -> dict[str, Any]:
    finished = command.status.finished
    exit_code = shell_exit_code(command) if finished else None
    if command.status is CommandStatus.failed:
        exit_code = 127  # as a shell answers for a program it cannot run
    if command.status is CommandStatus.lost:
        exit_code = None
    out: dict[str, Any] = {
        "id": command.id,
        "name": command.command,
        "args": command.args or [],
        "cwd": command.cwd,
        "sessionId": command.sandbox_id,
        "sandboxId": command.sandbox_id,
        "exitCode": exit_code,
        "startedAt": epoch_ms(command.started_at or command.created_at),
        "status": command.status.value if finished else "running",
    }
    if finished and command.duration_ms is not None:
        out["durationMs"] = command.duration_ms
    if command.error:
        out["error"] = command.error
    return out


def pagination(count: int, next_cursor: str | None) -> dict[str, Any]:
    return {"count": count, "next": next_cursor}


def line(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"


def token_ended_line(reason: str) -> bytes:
    """The last line of a stream whose token was revoked or expired."""
    return line({"stream": "error", "data": {"code": "unauthenticated", "message": reason}})
