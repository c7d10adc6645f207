"""Code-run launcher, inside a sandbox: `python3 -I -S run.py LANGUAGE`.

Standard input starts with one JSON line (the run: language, private directory, argument list,
permitted environment keys, network, length of the code), then the code itself, then the
program's own standard input, which is left unread for it. The launcher writes the code and a
small prelude defining `result` into the run's private directory (mode 0700, a random name chosen
by the server), then becomes the interpreter (exec), so that signals, the exit status and the
output are the program's own. The prelude writes the result to files in that directory; the
server collects them afterwards (`files.py take_result`) and removes the directory.

TypeScript and JavaScript run on Deno with permissions: read and write only /workspace and /tmp
(and read /etc/resolv.conf and /etc/hosts, for name lookups), the environment only the permitted
keys and TMPDIR (set to /tmp unless the run sets it), the network only when the sandbox's policy
has one, no subprocesses, FFI or system information. `result.error(value)` with a value that is
neither an Error nor a string records its JSON text as the message and the value itself.
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DENO = os.path.join(HERE, "deno")
MAX_HEADER = 1 << 20
EXTENSIONS = {"typescript": "ts", "javascript": "js", "python": "py", "bash": "sh"}
# What a program's name lookups read (the sandbox's own, not the host's), readable on Deno.
ETC_READABLE = ("/etc/resolv.conf", "/etc/hosts")

JS_PRELUDE = """\
const dir = %(dir)s;
let recorded = false;
function write(name, value) {
  const path = `${dir}/${name}`;
  Deno.writeTextFileSync(`${path}.tmp`, JSON.stringify(value));
  Deno.renameSync(`${path}.tmp`, path);
}
function describe(err) {
  if (err instanceof Error) {
    return { name: err.name, message: err.message, stack: err.stack ?? null };
  }
  if (typeof err === "string") return { name: null, message: err, stack: null };
  let message;
  try { message = JSON.stringify(err); } catch { message = undefined; }
  // The value itself too, for callers that want it back as given.
  return { name: null, message: message ?? String(err), stack: null,
           value: message === undefined ? null : err };
}
const result = Object.freeze({
  /** The run's result: any JSON value, returned beside stdout and stderr. */
  set(value) {
    const text = JSON.stringify(value);
    if (text === undefined) throw new TypeError("result.set: the value is not JSON");
    const path = `${dir}/value.json`;
    Deno.writeTextFileSync(`${path}.tmp`, text);
    Deno.renameSync(`${path}.tmp`, path);
  },
  /** Record an error; the program then exits with status 1 (unless it exits otherwise). */
  error(err) {
    recorded = true;
    write("error.json", describe(err));
    Deno.exitCode = 1;
  },
});
Object.defineProperty(globalThis, "result", { value: result, enumerable: false });
addEventListener("error", (event) => {
  if (!recorded) write("error.json", describe(event.error));
});
addEventListener("unhandledrejection", (event) => {
  if (!recorded) write("error.json", describe(event.reason));
});
"""

BASH_PRELUDE = """\
unset BASH_ENV
__corral_run_dir=%(dir)s
result.set() { printf '%%s' "$1" > "$__corral_run_dir/value.json.tmp" && \
mv -f "$__corral_run_dir/value.json.tmp" "$__corral_run_dir/value.json"; }
result.error() { printf '%%s' "$*" > "$__corral_run_dir/error.txt"; exit 1; }
result_set() { result.set "$@"; }
result_error() { result.error "$@"; }
"""


def _read_exact(count: int) -> bytes:
    chunks = []
    while count > 0:
        data = os.read(0, min(count, 1 << 20))
        if not data:
            raise SystemExit("corral: the code run's input ended early")
        chunks.append(data)
        count -= len(data)
    return b"".join(chunks)


def _read_line() -> bytes:
    # One byte at a time: whatever follows the code is the program's, and must stay unread.
    line = bytearray()
    while True:
        byte = os.read(0, 1)
        if not byte:
            raise SystemExit("corral: the code run's input ended early")
        if byte == b"\n":
            return bytes(line)
        line += byte
        if len(line) > MAX_HEADER:
            raise SystemExit("corral: the code run's header is too long")


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def main() -> None:
    run = json.loads(_read_line())
    language = run["language"]
    directory = run["dir"]
    code = _read_exact(int(run["code_bytes"]))
    os.mkdir(directory, 0o700)  # fails if anything is there already
    if run.get("path"):
        program = os.path.abspath(run["path"])
    else:
        program = os.path.join(directory, "main." + EXTENSIONS[language])
        _write(program, code)
    args = [str(a) for a in run.get("args", [])]
    env = dict(os.environ)
    if language in ("typescript", "javascript"):
        prelude = os.path.join(directory, "prelude.js")
        _write(prelude, (JS_PRELUDE % {"dir": json.dumps(directory)}).encode())
        argv = [
            DENO,
            "run",
            "--no-prompt",
            "--allow-read=/workspace,/tmp," + ",".join(ETC_READABLE),
            "--allow-write=/workspace,/tmp",
        ]
        # TMPDIR is readable: Deno's and Node's temp-dir lookups ask for it.
        keys = [k for k in [*run.get("env_keys", []), "TMPDIR"] if k and "," not in k]
        if keys:
            argv.append("--allow-env=" + ",".join(keys))
        if run.get("net"):
            argv.append("--allow-net")
        argv += ["--preload", prelude, program, *args]
        env.update(DENO_DIR="/tmp/.deno", DENO_NO_UPDATE_CHECK="1", NO_COLOR="1")
        env.setdefault("TMPDIR", "/tmp")
        if not os.access(DENO, os.X_OK):
            raise SystemExit("corral: Deno is not installed on this server")
    elif language == "python":
        argv = ["python3", os.path.join(HERE, "pyrun.py"), directory, program, *args]
    elif language == "bash":
        prelude = os.path.join(directory, "prelude.sh")
        _write(prelude, (BASH_PRELUDE % {"dir": _quote(directory)}).encode())
        env["BASH_ENV"] = prelude
        argv = ["bash", program, *args]
    else:
        raise SystemExit(f"corral: unknown language {language!r}")
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        sys.stderr.write(f"corral: cannot run {argv[0]}: {exc.strerror}\n")
        os._exit(127)


if __name__ == "__main__":
    main()
