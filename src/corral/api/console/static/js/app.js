// The console's shell: sign-in gate, navigation and a hash router (#/page/arg). Each page
// module exports render(view, ...args) and may return a function that stops its timers and
// sockets when another page is shown.
import { current, loadSession, signOut } from "./api.js";
import { clear, h } from "./dom.js";
import * as audit from "./pages/audit.js";
import * as images from "./pages/images.js";
import * as nodes from "./pages/nodes.js";
import * as sandbox from "./pages/sandbox.js";
import * as sandboxes from "./pages/sandboxes.js";
import * as signin from "./pages/signin.js";
import * as tokens from "./pages/tokens.js";

const PAGES = { sandboxes, sandbox, images, nodes, tokens, audit, signin };
const view = document.getElementById("view");
const nav = document.getElementById("nav");
const menu = document.getElementById("menu");
let stop = null;

export function flash(message, kind = "error") {
  const box = document.getElementById("flash");
  const item = h("div", { class: `flash ${kind}` }, message);
  box.append(item);
  setTimeout(() => item.remove(), kind === "error" ? 8000 : 4000);
}

function parse() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  let [page, ...args] = parts;
  if (page === "sandboxes" && args.length) page = "sandbox";
  return { page: PAGES[page] ? page : "sandboxes", args };
}

async function route() {
  if (stop) {
    try {
      stop();
    } catch {
      // a page that failed to stop cleanly must not keep the next one from showing
    }
    stop = null;
  }
  let { page, args } = parse();
  if (!current() && page !== "signin") {
    if (!(await loadSession().catch(() => null))) page = "signin";
  }
  nav.hidden = !current();
  menu.hidden = !current();
  for (const link of nav.querySelectorAll("a")) {
    link.classList.toggle("active", link.dataset.page === (page === "sandbox" ? "sandboxes" : page));
    if (link.hasAttribute("data-admin")) link.hidden = !(current() && current().admin);
  }
  document.body.dataset.page = page;
  nav.classList.remove("open");
  menu.setAttribute("aria-expanded", "false");
  clear(view);
  try {
    stop = (await PAGES[page].render(view, ...args)) || null;
  } catch (error) {
    clear(view, h("p", { class: "error" }, error.message));
  }
}

menu.addEventListener("click", () => {
  const open = nav.classList.toggle("open");
  menu.setAttribute("aria-expanded", String(open));
});
document.getElementById("sign-out").addEventListener("click", async () => {
  await signOut().catch(() => {});
  location.hash = "#/signin";
  route();
});
window.addEventListener("corral:signed-out", () => {
  if (parse().page !== "signin") location.hash = "#/signin";
});
window.addEventListener("hashchange", route);
window.addEventListener("corral:flash", (event) => flash(event.detail.message, event.detail.kind));
route();
