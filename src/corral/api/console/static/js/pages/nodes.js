// The nodes of a fleet (the built-in node alone on a single server), with drain and undrain.
import { api, current } from "../api.js";
import { act, age, badge, bytes, clear, h, table } from "../dom.js";

export async function render(view) {
  const list = h("div", { id: "node-list" });
  view.append(h("div", { class: "page-head" }, h("h1", {}, "Nodes")), list);

  async function refresh() {
    let page;
    try {
      page = await api("GET", "/v1/nodes");
    } catch (error) {
      clear(list, h("p", { class: "error" }, error.message));
      return;
    }
    const admin = current() && current().admin;
    clear(
      list,
      table(
        [
          ["Node", (n) => h("span", { class: "mono" }, n.id)],
          ["State", (n) => badge(n.state)],
          ["Sandboxes", (n) => `${n.sandboxes} / ${n.capacity.sandboxes}`],
          ["Commands", (n) => n.running_commands],
          ["Capacity", (n) => `${n.capacity.cpus} CPU, ${bytes(n.capacity.memory_mb * 1048576)}`],
          ["Runtime", (n) => `${n.runtime} ${n.version}`],
          ["Heartbeat", (n) => `${age(n.last_heartbeat)} ago`],
          ["", (n) => admin && h("button", {
            type: "button",
            class: "small",
            onclick: (e) => act(e.target, async () => {
              await api("POST", `/v1/nodes/${encodeURIComponent(n.id)}/${n.state === "draining" ? "undrain" : "drain"}`);
              await refresh();
            }),
          }, n.state === "draining" ? "undrain" : "drain")],
        ],
        page.items,
        "No nodes.",
      ),
    );
  }
  await refresh();
  const timer = setInterval(() => !document.hidden && refresh(), 10000);
  return () => clearInterval(timer);
}
