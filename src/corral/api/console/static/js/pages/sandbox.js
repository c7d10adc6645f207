// One sandbox: its details and actions, and three tabs: commands (run one, follow any command's
// output live over SSE), a terminal (xterm.js over the exec WebSocket) and the file browser.
import { api, sandboxPath, url } from "../api.js";
import { age, badge, clear, h, table, when } from "../dom.js";
import { fileBrowser } from "./files.js";
import { actions } from "./sandboxes.js";
import { terminal } from "./terminal.js";

const TABS = ["commands", "terminal", "files"];

export async function render(view, id, tab = "commands") {
  const cleanups = [];
  const head = h("div", { class: "page-head" });
  const tabs = h("div", { class: "tabs", role: "tablist" });
  const body = h("section", { class: "tab-body" });
  view.append(head, tabs, body);

  async function refreshHead() {
    const sandbox = await api("GET", sandboxPath(id));
    clear(
      head,
      h(
        "div",
        {},
        h("a", { href: "#/sandboxes", class: "muted" }, "Sandboxes"),
        h("h1", {}, sandbox.name || sandbox.id, " ", badge(sandbox.state)),
        h(
          "p",
          { class: "muted facts" },
          h("span", { class: "mono" }, sandbox.id),
          ` · node ${sandbox.node_id} · ${sandbox.image || sandbox.template} · `,
          `network ${sandbox.network} · up ${age(sandbox.created_at)}`,
        ),
      ),
      actions(sandbox, async () => {
        const now = await refreshHead().catch(() => null);
        if (!now || now.state === "deleted") location.hash = "#/sandboxes";
      }),
    );
    return sandbox;
  }
  await refreshHead();

  for (const name of TABS) {
    tabs.append(
      h(
        "a",
        {
          href: `#/sandboxes/${encodeURIComponent(id)}/${name}`,
          role: "tab",
          class: name === tab ? "active" : "",
          "aria-selected": String(name === tab),
        },
        name[0].toUpperCase() + name.slice(1),
      ),
    );
  }
  if (tab === "terminal") cleanups.push(terminal(body, id));
  else if (tab === "files") cleanups.push(await fileBrowser(body, id));
  else cleanups.push(await commands(body, id));
  return () => cleanups.forEach((stop) => stop && stop());
}

async function commands(body, id) {
  let follow = null;
  const input = h("input", {
    name: "command",
    id: "command",
    placeholder: "a shell command, e.g. for i in 1 2 3; do echo $i; sleep 1; done",
    autocomplete: "off",
    required: true,
  });
  const form = h(
    "form",
    { class: "run", id: "run-command" },
    input,
    h("button", { type: "submit", class: "primary" }, "Run"),
  );
  const output = h("pre", { class: "output", id: "output", "aria-live": "polite" });
  const status = h("p", { class: "muted", id: "output-status" });
  const history = h("div", { id: "history" });
  body.append(form, h("div", { class: "card" }, status, output), h("h2", {}, "History"), history);

  async function refreshHistory() {
    const page = await api("GET", sandboxPath(id, "/commands"), { query: { limit: 30 } });
    clear(
      history,
      table(
        [
          ["Command", (c) => h("a", { href: "#", class: "mono", onclick: (e) => {
            e.preventDefault();
            show(c);
          } }, c.args ? [c.command, ...c.args].join(" ") : c.command)],
          ["Status", (c) => badge(c.status)],
          ["Exit", (c) => (c.exit_code ?? "")],
          ["Started", (c) => when(c.started_at || c.created_at)],
          ["Took", (c) => (c.duration_ms === null ? "" : `${c.duration_ms} ms`)],
        ],
        page.items,
        "No commands yet.",
      ),
    );
  }

  // Replays the command's log from the start, then follows it until its terminal event.
  function show(command) {
    if (follow) follow.close();
    clear(output);
    status.textContent = `${command.command} — ${command.status}`;
    const source = new EventSource(
      url(sandboxPath(id, `/commands/${encodeURIComponent(command.id)}/logs`), { format: "sse" }),
    );
    follow = source;
    const write = (kind) => (event) => {
      const frame = JSON.parse(event.data);
      const text = frame.data ?? atob(frame.data_base64 || "");
      output.append(kind === "stderr" ? h("span", { class: "stderr" }, text) : text);
      output.scrollTop = output.scrollHeight;
    };
    source.addEventListener("stdout", write("stdout"));
    source.addEventListener("stderr", write("stderr"));
    source.addEventListener("exit", (event) => {
      const frame = JSON.parse(event.data);
      status.textContent = `${command.command} — ${frame.status}, exit ${frame.exit_code ?? "–"}`;
      status.dataset.done = "true";
      source.close();
      refreshHistory().catch(() => {});
    });
    source.addEventListener("error", (event) => {
      if (event.data) {
        status.textContent = `${command.command} — ${JSON.parse(event.data).message}`;
        status.dataset.done = "true";
        source.close();
      }
      // without data: a dropped connection, which EventSource resumes on its own
    });
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = form.querySelector("button");
    button.disabled = true;
    delete status.dataset.done;
    try {
      const command = await api("POST", sandboxPath(id, "/commands"), {
        json: { command: input.value },
      });
      show(command);
      await refreshHistory();
    } catch (error) {
      status.textContent = error.message;
    } finally {
      button.disabled = false;
    }
  });
  await refreshHistory();
  return () => follow && follow.close();
}
