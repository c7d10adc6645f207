"""Summarise py-spy raw (collapsed) stacks: where the server's CPU samples go.

    .venv/bin/python -m bench.profile_summary bench/profiles/throughput_32.txt [--top 25]

Prints the share of samples per category (inclusive: a stack counts for every category it
touches), an exclusive split by exec stage (each stack counts once, for the first stage it
matches), the top functions by inclusive and by self samples, and the top corral frames.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# (label, patterns on "file:function"); a stack counts once per category it touches.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("DB: SQLAlchemy + aiosqlite (all)", ("sqlalchemy/", "aiosqlite/", "sqlite3/")),
    (
        "DB: session commit/flush",
        (
            "Session.commit",
            "Session.flush",
            "AsyncSession.commit",
            "SessionTransaction.commit",
            "_flush",
        ),
    ),
    (
        "DB: ORM query/compile (select/get)",
        (
            "compiler.py",
            "Session.get",
            "AsyncSession.get",
            "Session.execute",
            "AsyncSession.scalar",
        ),
    ),
    ("pydantic validate/serialize", ("pydantic/", "pydantic_core")),
    ("JSON encode/decode", ("json/", "jsonable_encoder", "JSONResponse.render", "orjson")),
    ("FastAPI routing + dependencies", ("fastapi/routing.py", "fastapi/dependencies/")),
    ("Starlette middleware/responses", ("starlette/",)),
    ("uvicorn + httptools (HTTP parse/write)", ("uvicorn/",)),
    ("corral API layer (auth, middleware, routes)", ("corral/api/",)),
    ("corral core services", ("corral/core/",)),
    ("token authentication", ("TokenService.authenticate", "tokens.py")),
    ("node: execution supervise/log", ("corral/node/",)),
    ("runtime: spawn + supervisor socket", ("corral/runtime/namespaces.py",)),
    (
        "runtime: cgroups + limits (mkdir/rmdir/open)",
        ("corral/runtime/cgroups.py", "corral/runtime/limits.py"),
    ),
    (
        "subprocess/fork/exec in server",
        (
            "subprocess.py",
            "_posixsubprocess",
            "os.fork",
            "create_subprocess_exec",
            "base_subprocess",
        ),
    ),
    (
        "thread hops (to_thread / executors)",
        ("asyncio/threads.py", "concurrent/futures/thread.py", "run_in_executor"),
    ),
    ("output log files (open/read/write)", ("corral/node/output_log.py",)),
    ("logging", ("logging/",)),
    ("id generation", ("corral/ids.py",)),
]


def parse(path: Path) -> list[tuple[list[tuple[str, str]], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        line = line.rstrip()
        if not line:
            continue
        body, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = []
        for raw in body.split(";"):
            m = FRAME.match(raw)
            if m:
                frames.append((m.group("func"), m.group("file")))
            else:
                frames.append((raw, ""))
        stacks.append((frames, int(count)))
    return stacks


# (label, pattern on the joined stack); first match wins, so each sample counts once. Asyncio
# tasks resume with only their own frames on the stack: a resumed FastAPI pipeline matches
# "fastapi/", not the middleware that started it.
STAGES: list[tuple[str, str]] = [
    ("spawn, node side (cgroups, fds, message, wait for 'started')", "NamespacesSandbox.spawn"),
    ("exec endpoint, other (lookups, command row, reply)", "exec_command"),
    ("command supervision task (pipes, exit, usage, outcome)", "LocalExecution._supervise"),
    ("supervisor socket reader", "NamespacesSandbox._on_readable"),
    ("result recording (_finish, _insert)", "CommandService._finish"),
    ("result recording (_finish, _insert)", "CommandService._insert"),
    ("group commit (task and thread)", "BatchWriter"),
    ("cgroup removal (thread)", "_remove_cgroups"),
    ("HTTP + ASGI + FastAPI outside the endpoint", "RequestContext.__call__"),
    ("HTTP + ASGI + FastAPI outside the endpoint", "fastapi/"),
    ("HTTP + ASGI + FastAPI outside the endpoint", "starlette/"),
    ("HTTP parse/write (uvicorn protocol)", "uvicorn/protocols"),
    ("database, other (SQLAlchemy, aiosqlite)", "sqlalchemy/"),
    ("database, other (SQLAlchemy, aiosqlite)", "aiosqlite/"),
    ("thread pools (hand-off)", "concurrent/futures"),
]


def stages(path: Path) -> str:
    stacks = parse(path)
    total = sum(c for _, c in stacks) or 1
    split: Counter[str] = Counter()
    for frames, count in stacks:
        text = ";".join(f"{f} ({file})" for f, file in frames)
        for label, pattern in STAGES:
            if pattern in text:
                split[label] += count
                break
        else:
            leaf = frames[-1][0] if frames else ""
            split["event loop itself" if leaf == "Runner.run" else "other"] += count
    out = ["exclusive split by stage (each sample once):"]
    for label, c in split.most_common():
        out.append(f"  {c / total * 100:5.1f}%  {label}")
    return "\n".join(out)


def summarise(path: Path, top: int = 25) -> str:
    stacks = parse(path)
    total = sum(c for _, c in stacks) or 1
    cats: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    corral: Counter[str] = Counter()
    for frames, count in stacks:
        keys = [f"{f} ({file})" for f, file in frames]
        text = ";".join(f"{file}:{f}" for f, file in frames)
        for label, pats in CATEGORIES:
            if any(p in text for p in pats):
                cats[label] += count
        for k in set(keys):
            incl[k] += count
        if keys:
            self_[keys[-1]] += count
        for k in {k for k in keys if "corral/" in k}:
            corral[k] += count
    out = [f"{path.name}: {total} samples", "", "category (inclusive share of samples):"]
    for label, _ in CATEGORIES:
        if cats[label]:
            out.append(f"  {cats[label] / total * 100:5.1f}%  {label}")
    out += ["", stages(path)]
    out += ["", f"top {top} functions, inclusive:"]
    for k, c in incl.most_common(top):
        out.append(f"  {c / total * 100:5.1f}%  {k}")
    out += ["", f"top {top} functions, self:"]
    for k, c in self_.most_common(top):
        out.append(f"  {c / total * 100:5.1f}%  {k}")
    out += ["", f"top {top} corral frames, inclusive:"]
    for k, c in corral.most_common(top):
        out.append(f"  {c / total * 100:5.1f}%  {k}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    for f in args.files:
        print(summarise(f, args.top))
        print()


if __name__ == "__main__":
    main()
