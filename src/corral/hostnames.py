"""Host name patterns of network allow-lists: `api.example.com` (that name only) and
`*.example.com` (every name under example.com, at any depth, but not example.com itself: list
both to allow both). Names are compared lower-case, without a trailing dot; only ASCII names
(IDNs in their xn-- form)."""

from __future__ import annotations

import ipaddress
import re

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
MAX_NAME = 253


def normalize(name: str) -> str:
    return name.strip().lower().rstrip(".")


def check_name(text: str) -> str:
    """A host name in normal form; ValueError saying what is wrong with it."""
    name = normalize(text)
    labels = name.split(".")
    if not name or len(name) > MAX_NAME or len(labels) < 2:
        raise ValueError(f"not a host name with a domain: {text!r}")
    for label in labels:
        if not _LABEL.match(label):
            raise ValueError(f"not a host name: {text!r} (label {label!r})")
    if labels[-1].isdigit():
        raise ValueError(f"not a host name: {text!r} (looks like an address)")
    return name


def check_pattern(text: str) -> str:
    """A host name or `*.domain` wildcard in normal form; ValueError when it is neither."""
    pattern = normalize(text)
    if pattern.startswith("*."):
        rest = pattern[2:]
        if "*" in rest or "." not in rest:
            raise ValueError(f"a wildcard must be *.DOMAIN with a dotted domain: {text!r}")
        return "*." + check_name(rest)
    if "*" in pattern:
        raise ValueError(f"a wildcard may only be a leading '*.': {text!r}")
    return check_name(pattern)


def is_cidr(text: str) -> bool:
    try:
        ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        return False
    return True


def matches(pattern: str, name: str) -> bool:
    name = normalize(name)
    if pattern.startswith("*."):
        return name.endswith(pattern[1:]) and len(name) > len(pattern) - 1
    return name == pattern


def allowed(patterns: tuple[str, ...] | list[str], name: str) -> bool:
    return any(matches(p, name) for p in patterns)
