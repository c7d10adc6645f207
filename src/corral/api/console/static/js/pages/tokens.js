// Tokens (admin): list, create (the secret is shown once), revoke.
import { api } from "../api.js";
import { act, clear, field, h, notify, table, when } from "../dom.js";

// Every scope of core/models.py Scope (a unit test keeps them equal); the first three are ticked.
const SCOPES = ["read", "exec", "files", "sandboxes", "metrics", "audit", "secrets", "admin"];
const TICKED = ["read", "exec", "files"];

export async function render(view) {
  const list = h("div", { id: "token-list" });
  const secret = h("div", { id: "token-secret" });
  const form = h(
    "form",
    { class: "card", id: "create-token" },
    h("h2", {}, "New token"),
    h(
      "div",
      { class: "grid" },
      field("Name", h("input", { name: "name", placeholder: "ci-runner", autocomplete: "off" })),
      field("Sandboxes", h("input", { name: "sandbox_ids", placeholder: "all (or ids and names)" })),
      field("Expires in (s)", h("input", { name: "expires", type: "number", min: "1", placeholder: "never" })),
    ),
    h(
      "fieldset",
      { class: "scopes" },
      h("legend", {}, "Scopes"),
      SCOPES.map((scope) =>
        h("label", {}, h("input", { type: "checkbox", name: "scope", value: scope, checked: TICKED.includes(scope) }), scope),
      ),
    ),
    h("button", { type: "submit", class: "primary" }, "Create"),
  );
  view.append(h("div", { class: "page-head" }, h("h1", {}, "Tokens")), secret, list, form);

  async function refresh() {
    let page;
    try {
      page = await api("GET", "/v1/tokens");
    } catch (error) {
      clear(list, h("p", { class: "error" }, error.status === 403 ? "Tokens are for admin tokens only." : error.message));
      form.hidden = true;
      return;
    }
    clear(
      list,
      table(
        [
          ["Name", (t) => t.name || h("span", { class: "muted" }, "(unnamed)")],
          ["Prefix", (t) => h("span", { class: "mono" }, t.prefix)],
          ["Scopes", (t) => t.scopes.join(", ")],
          ["Sandboxes", (t) => (t.sandbox_ids ? t.sandbox_ids.join(", ") : "all")],
          ["Last used", (t) => when(t.last_used_at)],
          ["Expires", (t) => when(t.expires_at) || "never"],
          ["", (t) => h("button", { type: "button", class: "small danger", onclick: (e) => {
            if (confirm(`Revoke ${t.name || t.prefix}? Every client using it stops working.`)) {
              act(e.target, async () => {
                await api("DELETE", `/v1/tokens/${encodeURIComponent(t.id)}`);
                await refresh();
              });
            }
          } }, "revoke")],
        ],
        page.items,
        "No tokens besides the admin key.",
      ),
    );
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const body = { name: String(data.get("name") || "").trim(), scopes: data.getAll("scope") };
    const ids = String(data.get("sandbox_ids") || "").trim();
    if (ids) body.sandbox_ids = ids.split(/[\s,]+/).filter(Boolean);
    if (data.get("expires")) body.expires_in_seconds = Number(data.get("expires"));
    act(form.querySelector("button[type=submit]"), async () => {
      const made = await api("POST", "/v1/tokens", { json: body });
      clear(
        secret,
        h("div", { class: "card secret" },
          h("p", {}, "The new token's secret, shown this once:"),
          h("code", { class: "mono" }, made.secret)),
      );
      notify("Token created", "ok");
      form.reset();
      await refresh();
    });
  });
  await refresh();
}
