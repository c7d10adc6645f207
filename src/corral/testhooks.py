"""Test hooks: points where a test makes the server die as a crash would.

`CORRAL_TEST_CRASH_AT=<point>` makes the process SIGKILL itself when it reaches that point; the
tests use it to check that what was committed before a crash is found again after a restart.
Unset (always, outside the tests), every point is a no-op.
"""

from __future__ import annotations

import os
import signal

ENV = "CORRAL_TEST_CRASH_AT"
SANDBOX_CREATED = "sandbox-created"  # a sandbox's row is committed; nothing is answered yet


def crash_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
