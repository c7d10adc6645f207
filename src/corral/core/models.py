"""Wire models shared by the server, the SDK and the CLI.

Every request and response of the native API is one of these; faces translate to and from them.
"""

from __future__ import annotations

import base64
import enum
import ipaddress
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from annotated_types import Interval
from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    field_validator,
    model_validator,
)

from corral import hostnames

_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
NODE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # one NATS subject token


class SandboxState(enum.StrEnum):
    creating = "creating"
    running = "running"
    paused = "paused"
    stopped = "stopped"
    error = "error"
    deleted = "deleted"

    def can_become(self, new: SandboxState) -> bool:
        return new in _SANDBOX_TRANSITIONS[self]


_SANDBOX_TRANSITIONS: dict[SandboxState, set[SandboxState]] = {
    SandboxState.creating: {SandboxState.running, SandboxState.error, SandboxState.deleted},
    SandboxState.running: {
        SandboxState.paused,
        SandboxState.stopped,
        SandboxState.error,
        SandboxState.deleted,
        SandboxState.creating,  # restarted after a crash of the server or of the sandbox
    },
    SandboxState.paused: {
        SandboxState.running,
        SandboxState.stopped,
        SandboxState.error,
        SandboxState.deleted,
        SandboxState.creating,  # restarted after a crash of the server
    },
    SandboxState.stopped: {SandboxState.creating, SandboxState.deleted},
    SandboxState.error: {SandboxState.creating, SandboxState.deleted},
    SandboxState.deleted: set(),
}


class CommandStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    completed = "completed"  # ran to its end, whatever its exit code
    failed = "failed"  # could not be started
    timed_out = "timed_out"
    cancelled = "cancelled"
    lost = "lost"  # the node or the server died while it ran: the result is unknown

    @property
    def finished(self) -> bool:
        return self not in (CommandStatus.queued, CommandStatus.running)


class Scope(enum.StrEnum):
    read = "read"  # look at sandboxes, commands and output
    exec = "exec"  # run and cancel commands
    files = "files"  # move files in and out
    sandboxes = "sandboxes"  # create, change and delete sandboxes
    secrets = "secrets"  # store and delete secrets (never read them back)
    admin = "admin"  # everything, tokens included
    metrics = "metrics"  # read /metrics
    audit = "audit"  # read the audit log


NetworkMode = Literal["none", "allow", "outbound"]
MAX_INJECT_RULES = 32
SECRET_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$"
SECRET_REF = re.compile(r"\{\{secret:([^}]*)\}\}")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# --- bounded numbers ---------------------------------------------------------------------------
#
# Every number a request takes (in a body or a query string, on any face) is one of these, so
# that what the server does with it afterwards holds: a lifetime added to now stays a datetime,
# an offset fits SQLite's 64-bit integers, seconds turned into milliseconds stay finite. Floats
# are finite: JSON bodies may carry NaN and Infinity (Python's parser accepts them), and so may
# query strings ("nan", "inf"). Constraints are annotated-types markers rather than pydantic
# `Field`s, so that the same types serve as query parameters (`Annotated[Count, Query(...)]`).

COUNT_MAX = 2**62  # within SQLite's 64-bit integers with room for a sum (LIMIT + OFFSET)
MAX_SECONDS = 10 * 366 * 24 * 3600  # ten years: the longest lifetime, expiry or timeout
MAX_MILLISECONDS = MAX_SECONDS * 1000
MIN_CPUS, MAX_CPUS = 0.01, 256  # the smallest CFS quota: 1 ms per 100 ms period
MIN_MEMORY_MB, MAX_MEMORY_MB = 16, 1024 * 1024
# The smallest disk that holds a sandbox. Its ext4 file system has one inode per 64 KiB (16 per
# MiB, `-i 65536` in runtime/namespaces.py); 11 are reserved by ext4, and the sandbox's layout
# takes up to 30 more before any command runs (/tmp, /usr/local, /workspace, /etc and its 6
# generated files and up to 20 links to the host's shown /etc entries). 2 MiB (32 inodes) cannot
# start; 3 MiB (48) starts with a few inodes to spare. mkfs.ext4 itself needs 1 MiB.
MIN_DISK_MB, MAX_DISK_MB = 3, 1024 * 1024

