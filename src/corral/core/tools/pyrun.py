"""Runs a Python code run with `result` defined: `python3 pyrun.py DIR PROGRAM ARGS...`.

`result.set(value)` records the run's result (any JSON-serializable value); `result.error(err)`
records an error (an exception or a message) and makes the exit status 1 unless the program
exits otherwise. `result` is a builtin, and also `from corral_result import result`. An uncaught
exception is recorded as the error, printed as Python would, and exits with status 1.
"""

from __future__ import annotations

import builtins
import json
import os
import runpy
import sys
import traceback
import types


class Result:
    def __init__(self, directory: str) -> None:
        self._dir = directory
        self.failed = False

    def _write(self, name: str, text: str) -> None:
        path = os.path.join(self._dir, name)
        temp = f"{path}.{os.getpid()}.tmp"
        with open(temp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temp, path)

    def set(self, value: object) -> None:
        """The run's result: any JSON value, returned beside stdout and stderr."""
        self._write("value.json", json.dumps(value))

    def error(self, err: object) -> None:
        """Record an error; the program then exits with status 1 (unless it exits otherwise)."""
        self.failed = True
        self._write("error.json", json.dumps(describe(err)))

    def __repr__(self) -> str:
        return "<corral result: result.set(value), result.error(err)>"


def describe(err: object) -> dict:
    if isinstance(err, BaseException):
        stack = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        return {"name": type(err).__name__, "message": str(err), "stack": stack or None}
    if isinstance(err, str):
        return {"name": None, "message": err, "stack": None}
    try:
        message = json.dumps(err)
    except (TypeError, ValueError):
        message = repr(err)
    return {"name": None, "message": message, "stack": None}


def _user_traceback(exc: BaseException, program: str) -> types.TracebackType | None:
    tb = exc.__traceback__
    while tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename) != program:
        tb = tb.tb_next
    return tb or exc.__traceback__


def main() -> None:
    directory, program = sys.argv[1], os.path.abspath(sys.argv[2])
    sys.argv = sys.argv[2:]
    result = Result(directory)
    builtins.result = result  # type: ignore[attr-defined]
    module = types.ModuleType("corral_result")
    module.result = result  # type: ignore[attr-defined]
    sys.modules["corral_result"] = module
    sys.path[0] = os.path.dirname(program)
    try:
        runpy.run_path(program, run_name="__main__")
    except SystemExit:
        raise
    except BaseException as exc:
        tb = _user_traceback(exc, program)
        if not result.failed:
            stack = "".join(traceback.format_exception(type(exc), exc, tb))
            result._write(
                "error.json",
                json.dumps({"name": type(exc).__name__, "message": str(exc), "stack": stack}),
            )
        if isinstance(exc, KeyboardInterrupt):
            raise
        traceback.print_exception(type(exc), exc, tb)
        sys.stderr.flush()
        sys.exit(1)
    if result.failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
