"""Ports: a large download from a service inside a sandbox through the port proxy, beside the raw
output stream of the same size, and the server's memory meanwhile.

    .venv/bin/python -m bench.ports [--size-mb 1024] [--reps 2]

The sandbox has `"network": "none"`; its service (the standard library's HTTP server, writing
from one 1 MiB buffer) is reached through the path form with a token. The raw stream is a
command printing as many bytes, read through `logs?format=raw` (what the main bench's streams
phase measures). Repetitions are interleaved so that both see the same host load. The server's
RSS is sampled during each download: the proxy streams, so its growth stays near a few buffers
whatever the size.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import baselines as bare
from bench.common import Sample, Server, pick_uid_base, proc_rss
from corral.runtime.uids import pool_range

ADMIN_KEY = "crl_bench_ports_0123456789"
MIB = 1024 * 1024
PORT = 8000

SERVICE = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
BLOCK = b"x" * (1 << 20)
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_GET(self):
        n = int(self.path.rsplit("/", 1)[1])
        self.send_response(200)
        self.send_header("Content-Length", str(n))
        self.end_headers()
        while n:
            piece = BLOCK[: min(n, len(BLOCK))]
            self.wfile.write(piece)
            n -= len(piece)
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the server makes real sandboxes")
    size = args.size_mb * MIB
    server = Server(
        uid_base=pick_uid_base(720_000, len(pool_range(0, 16))),
        uid_count=16,
        admin_key=ADMIN_KEY,
        env={"CORRAL_WARM_POOL": "0", "CORRAL_MAX_OUTPUT_BYTES_LIMIT": str(size + MIB)},
        tag="bench-ports",
    )
    server.start()
    try:
        with server.client() as api:
            sid = api.post("/v1/sandboxes", json={}).raise_for_status().json()["id"]
            api.put(
                f"/v1/sandboxes/{sid}/files", params={"path": "/workspace/s.py"}, content=SERVICE
            ).raise_for_status()
            command = f"exec python3 /workspace/s.py {PORT}"
            api.post(f"/v1/sandboxes/{sid}/commands", json={"command": command})
            api.post(f"/v1/sandboxes/{sid}/ports", json={"port": PORT}).raise_for_status()
            deadline = time.monotonic() + 15
            while api.get(f"/v1/sandboxes/{sid}/ports/{PORT}/0").status_code != 200:
                if time.monotonic() > deadline:
                    raise SystemExit("the service in the sandbox did not start")
                time.sleep(0.05)
            port_rates: list[float] = []
            raw_rates: list[float] = []
            growth: list[float] = []
            for _ in range(args.reps):
                before = peak = proc_rss(server.pid)
                started = time.perf_counter()
                got = 0
                with api.stream("GET", f"/v1/sandboxes/{sid}/ports/{PORT}/{size}") as r:
                    r.raise_for_status()
                    for i, chunk in enumerate(r.iter_raw(1 << 20)):
                        got += len(chunk)
                        if i % 16 == 0:
                            peak = max(peak, proc_rss(server.pid))
                took = time.perf_counter() - started
                if got != size:
                    raise SystemExit(f"the port gave {got} of {size} bytes")
                port_rates.append(size / took / 1e6)
                growth.append((peak - before) / MIB)

                producer = bare.producer(size)
                body = {"command": producer, "max_output_bytes": size}
                started = time.perf_counter()
                cid = api.post(f"/v1/sandboxes/{sid}/commands", json=body).json()["id"]
                got = 0
                with api.stream(
                    "GET",
                    f"/v1/sandboxes/{sid}/commands/{cid}/logs",
                    params={"format": "raw", "stream": "stdout"},
                ) as r:
                    for chunk in r.iter_raw(1 << 20):
                        got += len(chunk)
                took = time.perf_counter() - started
                if got != size:
                    raise SystemExit(f"the raw stream gave {got} of {size} bytes")
                raw_rates.append(size / took / 1e6)
            port = Sample(port_rates, kind="rate")
            raw = Sample(raw_rates, kind="rate")
            print(f"{args.size_mb} MiB, {args.reps} repetitions, interleaved")
            print(f"{'':34} {'median':>10} {'slowest':>10}")
            print(f"{'port download (path form)':34} {port.median:>8.0f} MB/s {port.tail:>5.0f}")
            print(f"{'raw output stream':34} {raw.median:>8.0f} MB/s {raw.tail:>5.0f}")
            print(f"ratio port/raw (median): {port.median / raw.median:.2f}")  # type: ignore[operator]
            print(f"server RSS growth during a download: at most {max(growth):.1f} MiB")
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