FiniteFloat = Annotated[float, AllowInfNan(False)]
Count = Annotated[int, Interval(ge=0, le=COUNT_MAX)]
"""Offsets, byte counts: anything from 0 that the store keeps as a 64-bit integer."""
Seconds = Annotated[int, Interval(ge=1, le=MAX_SECONDS)]
SecondsFloat = Annotated[float, Interval(gt=0, le=MAX_SECONDS), AllowInfNan(False)]
Milliseconds = Annotated[int, Interval(ge=1, le=MAX_MILLISECONDS)]
Cpus = Annotated[float, Interval(ge=MIN_CPUS, le=MAX_CPUS), AllowInfNan(False)]
MemoryMb = Annotated[int, Interval(ge=MIN_MEMORY_MB, le=MAX_MEMORY_MB)]
DiskMb = Annotated[int, Interval(ge=MIN_DISK_MB, le=MAX_DISK_MB)]
Pids = Annotated[int, Interval(ge=8, le=1_000_000)]
TerminalSize = Annotated[int, Interval(ge=1, le=1000)]


def _in_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)  # a naive time is taken as UTC
    try:
        return value.astimezone(UTC)
    except OverflowError:  # e.g. 9999-12-31T23:59-14:00 is past the last UTC datetime
        raise ValueError("the time is out of range in UTC") from None


Timestamp = Annotated[datetime, AfterValidator(_in_utc)]
"""A point in time, in UTC (naive times are taken as UTC)."""

# A path inside a sandbox: at most PATH_MAX (4096 bytes with its NUL; the file helper checks the
# bytes, this bounds the characters so that a path always fits the helper's command line).
MAX_PATH = 4095
SandboxPath = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PATH)]


# --- sandboxes ---------------------------------------------------------------------------------


# Where a volume may not go: what every sandbox's root needs as it is.
RESERVED_MOUNTS = ("/proc", "/dev", "/sys", "/usr", "/etc", "/opt/corral", "/.corral", "/tmp")
MAX_VOLUMES_PER_SANDBOX = 16


