// The JSON API with the signed-in token (kept in sessionStorage only).
const KEY = "proxyorch.auth";

export function auth() {
  try { return JSON.parse(sessionStorage.getItem(KEY) || "null"); } catch { return null; }
}
export function setAuth(value) {
  if (value) sessionStorage.setItem(KEY, JSON.stringify(value)); else sessionStorage.removeItem(KEY);
}

export class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

export async function call(method, path, { params, body, as } = {}) {
  const a = as || auth();
  const headers = { Accept: "application/json" };
  if (a && a.kind === "admin") headers["X-Admin-Token"] = a.token;
  else if (a) headers.Authorization = `Bearer ${a.token}`;
  let url = path;
  if (params) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== "") q.set(k, v);
    if ([...q].length) url += "?" + q.toString();
  }
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try { data = await r.json(); } catch { data = null; }
  if (!r.ok) throw new ApiError(r.status, (data && (data.error || data.message)) || `HTTP ${r.status}`);
  return data;
}

// Checks the token against a route of its kind; throws ApiError(401) when it is not valid.
export async function signIn(token, admin) {
  const as = { kind: admin ? "admin" : "user", token };
  await call("GET", admin ? "/api/v2/admin/proxies" : "/api/v2/devices", { as });
  return as;
}
