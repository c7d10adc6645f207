"""`python -m corral.deploy`: install the systemd units, or print a shipped file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from corral.deploy import ENV_EXAMPLES, UNITS, InstallError, install, read


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m corral.deploy",
        description="Install Corral's systemd units, or print a shipped unit or env example.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    put = commands.add_parser(
        "install",
        help="write the units of the given roles and the env examples",
        description="Write the units of the given roles (pointing at this environment's "
        "programs) and /etc/corral/*.env.example. Existing settings are left alone; run "
        "`systemctl daemon-reload` afterwards.",
    )
    put.add_argument(
        "roles",
        nargs="+",
        choices=sorted(UNITS),
        metavar="ROLE",
        help=f"one or more of: {', '.join(UNITS)}",
    )
    put.add_argument("--unit-dir", type=Path, default=Path("/etc/systemd/system"))
    put.add_argument("--etc-dir", type=Path, default=Path("/etc/corral"))
    put.add_argument(
        "--bin-dir",
        type=Path,
        default=None,
        help="where corral and nats-server are [default: beside this Python]",
    )
    show = commands.add_parser("show", help="print a shipped file")
    show.add_argument("name", choices=[*UNITS.values(), *ENV_EXAMPLES])
    args = parser.parse_args(argv)

    if args.command == "show":
        sys.stdout.write(read(args.name))
        return 0
    try:
        written = install(
            args.roles, unit_dir=args.unit_dir, etc_dir=args.etc_dir, bin_dir=args.bin_dir
        )
    except (InstallError, OSError) as exc:
        print(f"corral.deploy: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    units = " ".join(UNITS[r] for r in dict.fromkeys(args.roles))
    print(
        f"next: write the settings ({args.etc_dir}/*.env from the examples, or nats.conf), then "
        f"systemctl daemon-reload && systemctl enable --now {units}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