def check_mount_path(value: str) -> str:
    if not value.startswith("/") or "\0" in value:
        raise ValueError("must be an absolute path")
    parts = [p for p in value.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise ValueError("must be a normal absolute path below /, without . or ..")
    path = "/" + "/".join(parts)
    for reserved in RESERVED_MOUNTS:
        if path == reserved or path.startswith(reserved + "/"):
            raise ValueError(f"{reserved} is the sandbox's own")
    return path


class VolumeMount(Strict):
    name: Annotated[str, Field(pattern=NAME_PATTERN, description="A volume's name or id")]
    path: Annotated[str, StringConstraints(min_length=2, max_length=MAX_PATH)] = Field(
        description="Where the sandbox sees it, e.g. /data"
    )
    read_only: bool = False

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return check_mount_path(value)


class VolumeCreate(Strict):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    size_mb: DiskMb | None = Field(
        default=None, description="Its own file system of this size; default: the node's disk"
    )
    node: Annotated[str, Field(pattern=NODE_ID_PATTERN)] | None = Field(
        default=None, description="The node to keep it on; default: the least loaded online node"
    )
    labels: dict[str, str] = Field(default_factory=dict)


class Volume(BaseModel):
    id: str
    name: str
    node_id: str
    size_mb: int | None
    labels: dict[str, str]
    created_at: datetime
    used_by: list[str] = Field(description="Live sandboxes that mount it")


class SnapshotState(enum.StrEnum):
    creating = "creating"  # being captured: no sandbox starts from it yet
    ready = "ready"
    deleting = "deleting"  # its files are being removed from its node


class SnapshotCreate(Strict):
    """A snapshot of a running sandbox; at most one of `expires_in` and `expires_at`."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    expires_in: Seconds | None = Field(default=None, description="Removed this many seconds on")
    expires_at: Timestamp | None = Field(default=None, description="Removed at this time (UTC)")
    labels: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_expiry(self) -> SnapshotCreate:
        if self.expires_in is not None and self.expires_at is not None:
            raise ValueError("give expires_in or expires_at, not both")
        return self


class Snapshot(BaseModel):
    id: str
    name: str | None
    state: SnapshotState
    sandbox_id: str = Field(description="The sandbox it was taken of")
    node_id: str = Field(description="The node that keeps it; its sandboxes run there")
    template: str
    image: str | None = Field(default=None, description="The source sandbox's image, if any")
    size_bytes: int | None = Field(description="What the capture took on the node")
    labels: dict[str, str] = Field(default_factory=dict)
    created_at: datetime
    expires_at: datetime | None = None
    used_by: list[str] = Field(description="Sandboxes (not deleted) started from it")


# --- images ------------------------------------------------------------------------------------

# A registry reference (host[:port]/name[:tag|@digest]) or an image id (sha256:<hex>, or 12+ of
# its hex digits): what the node's image store takes.
IMAGE_REF_PATTERN = r"^[a-z0-9][A-Za-z0-9._:/@+-]{0,1023}$"
ImageRef = Annotated[str, Field(pattern=IMAGE_REF_PATTERN, max_length=1024)]


class RegistryCredentials(Strict):
    """Either a user name and password (or an access token used as the password), or an
    identity token (an OAuth refresh token, as `docker login` keeps)."""

    username: Annotated[str, StringConstraints(max_length=256)] | None = None
    password: Annotated[str, StringConstraints(max_length=8192)] | None = None
    token: Annotated[str, StringConstraints(max_length=8192)] | None = Field(
        default=None, description="An identity token, instead of a user and password"
    )

    @model_validator(mode="after")
    def _one_kind(self) -> RegistryCredentials:
        pair = self.username is not None or self.password is not None
        if pair and self.token is not None:
            raise ValueError("give a username and password, or a token, not both")
        if not pair and self.token is None:
            raise ValueError("give a username and password, or a token")
        if pair and (not self.username or self.password is None):
            raise ValueError("a username needs its password (and a password its username)")
        return self

    def __repr__(self) -> str:  # never print secrets
        return f"RegistryCredentials(username={self.username!r}, ...)"


class ImagePull(Strict):
    reference: ImageRef = Field(description="host[:port]/name[:tag|@sha256:digest]")
    auth: RegistryCredentials | None = Field(
        default=None, description="For a registry that wants credentials; kept nowhere"
    )
    node: Annotated[str, Field(pattern=NODE_ID_PATTERN)] | None = Field(
        default=None, description="The node to pull on; default: the least loaded online node"
    )


class Image(BaseModel):
    id: str = Field(description="The image's config digest (sha256:...)")
    references: list[str] = Field(description="Names it was pulled or imported under")
    node_id: str
    size: int = Field(description="Bytes of its manifest, config and compressed layers")
    layers: int
    created: str | None = Field(description="When the image says it was built (RFC 3339)")
    architecture: str
    os: str
    env: list[str] = Field(description="NAME=value, under every sandbox's own environment")
    working_dir: str = Field(description="Where commands start ('' : /workspace)")
    user: str = Field(description="Who commands run as, as the image names it")
    entrypoint: list[str]
    cmd: list[str]
    labels: dict[str, str]
    added_at: datetime = Field(description="When this node got it")
    used_by: list[str] = Field(description="Live sandboxes of this node that run on it")


class InjectRule(Strict):
    """A header the node's egress proxy adds to the sandbox's HTTPS requests to `host`;
    `{{secret:NAME}}` in the value stands for a stored secret, which the sandbox never sees."""

    host: str = Field(description="A host name the sandbox's allow-list allows")
    header: Annotated[str, Field(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}$")]
    value: Annotated[str, Field(max_length=8192)]

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        return hostnames.check_name(value)

    @field_validator("value")
    @classmethod
    def _value(cls, value: str) -> str:
        if any(c in value for c in "\r\n\x00"):
            raise ValueError("a header value cannot hold CR, LF or NUL")
        for name in SECRET_REF.findall(value):
            if not re.match(SECRET_NAME_PATTERN, name):
                raise ValueError(f"not a secret name: {name!r}")
        return value

    def secret_names(self) -> list[str]:
        return SECRET_REF.findall(self.value)


class SecretCreate(Strict):
    name: Annotated[str, Field(pattern=SECRET_NAME_PATTERN)]
    value: Annotated[str, Field(min_length=1, max_length=8192)]

    @field_validator("value")
    @classmethod
    def _value(cls, value: str) -> str:
        if any(c in value for c in "\r\n\x00"):
            raise ValueError("a secret cannot hold CR, LF or NUL (it goes into a header)")
        return value


class Secret(BaseModel):
    """A stored secret: its name and times, never its value."""

    name: str
    created_at: datetime
    updated_at: datetime


class InjectionCount(InjectRule):
    count: int = Field(description="Requests the header was added to while the sandbox runs")


class SandboxNetwork(BaseModel):
    """A sandbox's network policy and what its node counted of it (since the sandbox last
    started; empty while it does not run)."""

    id: str
    network: str
    allow: list[str]
    inject: list[InjectionCount]
    counters: dict[str, int] = Field(
        description="connections_allowed and connections_refused (by the egress proxy), "
        "dns_answered and dns_refused (by the DNS forwarder), packets_rejected (by the "
        "sandbox's nftables chain: addresses nothing allowed)"
    )
    resolved: dict[str, list[str]] = Field(
        description="Addresses allowed names resolved to, with those names (until their TTL)"
    )
    recent_refusals: list[dict[str, Any]] = Field(
        description="The latest refusals: at (epoch seconds), kind (dns, connections), host, reason"
    )
    open_connections: int = 0


class SandboxCreate(Strict):
    name: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    template: str = Field(default="host", description="Root filesystem template")
    env: dict[str, str] = Field(default_factory=dict, description="Environment for every command")
    labels: dict[str, str] = Field(default_factory=dict)
    cpu: Cpus | None = Field(default=None, description="CPUs (quota)")
    memory_mb: MemoryMb | None = None
    pids: Pids | None = None
    disk_mb: DiskMb | None = Field(
        default=None,
        description=f"MiB, at least {MIN_DISK_MB}: the smallest file system a sandbox fits in",
    )
    ttl_seconds: Seconds | None = Field(
        default=None, description="Stopped after this many seconds (its files stay)"
    )
    network: NetworkMode = Field(
        default="none",
        description="none: no network; allow: only what `allow` lists; outbound: public "
        "addresses (private ranges only if in `allow`). Never the host, other sandboxes or "
        "169.254.0.0/16, whatever `allow` says, unless the operator opened them",
    )
    allow: list[str] = Field(
        default_factory=list,
        description="What the sandbox may reach: IPv4 CIDRs, host names (api.example.com) and "
        "wildcards (*.example.com: names under it, not the domain itself)",
    )
    inject: list[InjectRule] = Field(
        default_factory=list,
        max_length=MAX_INJECT_RULES,
        description="Headers the node adds to the sandbox's HTTPS requests to a host",
    )
    node: Annotated[str, Field(pattern=NODE_ID_PATTERN)] | None = Field(
        default=None,
        description="The node to place it on; default: the least loaded online node with room",
    )
    volumes: list[VolumeMount] = Field(
        default_factory=list,
        max_length=MAX_VOLUMES_PER_SANDBOX,
        description="Volumes to mount (the sandbox goes to their node)",
    )
    snapshot: Annotated[str, Field(pattern=NAME_PATTERN)] | None = Field(
        default=None,
        description="A snapshot (id or name) to start from: the sandbox goes to its node and "
        "takes its source's template and image",
    )
    image: ImageRef | None = Field(
        default=None,
        description="A container image (reference or id) as the root, instead of a template: "
        "pulled on the node if it lacks it; its Env, WorkingDir and User apply",
    )

    @model_validator(mode="after")
    def _image_or_template(self) -> SandboxCreate:
        if self.image is not None and self.template != "host":
            raise ValueError("give an image or a template, not both")
        return self

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        return check_env(value)

    @field_validator("allow")
    @classmethod
    def _allow(cls, value: list[str]) -> list[str]:
        return check_allow(value)

    @field_validator("volumes")
    @classmethod
    def _volumes(cls, value: list[VolumeMount]) -> list[VolumeMount]:
        paths = [v.path for v in value]
        for i, path in enumerate(paths):
            for other in paths[i + 1 :]:
                if path == other or path.startswith(other + "/") or other.startswith(path + "/"):
                    raise ValueError(f"volume paths {path} and {other} overlap")
        return value


class SandboxUpdate(Strict):
    """A change to a running sandbox. Network changes between allow and outbound, and of the
    allow-list, take effect at once; switching to or from `none` restarts the sandbox."""

    network: NetworkMode | None = None
    allow: list[str] | None = None
    inject: list[InjectRule] | None = Field(default=None, max_length=MAX_INJECT_RULES)

    @field_validator("allow")
    @classmethod
    def _allow(cls, value: list[str] | None) -> list[str] | None:
        return check_allow(value) if value is not None else None


class Sandbox(BaseModel):
    id: str
    name: str | None
    state: SandboxState
    node_id: str
    template: str
    env_keys: list[str] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    cpu: float | None = None
    memory_mb: int | None = None
    pids: int | None = None
    disk_mb: int | None = None
    ttl_seconds: int | None = None
    network: str = "none"
    allow: list[str] = Field(default_factory=list)
    inject: list[InjectRule] = Field(default_factory=list)
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None = None
    error: str | None = None
    limits_enforced: dict[str, str] = Field(
        default_factory=dict,
        description="Each limit and how this host enforces it (empty: not enforced here)",
    )
    volumes: list[VolumeMount] = Field(default_factory=list)
    snapshot: str | None = Field(default=None, description="The snapshot it started from")
    image: str | None = Field(default=None, description="The image as asked for")
    image_id: str | None = Field(default=None, description="The image it runs on")
    # The API it came from (set by the SDK's clients): what url() is relative to.
    _api_url: str = PrivateAttr(default="")

    def url(self, port: int) -> str:
        """Where port `port` of this sandbox is served once exposed (the path form; a token,
        a cookie or a signature goes with each request, see docs/ports.md)."""
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is out of range (1-65535)")
        return f"{self._api_url}/v1/sandboxes/{self.id}/ports/{port}/"


# --- commands ----------------------------------------------------------------------------------


# A user name as useradd takes it (the commands table keeps up to 32 characters).
USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,30}\$?")


class ExecRequest(Strict):
    command: str = Field(min_length=1, description="Shell string, or the program when args is set")
    args: list[str] | None = Field(default=None, description="Program arguments: no shell")
    cwd: str | None = Field(default=None, description="Absolute path; default /workspace")
    env: dict[str, str] = Field(default_factory=dict)
    user: str | None = Field(
        default=None,
        description="'user' (uid 1000, the default), 'root': uid 0 of the sandbox's own user "
        "namespace (sudo), never a host privilege, or another user of the sandbox's /etc/passwd "
        "by name (as `sudo -u NAME`), with that user's groups",
    )
    stdin: str | None = Field(default=None, description="Standard input as UTF-8 text")
    timeout_ms: Milliseconds | None = None
    max_output_bytes: Count | None = Field(default=None, description="Cap per stream")
    interactive: bool = Field(
        default=False,
        description="Keep standard input open for `POST .../stdin` or a WebSocket (after `stdin`)",
    )
    tty: bool = Field(
        default=False, description="Run on a terminal (one output stream, resize); interactive"
    )
    rows: TerminalSize = Field(default=24, description="Terminal rows (with tty)")
    cols: TerminalSize = Field(default=80, description="Terminal columns (with tty)")

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        return check_env(value)

    @field_validator("command", "cwd", "stdin")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise ValueError("must not contain NUL bytes")
        return value

    @field_validator("args")
    @classmethod
    def _args(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any("\x00" in a for a in value):
            raise ValueError("arguments must not contain NUL bytes")
        return value

    @field_validator("cwd")
    @classmethod
    def _cwd(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("must be an absolute path")
        return value

    @field_validator("user")
    @classmethod
    def _user(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value in ("user", "1000"):
            return "user"
        if value in ("root", "0"):
            return "root"
        if USER_NAME.fullmatch(value):
            return value
        raise ValueError(
            "user must be 'user' (uid 1000), 'root' (uid 0 inside the sandbox) or the name of "
            "another user in the sandbox's /etc/passwd"
        )


class Command(BaseModel):
    """One execution and, once finished, its result."""

    id: str
    sandbox_id: str
    status: CommandStatus
    command: str
    args: list[str] | None = None
    cwd: str
    user: str = "user"
    env_keys: list[str] = Field(default_factory=list)
    timeout_ms: int
    max_output_bytes: int
    exit_code: int | None = None
    signal: int | None = None
    stdout: str | None = None
    stderr: str | None = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    duration_ms: int | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    cpu_ms: int | None = Field(default=None, description="CPU time of all its processes")
    peak_memory_bytes: int | None = None
    oom_killed: bool = False


# --- tokens ------------------------------------------------------------------------------------


class TokenCreate(Strict):
    name: str = Field(default="", max_length=200)
    scopes: list[Scope] = Field(default_factory=lambda: [Scope.read, Scope.exec, Scope.files])
    sandbox_ids: list[str] | None = Field(
        default=None, description="Limit the token to these sandboxes (ids or names)"
    )
    expires_in_seconds: Seconds | None = None


class Token(BaseModel):
    id: str
    name: str
    prefix: str
    scopes: list[Scope]
    sandbox_ids: list[str] | None = None
    created_at: datetime
    expires_at: datetime | None = None
    last_used_at: datetime | None = None


class TokenCreated(Token):
    secret: str = Field(description="Shown once; only its hash is kept")


# --- generic -----------------------------------------------------------------------------------

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = None


class AuditEntry(BaseModel):
    """One state-changing call (docs/operations.md names the actions)."""

    id: str
    at: datetime
    token_id: str | None  # "admin" for the admin key; None when no token was accepted
    token_name: str | None
    action: str  # e.g. sandbox.create, command.exec, token.revoke, vercel.sandbox.create
    target: str | None  # the sandbox, token, volume ... the call was about
    method: str
    path: str  # with secrets (access_token=, signatures) masked
    status: int
    result: Literal["ok", "error"]
    address: str | None
    request_id: str | None


class ErrorBody(BaseModel):
    code: str
    message: str
    details: object | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
    request_id: str | None = None


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str
    node: str
    runtime: str
    warm_sandboxes: int = Field(0, description="Started sandboxes waiting to be claimed")


def check_allow(entries: list[str]) -> list[str]:
    """An allow-list: its CIDRs normalized (check_cidrs), then its host names and wildcards
    (hostnames.py), each deduplicated and sorted."""
    cidrs, names = [], set()
    for entry in entries:
        text = entry.strip()
        if hostnames.is_cidr(text) or not any(c.isalpha() or c == "*" for c in text):
            cidrs.append(text)
        else:
            names.add(hostnames.check_pattern(text))
    return check_cidrs(cidrs) + sorted(names)


def check_cidrs(cidrs: list[str]) -> list[str]:
    """IPv4 networks in CIDR form (a bare address is a /32), normalized and deduplicated."""
    out = set()
    for cidr in cidrs:
        try:
            net = ipaddress.ip_network(cidr.strip(), strict=False)
        except ValueError:
            raise ValueError(f"not an IPv4 network: {cidr!r}") from None
        if net.version != 4:
            raise ValueError(f"only IPv4 networks are supported: {cidr!r}")
        out.add(str(net))
    return sorted(out)


def check_env(env: dict[str, str]) -> dict[str, str]:
    for key, val in env.items():
        if not _ENV_KEY.match(key):
            raise ValueError(f"invalid environment variable name: {key!r}")
        if "\x00" in val:
            raise ValueError(f"environment variable {key} contains a NUL byte")
    return env


# --- output events (streams of a command's output log) -----------------------------------------
#
# Every view of a command's output (ND-JSON, Server-Sent Events, WebSocket) carries these events.
# Output events come in log order; offsets are opaque cursors: resume at an event's `next_offset`.
# A stream ends with exactly one terminal event: `exit` (the result is known) or `error` (the
# stream ended without a result: the command was lost, or the stream failed; re-attach to retry).


class OutputEvent(BaseModel):
    """A piece of the command's stdout or stderr (a terminal command has stdout only)."""

    type: Literal["stdout", "stderr"]
    offset: int = Field(description="Where this piece starts in the log")
    next_offset: int = Field(description="Where the next piece starts: resume here")
    data: str | None = Field(default=None, description="The bytes, when valid UTF-8")
    data_base64: str | None = Field(default=None, description="The bytes otherwise (or asked)")

    @property
    def bytes(self) -> bytes:
        if self.data_base64 is not None:
            return base64.b64decode(self.data_base64)
        return (self.data or "").encode("utf-8")


