// The file browser: list a directory, go in and up, upload files or a whole directory (sent as
// one tar archive and unpacked inside the sandbox), download a file or a directory (tar.gz),
// make a directory, delete.
import { api, sandboxPath, url } from "../api.js";
import { act, bytes, clear, h, notify, table, when } from "../dom.js";
import { tarBlob } from "../tar.js";

function join(dir, name) {
  return dir.endsWith("/") ? dir + name : `${dir}/${name}`;
}

function parent(dir) {
  const cut = dir.replace(/\/+$/, "").lastIndexOf("/");
  return cut <= 0 ? "/" : dir.slice(0, cut);
}

export async function fileBrowser(body, id) {
  let dir = "/workspace";
  const where = h("input", { name: "path", id: "file-path", value: dir, autocomplete: "off" });
  const listing = h("div", { id: "file-list" });
  const pickFiles = h("input", { type: "file", multiple: true, id: "upload-files", hidden: true });
  const pickDir = h("input", {
    type: "file",
    id: "upload-dir",
    webkitdirectory: true,
    multiple: true,
    hidden: true,
  });
  const bar = h(
    "div",
    { class: "file-bar" },
    h(
      "form",
      { class: "run", onsubmit: (e) => (e.preventDefault(), go(where.value.trim() || "/")) },
      h("button", { type: "button", title: "Up", onclick: () => go(parent(dir)) }, "↑"),
      where,
      h("button", { type: "submit" }, "Go"),
    ),
    h(
      "div",
      { class: "actions" },
      h("button", { type: "button", onclick: () => pickFiles.click() }, "Upload files"),
      h("button", { type: "button", onclick: () => pickDir.click() }, "Upload directory"),
      h("button", { type: "button", onclick: (e) => mkdir(e.target) }, "New directory"),
      h("a", { class: "button", id: "download-dir", href: "#", download: "" }, "Download this directory"),
    ),
    pickFiles,
    pickDir,
  );
  body.append(bar, listing);

  async function go(path) {
    try {
      const found = await api("GET", sandboxPath(id, "/files/list"), { query: { path } });
      dir = found.path;
      where.value = dir;
      const download = bar.querySelector("#download-dir");
      download.href = url(sandboxPath(id, "/archive"), { path: dir }).toString();
      download.download = `${dir.split("/").filter(Boolean).pop() || "root"}.tar.gz`;
      const entries = [...found.entries].sort(
        (a, b) => (b.type === "directory") - (a.type === "directory") || a.name.localeCompare(b.name),
      );
      clear(
        listing,
        table(
          [
            ["Name", (f) => f.type === "directory"
              ? h("a", { href: "#", class: "dir", onclick: (e) => (e.preventDefault(), go(f.path)) }, `${f.name}/`)
              : h("span", { class: "mono" }, f.name, f.link_target ? ` → ${f.link_target}` : "")],
            ["Size", (f) => (f.type === "directory" ? "" : bytes(f.size))],
            ["Mode", (f) => h("span", { class: "mono" }, f.mode.toString(8).padStart(4, "0"))],
            ["Modified", (f) => when(f.modified_at)],
            ["", (f) => h("div", { class: "actions" },
              f.type === "directory"
                ? h("a", { class: "button small", download: `${f.name}.tar.gz`,
                    href: url(sandboxPath(id, "/archive"), { path: f.path }).toString() }, "download")
                : h("a", { class: "button small", download: f.name,
                    href: url(sandboxPath(id, "/files"), { path: f.path }).toString() }, "download"),
              h("button", { type: "button", class: "small danger", onclick: (e) => remove(e.target, f) }, "delete"))],
          ],
          entries,
          found.truncated ? "Too many entries to list." : "This directory is empty.",
        ),
      );
    } catch (error) {
      notify(error.message);
    }
  }

  async function mkdir(button) {
    const name = prompt("New directory name");
    if (!name) return;
    await act(button, () =>
      api("POST", sandboxPath(id, "/files/mkdir"), { json: { path: join(dir, name), parents: true } }),
    );
    await go(dir);
  }

  async function remove(button, entry) {
    if (!confirm(`Delete ${entry.path}?`)) return;
    await act(button, () =>
      api("DELETE", sandboxPath(id, "/files"), {
        query: { path: entry.path, recursive: entry.type === "directory" ? "true" : "" },
      }),
    );
    await go(dir);
  }

  pickFiles.addEventListener("change", async () => {
    const files = [...pickFiles.files];
    pickFiles.value = "";
    await act(null, async () => {
      for (const file of files) {
        await api("PUT", sandboxPath(id, "/files"), {
          query: { path: join(dir, file.name) },
          body: file,
          headers: { "Content-Type": "application/octet-stream" },
        });
      }
      notify(`Uploaded ${files.length} file(s)`, "ok");
    });
    await go(dir);
  });

  pickDir.addEventListener("change", async () => {
    const entries = [...pickDir.files].map((file) => ({
      path: file.webkitRelativePath || file.name,
      file,
    }));
    pickDir.value = "";
    if (!entries.length) return;
    await act(null, async () => {
      const done = await api("PUT", sandboxPath(id, "/archive"), {
        query: { path: dir },
        body: tarBlob(entries),
        headers: { "Content-Type": "application/x-tar" },
      });
      notify(`Uploaded ${done.entries} entries (${bytes(done.bytes)})`, "ok");
    });
    await go(dir);
  });

  await go(dir);
  return null;
}
