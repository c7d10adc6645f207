"""The Vercel Sandbox API (seed 004), over Corral's core, as the official `@vercel/sandbox` SDK
calls it (tested with version 3.5.0; docs/faces.md).

A Vercel sandbox is a Corral sandbox: its `name` is the Corral sandbox's name, or its id when
it has none. It has one session, whose id is the sandbox id: stopping the session stops the
sandbox (its files stay) and resuming it (`GET /v2/sandboxes/{name}?resume=true`, or the SDK on
its own after a 410) starts the same sandbox again with a new lifetime. Commands are a program
and its arguments (no shell). With `wait` the answer is an ND-JSON stream: `{"command": {...,
"exitCode": null}}` once started, with `logs` then `{"stream": "stdout"|"stderr", "data"}`
lines as the command writes, and last `{"command": {..., "exitCode": N}}`, or `{"stream":
"error", "data": {"code", "message"}}` when its result is unknown. Errors are `{"error":
{"code", "message"}}`.

Routes: `POST /v3/sandboxes` and `POST /v2/sandboxes` (create; from a snapshot with `source:
{type: "snapshot", snapshotId}`), `GET /v2/sandboxes` (list), `GET|PATCH|DELETE
/v2/sandboxes/{name}` (`PATCH` takes the timeout and network policy, which the SDK then applies
through the session's routes; tags, resources and mounts are 400), `POST
/v2/sandboxes/{name}/fork`, `POST /v2/sandboxes/{name}/stop`, `GET /v2/sandboxes/sessions`,
`GET /v2/sandboxes/sessions/{id}`, `POST .../sessions/{id}/{stop,extend-timeout,
network-policy,snapshot}`, `POST .../sessions/{id}/fs/{write,read,mkdir}`, `POST
.../sessions/{id}/cmd`, `GET .../cmd/{cmdId}[?wait=true]`, `GET .../cmd/{cmdId}/logs`, `POST
.../cmd/{cmdId}/kill`, `GET|DELETE /v2/sandboxes/snapshots[/{id}]`.

Where Corral differs from Vercel:
- `cmdId` in the seed's query table is a documentation slip and is not required; `teamId`,
  `slug` and `projectId` are accepted and ignored (one tenant).
- One session per sandbox, so `listSessions` gives one, and its id is the sandbox id. Sandboxes
  are always `persistent`: a stopped one keeps its files (`persistent: false` is accepted and
  reported as true). Sandboxes are listed oldest first; `sortBy`/`sortOrder` are ignored.
- The default user is the sandbox's (`user`, uid 1000) and the default directory `/workspace`
  (not `vercel-sandbox` and `/vercel/sandbox`). `sudo: true` runs the command as uid 0 of the
  sandbox's own user namespace, with `HOME=/root` and `SUDO_USER`, never as host root. A
  command whose program is `sudo` (as `asUser()` sends) is run as the user it names by Corral
  itself: a setuid sudo cannot work under no_new_privs.
- `runtime` is ignored (the host's /usr); `image` is a container image Corral pulls; `source`
  only takes a snapshot (git and tarball sources are 400 `unsupported`). `ports` are Corral's
  sandbox ports, exposed public as Vercel's are; their `routes` carry Corral's URLs (the SDK's
  `domain(port)` makes a vercel.run name of its own).
- `timeout` defaults to Vercel's 5 minutes and is kept in whole seconds; a sandbox made
  outside this face without a lifetime reports ten years. `vcpus` are a CPU quota, `memory`
  2048 MiB per vCPU unless given; a sandbox without limits reports the host's.
- Unlike Vercel's, a sandbox has no network unless asked for. `networkPolicy` maps to Corral's
  modes: `deny-all` is `none`, `allow-all` is `outbound`, allowed domains (`*.` wildcards too)
  and `subnets.allow` are `allow` with those names and CIDRs (enforced by the node's DNS
  forwarder and egress proxy, docs/network.md); header transforms, forwards and denied subnets
  are 400 `unsupported`. Switching to or from
  `deny-all` restarts the sandbox (409 while commands run).
- A snapshot stops its session, as on Vercel; `expiration` is kept in whole seconds, none by
  default. Deleting a snapshot that sandboxes were started from is 409. A fork of a stopped
  sandbox starts it for the capture and stops it again.
- A command killed by its `timeout` reports exit code 137 (SIGKILL), one killed by another
  signal 128+N, one that could not start (no such program, no such `cwd`) 127 with the reason
  on stderr and in an `error` field. Commands also carry `status` and `sandboxId`. Killing a
  command that has ended answers it as it is (200).
- Validation errors are 400 `bad_request`; a stopped session is 410 `sandbox_stopped`, and so
  is one paused through the native API (`resume=true` thaws it); a deleted sandbox is 404.
"""

from __future__ import annotations

from corral.api.faces.vercel import commands, files, sandboxes
from corral.api.faces.vercel.wire import TAG, router

__all__ = ["TAG", "commands", "files", "router", "sandboxes"]
