// A terminal in the page: xterm.js on a tty command started over the native exec WebSocket.
// Keys go in as stdin frames, output comes back as base64 (so that a chunk splitting a UTF-8
// character is still written as bytes), and the terminal's size follows its box.
import { socketUrl, sandboxPath } from "../api.js";
import { h } from "../dom.js";
import { FitAddon } from "../../vendor/addon-fit/addon-fit.js";
import { Terminal } from "../../vendor/xterm/xterm.js";

export function terminal(body, id) {
  const box = h("div", { class: "terminal", id: "terminal" });
  const status = h("p", { class: "muted", id: "terminal-status" }, "Connecting…");
  const again = h("button", { type: "button", class: "small", hidden: true }, "Reconnect");
  body.append(h("div", { class: "terminal-head" }, status, again), box);

  const term = new Terminal({
    cursorBlink: true,
    fontFamily: "ui-monospace, 'DejaVu Sans Mono', Menlo, Consolas, monospace",
    fontSize: 14,
    scrollback: 5000,
    theme: { background: "#111318", foreground: "#e6e6e6" },
  });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(box);
  fit.fit();
  let socket = null;

  function send(frame) {
    if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(frame));
  }

  function connect() {
    again.hidden = true;
    status.textContent = "Connecting…";
    socket = new WebSocket(socketUrl(sandboxPath(id, "/exec/stream"), { encoding: "base64" }));
    socket.addEventListener("open", () => {
      send({
        type: "start",
        command: "bash",
        args: ["-l"],
        tty: true,
        rows: term.rows,
        cols: term.cols,
        kill_on_disconnect: true,
        env: { TERM: "xterm-256color" },
      });
    });
    socket.addEventListener("message", (event) => {
      const frame = JSON.parse(event.data);
      if (frame.type === "started") {
        status.textContent = `Connected: ${frame.command_id}`;
        status.dataset.connected = "true";
        term.focus();
      } else if (frame.type === "stdout" || frame.type === "stderr") {
        if (frame.data_base64 !== undefined) {
          term.write(Uint8Array.from(atob(frame.data_base64), (c) => c.charCodeAt(0)));
        } else {
          term.write(frame.data);
        }
      } else if (frame.type === "exit") {
        status.textContent = `Ended: exit ${frame.exit_code ?? frame.status}`;
      } else if (frame.type === "error") {
        status.textContent = `Ended: ${frame.message}`;
      }
    });
    socket.addEventListener("close", () => {
      delete status.dataset.connected;
      if (!status.textContent.startsWith("Ended")) status.textContent = "Disconnected";
      again.hidden = false;
    });
  }

  const input = term.onData((data) => send({ type: "stdin", data }));
  const resized = term.onResize(({ rows, cols }) => send({ type: "resize", rows, cols }));
  const observer = new ResizeObserver(() => {
    try {
      fit.fit();
    } catch {
      // the box is hidden (zero size): nothing to fit
    }
  });
  observer.observe(box);
  again.addEventListener("click", connect);
  connect();

  return () => {
    observer.disconnect();
    input.dispose();
    resized.dispose();
    if (socket) socket.close();
    term.dispose();
  };
}
