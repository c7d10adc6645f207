// Snapshots (start a sandbox from one, delete) and images (pull, delete).
import { api } from "../api.js";
import { act, age, badge, bytes, clear, field, h, notify, table } from "../dom.js";

export async function render(view) {
  const snaps = h("div", { id: "snapshot-list" });
  const imgs = h("div", { id: "image-list" });
  const reference = h("input", { name: "reference", placeholder: "registry/name:tag", required: true });
  const pull = h(
    "form",
    { class: "run" },
    field("Pull an image", reference),
    h("button", { type: "submit", class: "primary" }, "Pull"),
  );
  view.append(
    h("div", { class: "page-head" }, h("h1", {}, "Snapshots")),
    snaps,
    h("div", { class: "page-head" }, h("h1", {}, "Images")),
    pull,
    imgs,
  );

  async function refresh() {
    const [snapshots, images] = await Promise.all([
      api("GET", "/v1/snapshots", { query: { limit: 200 } }).catch((e) => e),
      api("GET", "/v1/images", { query: { limit: 200 } }).catch((e) => e),
    ]);
    clear(
      snaps,
      snapshots instanceof Error
        ? h("p", { class: "error" }, snapshots.message)
        : table(
            [
              ["Snapshot", (s) => h("span", { class: "mono" }, s.name || s.id)],
              ["State", (s) => badge(s.state)],
              ["Of", (s) => h("a", { href: `#/sandboxes/${s.sandbox_id}`, class: "mono" }, s.sandbox_id)],
              ["Node", (s) => s.node_id],
              ["Size", (s) => bytes(s.size_bytes)],
              ["Age", (s) => age(s.created_at)],
              ["", (s) => h("div", { class: "actions" },
                h("button", { type: "button", class: "small", onclick: (e) => act(e.target, async () => {
                  const made = await api("POST", "/v1/sandboxes", { json: { snapshot: s.id } });
                  location.hash = `#/sandboxes/${made.id}`;
                }) }, "new sandbox"),
                h("button", { type: "button", class: "small danger", onclick: (e) => {
                  if (confirm(`Delete snapshot ${s.name || s.id}?`)) {
                    act(e.target, async () => {
                      await api("DELETE", `/v1/snapshots/${encodeURIComponent(s.id)}`);
                      await refresh();
                    });
                  }
                } }, "delete"))],
            ],
            snapshots.items,
            "No snapshots. Take one with POST /v1/sandboxes/{id}/snapshots.",
          ),
    );
    clear(
      imgs,
      images instanceof Error
        ? h("p", { class: "error" }, images.message)
        : table(
            [
              ["Image", (i) => h("span", { class: "mono" }, (i.references || []).join(", ") || i.id)],
              ["Id", (i) => h("span", { class: "mono", title: i.id }, i.id.slice(0, 19))],
              ["Node", (i) => i.node_id],
              ["Size", (i) => bytes(i.size)],
              ["Platform", (i) => `${i.os}/${i.architecture}`],
              ["", (i) => h("button", { type: "button", class: "small danger", onclick: (e) => {
                if (confirm(`Delete image ${i.id}?`)) {
                  act(e.target, async () => {
                    await api("DELETE", `/v1/images/${i.id}`);
                    await refresh();
                  });
                }
              } }, "delete")],
            ],
            images.items,
            "No images pulled.",
          ),
    );
  }

  pull.addEventListener("submit", (event) => {
    event.preventDefault();
    act(pull.querySelector("button"), async () => {
      await api("POST", "/v1/images", { json: { reference: reference.value.trim() } });
      notify("Pulled", "ok");
      pull.reset();
      await refresh();
    });
  });
  await refresh();
}
