// Drives Corral's Vercel face with the official @vercel/sandbox SDK, unmodified: the only
// adaptation is a `fetch` that sends `https://vercel.com/api/...` to Corral instead.
//
//   CORRAL_URL=http://127.0.0.1:8700 CORRAL_TOKEN=... node vercel_sdk.mjs
//
// Prints one JSON object: for each step, {"ok": true, "value": ...} or {"ok": false,
// "error": ...}. A step records what it saw; the Python test decides what is right.

import { randomBytes } from "node:crypto";
import { Writable } from "node:stream";
import { APIError, Sandbox, Snapshot } from "@vercel/sandbox";

const VERCEL = "https://vercel.com/api";
const base = process.env.CORRAL_URL;
const token = process.env.CORRAL_TOKEN;
if (!base || !token) throw new Error("CORRAL_URL and CORRAL_TOKEN are required");

const fetch = (url, init) => globalThis.fetch(String(url).replace(VERCEL, base), init);
const creds = { token, teamId: "team_corral", projectId: "prj_corral", fetch };
const suffix = Date.now().toString(36);

const results = {};
async function step(name, fn) {
  try {
    results[name] = { ok: true, value: (await fn()) ?? null };
  } catch (err) {
    results[name] = { ok: false, error: describe(err) };
  }
}

function describe(err) {
  const out = { name: err?.name, message: String(err?.message ?? err), code: err?.code };
  if (err instanceof APIError) {
    out.status = err.response?.status;
    out.json = err.json ?? null;
  }
  return out;
}

function summary(sandbox) {
  return {
    name: sandbox.name,
    status: sandbox.status,
    persistent: sandbox.persistent,
    cwd: sandbox.cwd,
    timeout: sandbox.timeout,
    vcpus: sandbox.vcpus,
    memory: sandbox.memory,
    tags: sandbox.tags ?? null,
    routes: sandbox.routes,
    networkPolicy: sandbox.networkPolicy ?? null,
    sourceSnapshotId: sandbox.sourceSnapshotId ?? null,
    sessionId: sandbox.currentSession().sessionId,
    sessionTimeout: sandbox.currentSession().timeout,
    expiresAt: sandbox.expiresAt?.getTime() ?? null,
  };
}

function sink() {
  const chunks = [];
  const stream = new Writable({
    write(chunk, _enc, done) {
      chunks.push(String(chunk));
      done();
    },
  });
  return { stream, text: () => chunks.join("") };
}

const name = `sdk-${suffix}`;
let sandbox;

await step("create", async () => {
  sandbox = await Sandbox.create({
    ...creds,
    name,
    timeout: 600_000,
    resources: { vcpus: 1 },
    tags: { suite: "sdk" },
    env: { GREETING: "hello" },
    ports: [3000],
  });
  return summary(sandbox);
});
if (!sandbox) {
  console.log(JSON.stringify(results));
  process.exit(0);
}

await step("run_wait", async () => {
  const out = sink();
  const done = await sandbox.runCommand({
    cmd: "sh",
    args: ["-c", "echo out $GREETING; echo err >&2; pwd; exit 3"],
    stdout: out.stream,
  });
  return {
    exitCode: done.exitCode,
    stdout: await done.stdout(),
    stderr: await done.stderr(),
    streamed: out.text(),
    cwd: done.cwd,
  };
});

await step("run_args_cwd_env", async () => {
  const done = await sandbox.runCommand({
    cmd: "sh",
    args: ["-c", 'echo "$A" "$GREETING"; pwd'],
    cwd: "/tmp",
    env: { A: "a b" },
  });
  return { exitCode: done.exitCode, stdout: await done.stdout() };
});

await step("run_detached", async () => {
  const command = await sandbox.runCommand({
    cmd: "sh",
    args: ["-c", "for i in 1 2 3; do echo $i; sleep 0.1; done; echo gone >&2; exit 4"],
    detached: true,
  });
  const first = command.exitCode;
  const logs = [];
  for await (const log of command.logs()) logs.push(log);
  const done = await command.wait();
  return {
    before: first,
    logs,
    exitCode: done.exitCode,
    stdout: await done.stdout(),
    output: await done.output("both"),
    again: (await sandbox.getCommand(command.cmdId)).exitCode,
  };
});

