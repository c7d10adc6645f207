"""Identifiers: a short type prefix plus a time-ordered, URL-safe random part.

Time-ordered so that ids sort in creation order (cheap pagination); the random part has 80 bits,
enough that ids can be handed out without coordination by several servers.
"""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case


def _b32(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


_last = (0, 0)  # (ms, random part) of the latest id made by this process


def new_id(prefix: str) -> str:
    """`prefix_` + 10 chars of milliseconds + 16 chars of randomness.

    Within one millisecond the random part of the previous id is incremented instead, so ids
    made by one process sort in creation order (as ULIDs do).
    """
    global _last
    ms = time.time_ns() // 1_000_000
    last_ms, last_rand = _last
    if ms <= last_ms and last_rand < (1 << 80) - 1:
        ms, rand = last_ms, last_rand + 1
    else:
        rand = int.from_bytes(os.urandom(10), "big") >> 1  # room to increment
    _last = (ms, rand)
    return f"{prefix}_{_b32(ms, 10)}{_b32(rand, 16)}"


SANDBOX = "sb"
VOLUME = "vol"
SNAPSHOT = "snap"
COMMAND = "cmd"
TOKEN = "tok"
WEBHOOK = "whk"
EVENT = "evt"
DELIVERY = "dlv"
ATTEMPT = "att"
