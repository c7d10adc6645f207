// The audit log (`GET /v1/audit`): who changed what, when and from where. A server without the
// audit log answers 404, and the page says so.
import { api } from "../api.js";
import { clear, field, h, table, when } from "../dom.js";

const PREFERRED = ["at", "time", "created_at", "token_id", "token_name", "action", "method", "target", "status", "result", "address"];

function columns(rows) {
  const keys = [];
  for (const row of rows) for (const key of Object.keys(row)) if (!keys.includes(key)) keys.push(key);
  keys.sort((a, b) => rank(a) - rank(b));
  return keys.map((key) => [key.replaceAll("_", " "), (row) => cell(key, row[key])]);
}

function rank(key) {
  const i = PREFERRED.indexOf(key);
  return i === -1 ? PREFERRED.length : i;
}

function cell(key, value) {
  if (value === null || value === undefined) return "";
  if (typeof value === "object") return h("span", { class: "mono" }, JSON.stringify(value));
  if (/(_at|^at|time)$/.test(key) && typeof value === "string") return when(value);
  return String(value);
}

export async function render(view) {
  const list = h("div", { id: "audit-list" });
  const filter = h("input", { name: "q", placeholder: "e.g. sandbox=sb_… or action=sandbox.delete", autocomplete: "off" });
  const more = h("button", { type: "button", hidden: true }, "Older");
  const form = h("form", { class: "run" }, field("Filter (name=value, space-separated)", filter), h("button", { type: "submit" }, "Apply"));
  view.append(h("div", { class: "page-head" }, h("h1", {}, "Audit log")), form, list, more);
  let rows = [];
  let cursor = null;

  function query() {
    const out = { limit: 100 };
    for (const part of filter.value.trim().split(/\s+/).filter(Boolean)) {
      const [key, ...rest] = part.split("=");
      if (key && rest.length) out[key] = rest.join("=");
    }
    if (cursor) out.cursor = cursor;
    return out;
  }

  async function load(reset) {
    if (reset) {
      rows = [];
      cursor = null;
    }
    let page;
    try {
      page = await api("GET", "/v1/audit", { query: query() });
    } catch (error) {
      more.hidden = true;
      if (error.status === 404) {
        form.hidden = true;
        clear(list, h("p", { class: "card notice", id: "audit-unavailable" }, "The audit log is not available on this server."));
      } else {
        clear(list, h("p", { class: "error" }, error.message));
      }
      return;
    }
    const items = Array.isArray(page) ? page : page.items || [];
    rows = rows.concat(items);
    cursor = Array.isArray(page) ? null : page.next_cursor || null;
    more.hidden = !cursor;
    clear(list, table(columns(rows), rows, "No audit entries."));
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    load(true);
  });
  more.addEventListener("click", () => load(false));
  await load(true);
}