await step("missing_program", async () => {
  const done = await sandbox.runCommand("no-such-program", ["x"]);
  return { exitCode: done.exitCode, stderr: await done.stderr() };
});

await step("timeout_ms", async () => {
  const done = await sandbox.runCommand({ cmd: "sleep", args: ["30"], timeoutMs: 300 });
  return { exitCode: done.exitCode };
});

await step("kill", async () => {
  const command = await sandbox.runCommand({ cmd: "sleep", args: ["30"], detached: true });
  await command.kill("SIGKILL");
  const done = await command.wait();
  // A second kill, of a command that has ended: Vercel answers with the command.
  await command.kill();
  return { exitCode: done.exitCode };
});

await step("kill_finished", async () => {
  const done = await sandbox.runCommand("true");
  await done.kill("SIGTERM");
  return { exitCode: done.exitCode };
});

await step("sudo_env", async () => {
  const done = await sandbox.runCommand({
    cmd: "sh",
    args: ["-c", 'id -u; echo "$HOME"; echo "$SUDO_USER"'],
    sudo: true,
  });
  return { exitCode: done.exitCode, stdout: await done.stdout(), stderr: await done.stderr() };
});

await step("files", async () => {
  await sandbox.writeFiles([
    { path: "hello.txt", content: Buffer.from("hi there\n") },
    { path: "nested/deep/a.txt", content: Buffer.from("a") },
    { path: "/tmp/abs/b.sh", content: Buffer.from("#!/bin/sh\necho run\n"), mode: 0o755 },
  ]);
  await sandbox.mkDir("made");
  const read = await sandbox.readFileToBuffer({ path: "hello.txt" });
  const nested = await sandbox.readFileToBuffer({ path: "a.txt", cwd: "/workspace/nested/deep" });
  const missing = await sandbox.readFile({ path: "nope.txt" });
  let fsMissing;
  try {
    await sandbox.fs.readFile("/workspace/nope.txt");
  } catch (err) {
    fsMissing = err.code;
  }
  await sandbox.fs.writeFile("fs.txt", "via fs");
  const script = await sandbox.runCommand("/tmp/abs/b.sh");
  const listing = await sandbox.runCommand("ls", ["-d", "/workspace/made"]);
  return {
    read: read?.toString() ?? null,
    nested: nested?.toString() ?? null,
    missing,
    fsMissing,
    fsRead: await sandbox.fs.readFile("fs.txt", "utf8"),
    readdir: (await sandbox.fs.readdir("/workspace")).sort(),
    exists: await sandbox.fs.exists("/workspace/made"),
    script: await script.stdout(),
    mkdirExit: listing.exitCode,
  };
});

await step("large_file", async () => {
  // More than the server's limit for request bodies: fs/write streams like an upload.
  const content = randomBytes(11 << 20);
  await sandbox.writeFiles([{ path: "big.bin", content }]);
  const back = await sandbox.readFileToBuffer({ path: "big.bin" });
  return { size: back?.length ?? null, same: back !== null && back.equals(content) };
});

await step("mkdir_existing", async () => {
  await sandbox.mkDir("made");
});

await step("extend_timeout", async () => {
  const before = sandbox.currentSession().timeout;
  await sandbox.extendTimeout(60_000);
  return { before, after: sandbox.currentSession().timeout };
});

await step("update", async () => {
  await sandbox.update({ timeout: 720_000, networkPolicy: "deny-all", ports: [3000] });
  return { sessionTimeout: sandbox.currentSession().timeout, policy: sandbox.networkPolicy };
});

await step("update_tags", async () => {
  await sandbox.update({ tags: { other: "x" } });
});

await step("network_policy", async () => {
  const policies = [];
  policies.push(await sandbox.updateNetworkPolicy({ subnets: { allow: ["10.9.8.0/24"] } }));
  policies.push(await sandbox.updateNetworkPolicy("allow-all"));
  policies.push(await sandbox.updateNetworkPolicy("deny-all"));
  return policies;
});