class StartedEvent(BaseModel):
    """First frame of the WebSocket exec protocol: the command runs, under this id."""

    type: Literal["started"] = "started"
    command_id: str
    sandbox_id: str
    tty: bool = False


class HeartbeatEvent(BaseModel):
    """Sent when nothing else was for a while, so that idle connections stay open."""

    type: Literal["heartbeat"] = "heartbeat"
    next_offset: int | None = None


class ExitEvent(BaseModel):
    """Terminal: the command ended and this is its result."""

    type: Literal["exit"] = "exit"
    command_id: str
    status: CommandStatus
    exit_code: int | None = None
    signal: int | None = None
    duration_ms: int | None = None
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    error: str | None = None
    next_offset: int | None = None


class ErrorEvent(BaseModel):
    """Terminal: the stream ended without a result (`lost`: the result is unknown)."""

    type: Literal["error"] = "error"
    code: str
    message: str
    command_id: str | None = None
    next_offset: int | None = None


Event = Annotated[
    OutputEvent | StartedEvent | HeartbeatEvent | ExitEvent | ErrorEvent,
    Field(discriminator="type"),
]
TERMINAL_EVENTS = frozenset({"exit", "error"})


# --- WebSocket exec protocol: frames from the client -------------------------------------------


class ExecStartFrame(ExecRequest):
    """First client frame of `WS /v1/sandboxes/{id}/exec/stream`: what to run."""

    type: Literal["start"] = "start"
    kill_on_disconnect: bool = Field(
        default=False,
        description="Cancel the command when the WebSocket closes before it ends "
        "(by default it runs on; re-attach to it by id)",
    )


