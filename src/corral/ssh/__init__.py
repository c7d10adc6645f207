"""The SSH front (cmd.io face): `ssh -p PORT TOKEN@host <command> [args]`."""

from corral.ssh.server import start_ssh_server

__all__ = ["start_ssh_server"]