await step("network_policy_domains", async () => {
  const policy = await sandbox.updateNetworkPolicy({
    allow: ["example.com", "*.example.org"],
    subnets: { allow: ["10.9.8.0/24"] },
  });
  const again = await Sandbox.get({ ...creds, name: sandbox.name });
  return { policy, stored: again.networkPolicy };
});

await step("network_policy_transform", async () => {
  await sandbox.updateNetworkPolicy({
    allow: { "api.example.com": [{ transform: [{ headers: { authorization: "Bearer x" } }] }] },
  });
});

await step("users_groups", async () => {
  const alice = await sandbox.createUser("alice");
  const group = await sandbox.createGroup("devs");
  await sandbox.addUserToGroup("alice", "devs");
  const check = await sandbox.runCommand({
    cmd: "sh",
    args: [
      "-c",
      "id alice; stat -c '%U:%G %a' /home/alice /shared/devs; " +
        "su alice -c 'touch /shared/devs/by-alice ~/note' && stat -c %U /shared/devs/by-alice",
    ],
    sudo: true,
  });
  return {
    username: alice.username,
    homeDir: alice.homeDir,
    group,
    check: await check.stdout(),
    exitCode: check.exitCode,
  };
});

await step("as_user", async () => {
  // The SDK's SandboxUser runs everything through `sudo -u`.
  const alice = sandbox.asUser("alice");
  const who = await alice.runCommand({
    cmd: "sh",
    args: ["-c", 'echo "$(id -un) $(id -nG) $HOME $PWD $SUDO_USER $GREETING"'],
    env: { GREETING: "hi" },
  });
  await alice.writeFiles([{ path: "notes/a.txt", content: Buffer.from("from alice") }]);
  const back = await alice.readFileToBuffer({ path: "notes/a.txt" });
  const owner = await sandbox.runCommand("stat", ["-c", "%U", "/home/alice/notes/a.txt"]);
  const missing = await alice.readFileToBuffer({ path: "no-such-file" });
  const root = await sandbox.asUser("root").runCommand("id", ["-un"]);
  const stranger = await sandbox.asUser("nobody-here").runCommand("true");
  return {
    who: (await who.stdout()).trim(),
    back: back.toString(),
    owner: (await owner.stdout()).trim(),
    missing,
    root: (await root.stdout()).trim(),
    stranger: { exitCode: stranger.exitCode, stderr: await stranger.stderr() },
  };
});

await step("get", async () => {
  const got = await Sandbox.get({ ...creds, name });
  let missing;
  try {
    got.domain(4000);
  } catch (err) {
    missing = err.message;
  }
  return { ...summary(got), domain: got.domain(3000), missing };
});