class StdinFrame(Strict):
    type: Literal["stdin"] = "stdin"
    data: str | None = None
    data_base64: str | None = None


class ResizeFrame(Strict):
    type: Literal["resize"] = "resize"
    rows: TerminalSize
    cols: TerminalSize


class SignalFrame(Strict):
    type: Literal["signal"] = "signal"
    signal: str | int = Field(description="A name (INT, SIGTERM, ...) or a number")


class CloseStdinFrame(Strict):
    type: Literal["close_stdin"] = "close_stdin"


class ClientHeartbeatFrame(Strict):
    type: Literal["heartbeat"] = "heartbeat"


ClientFrame = Annotated[
    StdinFrame | ResizeFrame | SignalFrame | CloseStdinFrame | ClientHeartbeatFrame,
    Field(discriminator="type"),
]


class SignalRequest(Strict):
    signal: str | int = Field(description="A name (INT, SIGTERM, ...) or a number")


class ResizeRequest(Strict):
    rows: TerminalSize
    cols: TerminalSize


class StdinWritten(BaseModel):
    bytes: int = Field(description="Bytes written to the command's standard input")
    closed: bool = Field(description="Whether standard input is now closed")


# --- files -------------------------------------------------------------------------------------

FileType = Literal[
    "file", "directory", "symlink", "fifo", "socket", "char_device", "block_device", "other"
]


