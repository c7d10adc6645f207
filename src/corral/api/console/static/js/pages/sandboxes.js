// Sandboxes: the list (state, node, image, age) with their lifecycle actions, and a create form.
import { api, current, sandboxPath } from "../api.js";
import { act, age, badge, clear, field, h, notify, table } from "../dom.js";

const ACTIONS = {
  running: ["stop", "pause"],
  paused: ["resume", "stop"],
  stopped: ["start"],
  error: [],
  creating: [],
};

export async function render(view) {
  const list = h("div", { id: "sandbox-list" }, h("p", { class: "muted" }, "Loading…"));
  const form = createForm(() => refresh());
  view.append(
    h(
      "div",
      { class: "page-head" },
      h("h1", {}, "Sandboxes"),
      h("button", { type: "button", onclick: () => refresh() }, "Refresh"),
    ),
    list,
    form,
  );

  async function refresh() {
    let page;
    try {
      page = await api("GET", "/v1/sandboxes", { query: { limit: 200 } });
    } catch (error) {
      clear(list, h("p", { class: "error" }, error.message));
      return;
    }
    const rows = page.items.filter((s) => s.state !== "deleted");
    clear(
      list,
      table(
        [
          ["Sandbox", (s) => h("a", { href: `#/sandboxes/${s.id}`, class: "mono" }, s.name || s.id)],
          ["State", (s) => badge(s.state)],
          ["Node", (s) => h("span", { class: "mono" }, s.node_id)],
          ["Image", (s) => s.image || s.template],
          ["Age", (s) => h("span", { title: s.created_at }, age(s.created_at))],
          ["", (s) => actions(s, refresh)],
        ],
        rows,
        "No sandboxes. Create one below.",
      ),
    );
  }

  await refresh();
  const timer = setInterval(() => {
    if (!document.hidden) refresh();
  }, 5000);
  return () => clearInterval(timer);
}

export function actions(sandbox, after) {
  const buttons = (ACTIONS[sandbox.state] || []).map((name) =>
    h(
      "button",
      {
        type: "button",
        class: "small",
        "data-action": name,
        onclick: (event) =>
          act(event.target, async () => {
            await api("POST", sandboxPath(sandbox.id, `/${name}`));
            await after();
          }),
      },
      name,
    ),
  );
  if (sandbox.state === "running") {
    buttons.push(
      h(
        "button",
        {
          type: "button",
          class: "small",
          "data-action": "snapshot",
          title: "Capture its files as a snapshot new sandboxes can start from",
          onclick: (event) =>
            act(event.target, async () => {
              const snap = await api("POST", sandboxPath(sandbox.id, "/snapshots"), { json: {} });
              notify(`Snapshot ${snap.id} taken (see Snapshots & images)`, "ok");
            }),
        },
        "snapshot",
      ),
    );
  }
  buttons.push(
    h(
      "button",
      {
        type: "button",
        class: "small danger",
        "data-action": "delete",
        onclick: (event) => {
          if (!confirm(`Delete sandbox ${sandbox.name || sandbox.id}? Its files go with it.`)) return;
          act(event.target, async () => {
            await api("DELETE", sandboxPath(sandbox.id));
            notify(`Deleted ${sandbox.name || sandbox.id}`, "ok");
            await after();
          });
        },
      },
      "delete",
    ),
  );
  return h("div", { class: "actions" }, buttons);
}

function number(name, placeholder, step = "1") {
  return h("input", { type: "number", name, min: "0", step, placeholder, inputmode: "decimal" });
}

function createForm(after) {
  const template = h("select", { name: "template" }, h("option", { value: "host" }, "host"));
  api("GET", "/v1/templates")
    .then((names) => {
      for (const name of names) {
        if (name !== "host") template.append(h("option", { value: name }, name));
      }
    })
    .catch(() => {});
  const image = h("input", { name: "image", placeholder: "registry/name:tag (instead of a template)" });
  const network = h(
    "select",
    { name: "network" },
    ["none", "outbound", "allow"].map((m) => h("option", { value: m }, m)),
  );
  const allow = h("input", { name: "allow", placeholder: "10.1.0.0/16, 192.0.2.7/32" });
  const form = h(
    "form",
    { class: "card", id: "create-sandbox" },
    h("h2", {}, "New sandbox"),
    h(
      "div",
      { class: "grid" },
      field("Name", h("input", { name: "name", placeholder: "optional", autocomplete: "off" })),
      field("Template", template),
      field("Image", image),
      field("CPUs", number("cpu", "default", "0.1")),
      field("Memory (MiB)", number("memory_mb", "default")),
      field("Disk (MiB)", number("disk_mb", "default")),
      field("Network", network),
      field("Allowed CIDRs", allow, "for network allow (and private ranges with outbound)"),
      field("Lifetime (s)", number("ttl_seconds", "no limit")),
    ),
    h("button", { type: "submit", class: "primary" }, "Create"),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const body = { network: data.get("network") };
    const text = (key) => String(data.get(key) || "").trim();
    if (text("name")) body.name = text("name");
    if (text("image")) body.image = text("image");
    else body.template = text("template") || "host";
    for (const key of ["cpu", "memory_mb", "disk_mb", "ttl_seconds"]) {
      if (text(key)) body[key] = Number(text(key));
    }
    if (text("allow")) body.allow = text("allow").split(/[\s,]+/).filter(Boolean);
    act(form.querySelector("button[type=submit]"), async () => {
      const made = await api("POST", "/v1/sandboxes", { json: body });
      notify(`Created ${made.name || made.id}`, "ok");
      form.reset();
      await after();
    });
  });
  if (current() && current().sandbox_ids !== null) form.hidden = true;  // limited tokens cannot create
  return form;
}
