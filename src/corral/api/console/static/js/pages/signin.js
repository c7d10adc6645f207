import { signIn } from "../api.js";
import { field, h } from "../dom.js";

export function render(view) {
  const token = h("input", {
    type: "password",
    name: "token",
    id: "token",
    autocomplete: "current-password",
    required: true,
    placeholder: "crl_…",
  });
  const problem = h("p", { class: "error", role: "alert" });
  const form = h(
    "form",
    { class: "card signin", id: "signin" },
    h("h1", {}, "Sign in"),
    h("p", { class: "muted" }, "Paste a Corral token (the admin key, or one made on the tokens page)."),
    field("Token", token),
    problem,
    h("button", { type: "submit", class: "primary" }, "Sign in"),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    problem.textContent = "";
    try {
      await signIn(token.value);
      // On to the page that was asked for (a bookmark, a reload), else the sandboxes.
      if (!location.hash || location.hash === "#/signin") location.hash = "#/sandboxes";
      else window.dispatchEvent(new HashChangeEvent("hashchange"));
    } catch (error) {
      problem.textContent = error.status === 401 ? "That token is not valid." : error.message;
      token.select();
    }
  });
  view.append(form);
  token.focus();
}