await step("port_route", async () => {
  // A server on the port the sandbox was made with, reached through its route's URL by anyone.
  await sandbox.writeFiles([{ path: "site/index.html", content: Buffer.from("served\n") }]);
  await sandbox.runCommand({
    cmd: "python3",
    args: ["-m", "http.server", "3000", "--bind", "127.0.0.1", "--directory", "site"],
    detached: true,
  });
  const url = sandbox.routes.find((route) => route.port === 3000).url;
  for (let i = 0; i < 100; i++) {
    const answer = await globalThis.fetch(`${url}/index.html`);
    if (answer.status !== 502) return { status: answer.status, body: await answer.text() };
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  return { status: 502 };
});

await step("list", async () => {
  const page = await Sandbox.list({ ...creds, namePrefix: "sdk-" });
  const all = await page.toArray();
  return { names: all.map((s) => s.name), pagination: page.pagination };
});

await step("list_sessions", async () => {
  const page = await sandbox.listSessions();
  return { ids: page.sessions.map((s) => s.id), statuses: page.sessions.map((s) => s.status) };
});

await step("stop", async () => {
  const session = await sandbox.stop();
  return { status: session.status, sandboxStatus: sandbox.status };
});

await step("get_stopped", async () => {
  const got = await Sandbox.get({ ...creds, name });
  return { status: got.status };
});

await step("resume", async () => {
  let resumed = false;
  const got = await Sandbox.get({
    ...creds,
    name,
    resume: true,
    onResume: async () => {
      resumed = true;
    },
  });
  const cat = await got.runCommand("cat", ["hello.txt"]);
  return { status: got.status, resumed, kept: await cat.stdout() };
});

await step("auto_resume", async () => {
  await sandbox.stop();
  // A stopped session answers 410; the SDK resumes the sandbox and runs the command.
  const done = await sandbox.runCommand("cat", ["hello.txt"]);
  return { exitCode: done.exitCode, stdout: await done.stdout(), status: sandbox.status };
});

let snapshot;
await step("snapshot", async () => {
  await sandbox.writeFiles([{ path: "snap.txt", content: Buffer.from("in the snapshot") }]);
  snapshot = await sandbox.snapshot({ expiration: 3_600_000 });
  const got = await Snapshot.get({ ...creds, snapshotId: snapshot.snapshotId });
  const listed = await sandbox.listSnapshots();
  return {
    id: snapshot.snapshotId,
    status: snapshot.status,
    sourceSessionId: snapshot.sourceSessionId,
    sizeBytes: snapshot.sizeBytes,
    expires: snapshot.expiresAt !== undefined,
    sessionStatus: sandbox.currentSession().status,
    got: got.snapshotId,
    listed: listed.snapshots.map((s) => s.id),
  };
});

let fromSnapshot;
await step("create_from_snapshot", async () => {
  fromSnapshot = await Sandbox.create({
    ...creds,
    source: { type: "snapshot", snapshotId: snapshot.snapshotId },
  });
  const cat = await fromSnapshot.runCommand("cat", ["snap.txt"]);
  return { ...summary(fromSnapshot), kept: await cat.stdout() };
});

await step("create_from_missing_snapshot", async () => {
  await Sandbox.create({ ...creds, source: { type: "snapshot", snapshotId: "snap_nope" } });
});

let fork;
await step("fork", async () => {
  fork = await Sandbox.fork({ ...creds, sourceSandbox: name, name: `${name}-fork` });
  const cat = await fork.runCommand("cat", ["snap.txt"]);
  return { ...summary(fork), kept: await cat.stdout() };
});

await step("get_or_create", async () => {
  let created = 0;
  const onCreate = async () => {
    created += 1;
  };
  const first = await Sandbox.getOrCreate({ ...creds, name: `${name}-goc`, onCreate });
  const second = await Sandbox.getOrCreate({ ...creds, name: `${name}-goc`, onCreate });
  const same = first.name === second.name;
  await second.delete();
  return { created, same };
});

await step("create_v2_runtime", async () => {
  // With a `runtime` the SDK posts to /v2/sandboxes, and validates the same shapes.
  const v2 = await Sandbox.create({ ...creds, runtime: "node22", timeout: 120_000 });
  const done = await v2.runCommand("echo", ["v2"]);
  const out = { ...summary(v2), stdout: await done.stdout() };
  await v2.delete();
  return out;
});

const scoped = process.env.CORRAL_SCOPED_TOKEN;
if (scoped) {
  await step("scoped_token", async () => {
    const own = { ...creds, token: scoped };
    const made = await Sandbox.create({ ...own, timeout: 120_000 });
    const done = await made.runCommand("id", ["-un"]);
    await made.writeFiles([{ path: "s.txt", content: Buffer.from("scoped") }]);
    const read = await made.readFileToBuffer({ path: "s.txt" });
    const out = { stdout: await done.stdout(), read: read?.toString() ?? null };
    await made.delete();
    return out;
  });
}

await step("delete", async () => {
  for (const other of [fromSnapshot, fork]) if (other) await other.delete();
  await sandbox.delete();
  try {
    await Sandbox.get({ ...creds, name });
    return { after: "found" };
  } catch (err) {
    return { after: describe(err) };
  }
});

await step("snapshot_delete", async () => {
  await snapshot.delete();
  return { status: snapshot.status };
});

console.log(JSON.stringify(results));
