"""The run-dat-sheesh API (seed 002), over Corral's core.

A VM is a Corral sandbox: `:id` takes its id or its name. `/v1/*` takes `X-API-Key` (any Corral
token; every other style Corral accepts works too) or the admin session cookie from
`POST /auth/login`; `/docs/*`, `/swagger` and `/openapi.json` are public. Errors are
`{"message": "..."}`. Modules: `vms` (auth, VMs, exec, code runs, tar.gz transfers), `stores`
(images and snapshots).

Where Corral differs from run-dat-sheesh:
- The admin login is the operator's `CORRAL_ADMIN_EMAIL` and `CORRAL_ADMIN_PASSWORD`; a login
  makes a Corral token with every scope (named `rds-login:<email>`, valid 24 hours) and sets it
  as the `rds_session` cookie (HttpOnly, SameSite=Strict, Secure when the server is reached
  over TLS); logout revokes it. Failed logins are throttled per client address and per account
  (`corral.core.logins`: 5 free, then a wait from 1 s doubling to 5 minutes; 429 with
  `Retry-After`).
- A request the cookie authenticates that changes something (any method but GET, HEAD and
  OPTIONS), and login and logout, must come from this server's own pages: `Sec-Fetch-Site`
  same-origin or none, else an `Origin` naming this host, else neither header (no browser);
  otherwise 403 (`corral.api.origin`). Key-authenticated requests need no such check.
- `GET /auth/me` reports the caller (cookie, or key): `role` `admin` for a token with every
  scope, else `user`, with its `scopes` and `sandboxIds` (null: every sandbox).
- `outboundInternet: true` is Corral's `outbound` network (public addresses; private ranges,
  denied unless listed in `allowIps`, the host and link-local always); `allowIps` alone is the
  `allow` network (only those IPv4 CIDRs); neither is no network at all. The host's own
  addresses are reached only where the operator opened them (`CORRAL_NETWORK_OPEN`) and the VM
  lists them. `guestIp` is null: Corral gives out no sandbox addresses (nothing may connect
  into a sandbox).
- States: CREATED is never seen (a VM is RUNNING when the create answers); a paused sandbox is
  STOPPED. `start`, `stop` and `DELETE` answer 204 with no body. `exec` runs bash with `cmd` in
  /workspace as uid 1000; its default timeout is 30 s, the most 120 s (a 400 above); on timeout
  every process of the command is killed and the answer is `exitCode: -1` with the output so
  far and stderr ending in `Timeout exceeded`.
- `imageId` at create is a Corral image (id or registry reference, pulled when missing);
  `snapshotId` a Corral snapshot (`POST /v1/vms/:id/snapshots`): the VM starts from its files
  on its node (`provisionMode: "snapshot"`; else `"boot"`), with the limits and network the
  create gives (the original requires the snapshot's cpu and memMb).
- Paths under /home/user (the VM user's home in run-dat-sheesh, as in the seed's upload example)
  are taken under /workspace, the sandbox user's home. `files/upload` takes gzip only (its magic,
  and a stream that inflates to its end: else 400), checked as it streams in; the original's
  limits apply (10 MiB compressed: 413; 50 MiB inflated: 413; 10,000 entries), or the server's
  when lower. The archive is extracted inside the sandbox as its user (links leading out and
  `..` refused: 400).
- `run-ts` runs on Deno through Corral's code runs, and so does `run-js` (JavaScript on Deno,
  with its Node compatibility: `process`, `node:` modules; not Node itself); `denoFlags` and
  `nodeFlags` are ignored. `env` items are `KEY=value`. Deno may read /workspace, /tmp,
  /etc/resolv.conf and /etc/hosts, write /workspace and /tmp, and read TMPDIR (/tmp). `error`
  is what `result.error(value)` was given when it is not an Error or a string, else
  `{name, message, stack}`; a timeout answers `exitCode: -1` as `exec` does.
- `/v1/images` and `/v1/snapshots` share their paths with Corral's native routes: see `stores`.
  Images are Corral's (OCI) images: list, get and delete; creating image metadata, kernel and
  rootfs uploads and `set-default` are not offered (`POST /v1/images` is the native pull).
- `GET /v1/vms/:id/exec-logs` is the sandbox's whole command history (every face's commands),
  newest first, `?limit=` (default 50).
- Quota exceeded (the server's sandbox limit) is a 429, as is the per-token rate limit.
"""

from __future__ import annotations

from corral.api.faces.rundatsheesh.stores import claimed  # also adds its VM route to `router`
from corral.api.faces.rundatsheesh.vms import router, set_session_cookie

__all__ = ["claimed", "router", "set_session_cookie"]
