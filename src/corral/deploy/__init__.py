"""What an operator needs to run Corral as a fleet, shipped with the package.

- systemd units: `corral-server.service` (one API replica), `corral-agent.service` (one node),
  `corral-nats.service` (the NATS server they talk over);
- example settings for them: `server.env.example`, `agent.env.example` (to copy to
  `/etc/corral/server.env` and `/etc/corral/agent.env`);
- `corral.deploy.nats_config`: writes the NATS server's configuration, one user per node limited
  to that node's subjects (`python -m corral.deploy.nats_config --help`).

The units name their programs under `/opt/corral/bin/`; `python -m corral.deploy install` writes
them to `/etc/systemd/system` pointing at the programs of the environment it runs from instead
(docs/fleet.md, "Deploying on three hosts").
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

__all__ = [
    "ENV_EXAMPLES",
    "UNITS",
    "InstallError",
    "install",
    "read",
    "unit_text",
]

UNITS = {
    "server": "corral-server.service",
    "agent": "corral-agent.service",
    "nats": "corral-nats.service",
}
ENV_EXAMPLES = ("server.env.example", "agent.env.example")
NATS_SYSTEM_USER = "corral-nats"

# The programs' directory as the shipped units name it.
SHIPPED_BIN_DIR = "/opt/corral/bin/"
# The program each unit starts, looked up in the bin dir at install.
_PROGRAMS = {"server": "corral", "agent": "corral", "nats": "nats-server"}


class InstallError(RuntimeError):
    """A unit cannot be installed as asked (a program missing, a bad destination)."""


def read(name: str) -> str:
    """The text of a shipped file (a unit or an env example), by file name."""
    if name not in UNITS.values() and name not in ENV_EXAMPLES:
        raise KeyError(f"no shipped deployment file {name!r}")
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def unit_text(name: str, bin_dir: Path) -> str:
    """A shipped unit with its programs taken from `bin_dir` instead of /opt/corral/bin."""
    text = read(name)
    return text.replace(SHIPPED_BIN_DIR, f"{bin_dir.as_posix().rstrip('/')}/")


def default_bin_dir() -> Path:
    """Where this environment's programs are: beside its Python (a venv's bin)."""
    return Path(sys.executable).parent


def install(
    roles: Iterable[str],
    *,
    unit_dir: Path = Path("/etc/systemd/system"),
    etc_dir: Path = Path("/etc/corral"),
    bin_dir: Path | None = None,
    create_user: bool = True,
) -> list[Path]:
    """Write the units of `roles` ("server", "agent", "nats") and the env examples.

    Existing settings (`/etc/corral/*.env`, `nats.conf`) are never touched: only the units and
    the `.example` files are (re)written. Returns the files written.
    """
    bin_dir = (bin_dir or default_bin_dir()).absolute()
    roles = list(dict.fromkeys(roles))
    unknown = [r for r in roles if r not in UNITS]
    if unknown or not roles:
        raise InstallError(f"roles are {', '.join(UNITS)}; got {', '.join(unknown) or 'none'}")
    for role in roles:
        program = bin_dir / _PROGRAMS[role]
        if not os.access(program, os.X_OK):
            hint = " (pip install 'corral[nats]')" if role == "nats" else ""
            raise InstallError(f"{program} is not an executable program{hint}: pass --bin-dir")
    if "nats" in roles and create_user:
        _ensure_system_user(NATS_SYSTEM_USER)

    written: list[Path] = []
    unit_dir.mkdir(parents=True, exist_ok=True)
    for role in roles:
        target = unit_dir / UNITS[role]
        _write(target, unit_text(UNITS[role], bin_dir), 0o644)
        written.append(target)
    if not etc_dir.exists():
        # Traversable: the NATS server's own user reads nats.conf there through its group.
        etc_dir.mkdir(parents=True)
        etc_dir.chmod(0o755)
    for name in ENV_EXAMPLES:
        target = etc_dir / name
        _write(target, read(name), 0o644)
        written.append(target)
    return written


def _write(path: Path, text: str, mode: int) -> None:
    # Whole or not at all: a unit half written would be read by the next daemon-reload.
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    partial.chmod(mode)
    partial.replace(path)


def _ensure_system_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
        return
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is None:
        raise InstallError(f"no user {name!r} and no useradd to create it: create it first")
    nologin = next(
        (s for s in ("/usr/sbin/nologin", "/sbin/nologin") if Path(s).exists()), "/bin/false"
    )
    result = subprocess.run(
        [useradd, "--system", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", nologin, name],
        capture_output=True, text=True,
    )  # fmt: skip
    if result.returncode != 0:
        raise InstallError(f"useradd {name} failed: {result.stderr.strip()}")