class FileInfo(BaseModel):
    path: str
    name: str
    type: FileType
    size: int
    mode: int = Field(description="Permission bits (e.g. 420 = 0o644)")
    uid: int
    gid: int
    modified_at: datetime
    link_target: str | None = Field(default=None, description="For a symlink: where it points")


class FileList(BaseModel):
    path: str
    entries: list[FileInfo]
    truncated: bool = Field(default=False, description="More entries than `limit`")


class MkdirRequest(Strict):
    path: SandboxPath
    parents: bool = Field(default=True, description="Create missing parents; no error if it exists")
    mode: Annotated[int, Interval(ge=0, le=0o7777)] = 0o755


class MoveRequest(Strict):
    source: SandboxPath
    destination: SandboxPath
    overwrite: bool = False


class ArchiveUploaded(BaseModel):
    path: str = Field(description="The directory the archive was extracted into")
    entries: int
    bytes: int = Field(description="Uncompressed bytes of the regular files written")
    compressed_bytes: int = Field(description="Bytes received")


# --- code runs ---------------------------------------------------------------------------------

Language = Literal["typescript", "javascript", "python", "bash"]


class RunRequest(Strict):
    language: Language
    code: str | None = Field(default=None, description="The program (exactly one of code, path)")
    path: str | None = Field(default=None, description="A program file in the sandbox instead")
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment; for TypeScript and JavaScript also the only keys (with the "
        "sandbox's own) that the program may read",
    )
    cwd: str | None = Field(default=None, description="Absolute path; default /workspace")
    stdin: str | None = Field(default=None, description="Standard input as UTF-8 text")
    timeout_ms: Milliseconds | None = None
    max_output_bytes: Count | None = Field(default=None, description="Cap per stream")

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        return check_env(value)

    @field_validator("code", "path", "cwd", "stdin")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise ValueError("must not contain NUL bytes")
        return value

    @field_validator("args")
    @classmethod
    def _args(cls, value: list[str]) -> list[str]:
        if any("\x00" in a for a in value):
            raise ValueError("arguments must not contain NUL bytes")
        return value

    @field_validator("cwd")
    @classmethod
    def _cwd(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("must be an absolute path")
        return value


class RunError(BaseModel):
    name: str | None = None
    message: str
    stack: str | None = None
    value: Any = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="What `result.error` was given when it is neither an Error nor a string "
        "(TypeScript, JavaScript); `message` is its JSON text. Absent otherwise",
    )


