// The native API (/v1) with the console's session cookie. The cookie itself is HttpOnly: this
// script never sees the token. Calls that change something carry the session's CSRF token.

let session = null;

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function current() {
  return session;
}

async function failure(response) {
  let code = "http_" + response.status;
  let message = response.statusText || `HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
    }
  } catch {
    // not JSON: the status says enough
  }
  return new ApiError(response.status, code, message);
}

export async function loadSession() {
  const response = await fetch("/console/api/session", { credentials: "same-origin" });
  if (response.status === 401) {
    session = null;
    return null;
  }
  if (!response.ok) throw await failure(response);
  session = await response.json();
  return session;
}

export async function signIn(token) {
  const response = await fetch("/console/api/session", {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ token }),
  });
  if (!response.ok) throw await failure(response);
  session = await response.json();
  return session;
}

export async function signOut() {
  if (session) await api("DELETE", "/console/api/session");
  session = null;
}

export function url(path, query) {
  const target = new URL(path, location.origin);
  for (const [key, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== "") target.searchParams.set(key, value);
  }
  return target;
}

// api("POST", "/v1/sandboxes", {json: {...}}); {body, headers, query, raw} as needed.
export async function api(method, path, options = {}) {
  const headers = new Headers(options.headers || {});
  let body = options.body;
  if (options.json !== undefined) {
    headers.set("Content-Type", "application/json");
    body = JSON.stringify(options.json);
  }
  if (method !== "GET" && method !== "HEAD" && session) headers.set("X-Corral-CSRF", session.csrf);
  const response = await fetch(url(path, options.query), {
    method,
    headers,
    body,
    credentials: "same-origin",
  });
  if (!response.ok) {
    const error = await failure(response);
    if (response.status === 401) {
      session = null; // revoked or expired: sign in again
      window.dispatchEvent(new CustomEvent("corral:signed-out"));
    }
    throw error;
  }
  if (options.raw) return response;
  if (response.status === 204) return null;
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response.text();
}

// A WebSocket URL on this origin; the handshake carries the CSRF token (no header can).
export function socketUrl(path, query = {}) {
  const target = url(path, { ...query, csrf: session ? session.csrf : "" });
  target.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  return target.toString();
}

export function sandboxPath(id, rest = "") {
  return `/v1/sandboxes/${encodeURIComponent(id)}${rest}`;
}
