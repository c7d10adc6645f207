"""Running skopeo: registry and archive access, credentials kept off the command line, and its
errors translated into the store's."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.runtime.images.errors import (
    DigestMismatchError,
    ImageArchiveError,
    ImageError,
    ImageNotFoundError,
    ImageStoreFullError,
    RegistryAuthError,
    RegistryError,
    UnsupportedImageError,
)

SKOPEO = "skopeo"
DEFAULT_REGISTRY = "docker.io"
TIMEOUT = 1800.0  # seconds for one copy: big images over slow links


@dataclass(frozen=True)
class RegistryAuth:
    """Credentials for one registry: a user and password (or a registry token used as the
    password), or an identity token (an OAuth refresh token). The registry's token flow (Bearer
    challenges) is handled by skopeo with these."""

    username: str | None = None
    password: str | None = None
    identity_token: str | None = None

    def __repr__(self) -> str:  # never print secrets in logs or tracebacks
        return f"RegistryAuth(username={self.username!r}, password=***)"


def registry_of(reference: str) -> str:
    """The registry host[:port] a reference names (Docker's rule: a first component with a dot,
    a colon or `localhost` is a host; anything else is on Docker Hub)."""
    first, sep, _ = reference.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first
    return DEFAULT_REGISTRY


_REFERENCE = re.compile(r"^[a-z0-9][A-Za-z0-9._:/@+-]*$")


def check_reference(reference: str) -> str:
    if not reference or len(reference) > 1024 or not _REFERENCE.fullmatch(reference):
        raise ImageError(f"not an image reference: {reference[:100]!r}")
    return reference


def is_insecure(registry: str, insecure_registries: Iterable[str]) -> bool:
    return registry in {r.strip() for r in insecure_registries if r.strip()}


def _authfile(tmp_dir: Path, registry: str, auth: RegistryAuth) -> Path:
    entry: dict[str, str] = {}
    if auth.identity_token:
        entry["identitytoken"] = auth.identity_token
    if auth.username is not None or auth.password is not None:
        pair = f"{auth.username or ''}:{auth.password or ''}".encode()
        entry["auth"] = base64.b64encode(pair).decode()
    fd, name = tempfile.mkstemp(prefix="auth-", suffix=".json", dir=tmp_dir)  # mode 0600
    with os.fdopen(fd, "w") as f:
        json.dump({"auths": {registry: entry}}, f)
    return Path(name)


def copy(
    source: str,
    dest_layout: Path,
    tag: str,
    *,
    tmp_dir: Path,
    tls_verify: bool = True,
    auth: RegistryAuth | None = None,
    registry: str | None = None,
    what: str,
) -> str:
    """`skopeo copy SOURCE oci:DEST_LAYOUT:TAG`; returns skopeo's output. Credentials go in a
    0600 auth file that is removed afterwards, never in argv."""
    remote = source.startswith("docker://")
    return _run(
        ["copy", "--retry-times", "2"], [source, f"oci:{dest_layout}:{tag}"],
        prefix="--src-" if remote else None, tmp_dir=tmp_dir, tls_verify=tls_verify,
        auth=auth, registry=registry, what=what, hide=[str(dest_layout)],
    )  # fmt: skip


def inspect_raw(
    reference: str,
    *,
    tmp_dir: Path,
    tls_verify: bool = True,
    auth: RegistryAuth | None = None,
    registry: str,
) -> dict[str, Any]:
    """`skopeo inspect --raw`: the manifest (or image index) a registry serves for
    `reference`, before any blob is fetched."""
    out = _run(
        ["inspect", "--raw", "--retry-times", "2"], [f"docker://{reference}"], prefix="--",
        tmp_dir=tmp_dir, tls_verify=tls_verify, auth=auth, registry=registry, what=reference,
    )  # fmt: skip
    try:
        data = json.loads(out)
    except ValueError:
        raise RegistryError(f"{reference}: the registry served an unreadable manifest") from None
    if not isinstance(data, dict):
        raise RegistryError(f"{reference}: the registry served an unreadable manifest")
    return data


def repository_of(reference: str) -> str:
    """`host/name` of `host/name:tag` or `host/name@digest`."""
    if "@" in reference:
        return reference.split("@", 1)[0]
    head, sep, last = reference.rpartition("/")
    name = last.split(":", 1)[0]
    return f"{head}{sep}{name}"


def _run(
    command: list[str],
    operands: list[str],
    *,
    prefix: str | None,
    tmp_dir: Path,
    tls_verify: bool,
    auth: RegistryAuth | None,
    registry: str | None,
    what: str,
    hide: list[str] = [],  # noqa: B006 - never mutated
) -> str:
    argv = [SKOPEO, "--insecure-policy", *command]
    authfile: Path | None = None
    if prefix is not None:  # options of the registry side, `--src-…` for copy, `--…` for inspect
        if not tls_verify:
            argv.append(f"{prefix}tls-verify=false")
        if auth is not None and registry is not None:
            authfile = _authfile(tmp_dir, registry, auth)
            argv += [f"{prefix}authfile", str(authfile)]
        else:
            argv.append(f"{prefix}no-creds")
    argv += operands
    env = {**os.environ, "TMPDIR": str(tmp_dir)}
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=TIMEOUT, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        raise RegistryError(f"{what}: no answer within {TIMEOUT:.0f} s") from None
    except FileNotFoundError:
        raise ImageError("skopeo is not installed on this node") from None
    finally:
        if authfile is not None:
            authfile.unlink(missing_ok=True)
    if done.returncode != 0:
        raise _translate(done.stderr, what, [str(tmp_dir), *hide], auth is not None)
    return done.stdout


_LOG_LINE = re.compile(r'^time="[^"]*" level=(\w+) msg="(.*)"\s*$')


def _translate(stderr: str, what: str, hide: list[str], had_auth: bool) -> ImageError:
    """skopeo's fatal message, without its log framing or the store's paths, as the fitting
    ImageError."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    text = lines[-1] if lines else "skopeo failed"
    for line in reversed(lines):
        if (m := _LOG_LINE.match(line)) and m.group(1) == "fatal":
            text = m.group(2).replace('\\"', '"')
            break
    for path in sorted(hide, key=len, reverse=True):
        text = text.replace(path, "<store>")
    text = text[:500]
    low = text.lower()
    if "no space left" in low or "quota exceeded" in low:
        return ImageStoreFullError(f"{what}: the node's image store is out of space")
    if "no image found in" in low and ("index" in low or "manifest list" in low):
        return UnsupportedImageError(f"{what}: no image for this node's platform ({text})")
    if "digest did not match" in low or "digest mismatch" in low:
        return DigestMismatchError(f"{what}: a blob does not match its digest ({text})")
    if "unauthorized" in low or "authentication required" in low or "denied" in low:
        if not had_auth:
            return RegistryAuthError(f"{what}: the registry wants credentials ({text})")
        return RegistryAuthError(f"{what}: the registry refused the credentials ({text})")
    if "manifest unknown" in low or "name unknown" in low or "not found" in low:
        return ImageNotFoundError(f"{what}: no such image ({text})")
    if "archive" in low or "oci-layout" in low or "invalid tar" in low:
        return ImageArchiveError(f"{what}: {text}")
    return RegistryError(f"{what}: {text}")