class RunResult(BaseModel):
    command_id: str
    sandbox_id: str
    language: Language
    status: CommandStatus
    exit_code: int | None = None
    signal: int | None = None
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    result: Any = Field(default=None, description="The value given to result.set (JSON)")
    error: RunError | None = Field(
        default=None, description="From result.error, an uncaught error, a timeout, ..."
    )
    duration_ms: int | None = None


# --- the fleet's nodes ------------------------------------------------------------------------


class NodeState(enum.StrEnum):
    online = "online"
    offline = "offline"  # silent for longer than CORRAL_NODE_LOST_AFTER_S
    draining = "draining"  # online, takes no new sandboxes


class NodeCapacity(BaseModel):
    sandboxes: int = Field(ge=0, description="Sandboxes it holds at once")
    memory_mb: int = Field(ge=0, description="Host memory")
    cpus: float = Field(ge=0)


class NodeInfo(BaseModel):
    """What a node registers with (and what the built-in node says of itself)."""

    id: str
    version: str
    protocol: int
    runtime: str
    capacity: NodeCapacity
    templates: list[str]
    enforceable: dict[str, str] = Field(description="limit -> how this node enforces it")
    host_exec: bool = Field(default=False, description="Opened for commands on the host itself")
    deno: bool = Field(default=False, description="Has Deno: runs TypeScript and JavaScript")


