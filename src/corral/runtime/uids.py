"""The host uids (and gids) a sandbox's user namespace maps to.

Each sandbox slot owns a block of SLOT_UIDS consecutive host uids, none of them privileged on the
host. Inside, the block is the uids an image's files and programs use: 0 to 1007 (root, system
users such as apt's `_apt`, the sandbox user 1000, users added with `useradd`) and 65520 to 65534
(`nobody`, distroless `nonroot`). A file of any other uid in an image shows as nobody.
"""

from __future__ import annotations

SLOT_UIDS = 1024
# (first uid inside, count), packed in this order into the slot's block.
EXTENTS = ((0, 1008), (65520, 15))
SANDBOX_UID = 1000  # the sandbox's ordinary user
NOBODY = 65534


def slot_base(uid_base: int, slot: int) -> int:
    """The host uid that uid 0 of the slot's sandbox maps to."""
    return uid_base + SLOT_UIDS * slot


def to_host(base: int, inside: int) -> int:
    """The host uid of `inside` in the sandbox whose block starts at `base`."""
    offset = 0
    for first, count in EXTENTS:
        if first <= inside < first + count:
            return base + offset + inside - first
        offset += count
    raise ValueError(f"uid {inside} is not mapped in a sandbox")


def mapping(base: int) -> str:
    """The uid_map (and gid_map) text of a user namespace over the block starting at `base`."""
    lines, offset = [], 0
    for first, count in EXTENTS:
        lines.append(f"{first} {base + offset} {count}\n")
        offset += count
    return "".join(lines)


def pool_range(uid_base: int, slots: int) -> range:
    """Every host uid a node with slots 0 to `slots` may give its sandboxes."""
    return range(uid_base, uid_base + SLOT_UIDS * (slots + 1))
