"""Fixtures shared by modules of this directory (each instantiated only where asked for)."""

from tests.integration.egress_hosts import eapi, egress_hosts, egress_server

__all__ = ["eapi", "egress_hosts", "egress_server"]