class Node(BaseModel):
    id: str
    state: NodeState
    version: str
    runtime: str
    capacity: NodeCapacity
    sandboxes: int = Field(description="Live sandboxes placed on it")
    running_commands: int
    templates: list[str]
    enforceable: dict[str, str]
    host_exec: bool
    epoch: int = Field(description="Grows at each registration of the node")
    registered_at: datetime
    last_heartbeat: datetime


# --- ports -------------------------------------------------------------------------------------

PortNumber = Annotated[int, Interval(ge=1, le=65535)]


class PortExpose(Strict):
    port: PortNumber = Field(description="A TCP port on the sandbox's own loopback (1-65535)")
    public: bool = Field(default=False, description="Served without a token")


class Port(BaseModel):
    sandbox_id: str
    port: int
    public: bool
    url: str = Field(description="The path form: /v1/sandboxes/{id}/ports/{port}/")
    host_url: str | None = Field(
        description="The host form, <port>-<id>.<CORRAL_PUBLIC_DOMAIN>, when a domain is set"
    )
    created_at: datetime


class PortUrlCreate(Strict):
    port: PortNumber
    expires_in: Annotated[int, Interval(ge=1, le=7 * 24 * 3600)] = Field(
        default=3600, description="Seconds the URL works for (at most a week)"
    )


class PortUrl(BaseModel):
    url: str = Field(description="The path form, signed")
    host_url: str | None = Field(description="The host form, signed, when a domain is set")
    expires_at: datetime
