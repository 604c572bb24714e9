// The six views. Each renders into `root` and returns a function that stops its timers.
import { call } from "./api.js";
import { barChart, timeChart } from "./charts.js";
import { bytes, el, fromInput, isoInput, rate, short, sparkline, table, when } from "./dom.js";

const history = new Map();  // deviceId -> recent throughput samples (bytes/s), for the sparklines
const HISTORY_LEN = 60;

function every(ms, fn) {
  let stopped = false;
  let timer = null;
  const tick = async () => {
    try { await fn(); } catch (e) { status(e); }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  tick();
  return () => { stopped = true; clearTimeout(timer); };
}

export function status(e) {
  document.getElementById("status").textContent = e ? `Error: ${e.message || e}` : "";
}

async function confirmCall(question, method, path, body) {
  if (!window.confirm(question)) return;
  try { await call(method, path, { body }); status(null); } catch (e) { status(e); }
}

function askDomains() {
  const text = window.prompt("Domains to blacklist (comma separated)");
  return text ? text.split(",").map((s) => s.trim()).filter(Boolean) : null;
}

// -- Devices -----------------------------------------------------------------------------------
export function devices(root, ctx) {
  if (ctx.admin) { root.append(el("p", { class: "empty", text: "Devices are listed for a user token; see Connections." })); return () => {}; }
  const holder = el("div");
  root.append(el("h2", { text: "Devices" }), holder);
  return every(1000, async () => {
    const [list, live, presence] = await Promise.all([call("GET", "/api/v2/devices"), call("GET", "/api/v2/proxy/sessions"),
      call("GET", "/api/v2/devices/presence")]);
    const where = new Map(presence.devices.map((p) => [p.deviceId, p]));
    const open = new Map(), speed = new Map();
    for (const s of live.sessions) {
      open.set(s.deviceId, (open.get(s.deviceId) || 0) + 1);
      speed.set(s.deviceId, (speed.get(s.deviceId) || 0) + s.rateIn + s.rateOut);
    }
    for (const d of list) {
      const h = history.get(d.remote_device_id) || [];
      h.push(speed.get(d.remote_device_id) || 0);
      if (h.length > HISTORY_LEN) h.shift();
      history.set(d.remote_device_id, h);
    }
    const cols = [["Name"], ["Device"], ["State"], ["Node"], ["Network"], ["Public IP"], ["Sessions", "num"],
                  ["Throughput", "num"], ["Last minute"], ["Actions"]];
    holder.replaceChildren(table("devices-table", cols, list, (d, i) => {
      const id = d.remote_device_id;
      switch (i) {
        case 0: return d.name;
        case 1: return el("span", { class: "mono", title: id, text: short(id) });
        case 2: return el("span", { class: d.online ? "online" : "offline", "data-testid": "device-state", text: d.online ? "online" : "offline" });
        case 3: return where.get(id)?.node;
        case 4: return d.networkType;
        case 5: return where.get(id)?.publicIp;
        case 6: return String(open.get(id) || 0);
        case 7: return rate(speed.get(id) || 0);
        case 8: return sparkline(history.get(id) || []);
        default: return el("span", {},
          el("button", { class: "small", "data-testid": "device-rotate-ip", text: "Rotate IP", disabled: !d.online, onclick: () =>
            confirmCall("Change this phone's public IP now? Its open sessions end.", "POST", `/api/v2/devices/${id}/rotate-ip`) }),
          el("button", { class: "small", "data-testid": "device-blacklist", text: "Blacklist…", onclick: () => {
            const domains = askDomains();
            if (domains) confirmCall(`Blacklist ${domains.join(", ")} on this device?`, "POST", `/api/v2/devices/${id}/blacklist`, { domains });
          } }));
      }
    }));
  });
}

// -- Connections -------------------------------------------------------------------------------
const unlimited = "∞";
const perS = (n) => (n === null || n === undefined ? unlimited : rate(n));

// The limits, access mode and usage cells of one connection (`open`: its open sessions on every node).
function usageCells(c, open) {
  const L = c.limits || {}, U = c.usage || {}, A = c.access || {};
  const ips = A.allowed_ips || [];
  const access = el("span", { "data-testid": "conn-access", "data-mode": A.mode || "password",
    text: (A.mode || "password") + (ips.length ? ` (${ips.join(", ")})` : "") });
  const rates = el("span", { "data-testid": "conn-rates", text: `↓ ${perS(L.download_bytes_per_s)} ↑ ${perS(L.upload_bytes_per_s)}` });
  const max = L.max_concurrent_sessions;
  const sessions = el("span", { "data-testid": "conn-sessions", "data-open": open, text: `${open} / ${max ?? unlimited}` });
  const used = U.used_bytes || 0;
  const quota = el("span", { "data-testid": "conn-quota", "data-used": used,
    "data-remaining": U.remaining_bytes ?? "", "data-quota": U.quota_bytes ?? "" });
  if (U.quota_bytes === null || U.quota_bytes === undefined) {
    quota.append(`${bytes(used)} used · no quota`);
  } else {
    const share = U.quota_bytes ? Math.min(1, used / U.quota_bytes) : 1;
    quota.append(el("meter", { min: 0, max: 1, value: share, title: `${Math.round(share * 100)} %` }), " ",
      `${bytes(used)} of ${bytes(U.quota_bytes)} per ${U.quota_period} · ${bytes(U.remaining_bytes)} left`);
  }
  return { access, rates, sessions, quota };
}

async function openByConnection() {
  const live = await call("GET", "/api/v2/proxy/sessions");
  const open = new Map();
  for (const s of live.sessions) open.set(s.connectionId, (open.get(s.connectionId) || 0) + 1);
  return open;
}

export function connections(root, ctx) {
  const holder = el("div");
  const revealed = new Set();  // connection ids whose password is shown (kept across refreshes)
  root.append(el("h2", { text: "Connections" }), holder);
  const usageCols = [["Access"], ["Speed limit"], ["Sessions", "num"], ["Quota"]];
  const load = async () => {
    if (ctx.admin) {
      const [data, open] = await Promise.all([call("GET", "/api/v2/admin/proxies"), openByConnection()]);
      holder.replaceChildren(table("connections-table", [["Name"], ["Connection"], ["Device"], ["24 h", "num"], ["Lifetime", "num"], ...usageCols],
        data.proxies, (p, i) => {
          if (i >= 5) { const u = usageCells(p, open.get(p.connection_id) || 0); return [u.access, u.rates, u.sessions, u.quota][i - 5]; }
          return [p.name, p.connection_id, p.device ? `${p.device.name || ""} ${short(p.device.remote_device_id)}` : "none", bytes(p.bytes_last_24h), bytes(p.bytes_lifetime)][i];
        }));
      return;
    }
    const [conns, devs, open] = await Promise.all([call("GET", "/api/v2/proxy/connections"), call("GET", "/api/v2/devices"),
      openByConnection()]);
    const names = new Map(devs.map((d) => [d.remote_device_id, d.name]));
    const list = conns.connections || conns;
    holder.replaceChildren(table("connections-table", [["Name"], ["Connection (user name)"], ["Password"], ["Exit device"], ...usageCols, ["Created"], ["Actions"]],
      list, (c, i) => {
        const id = c.connectionId;
        const u = i >= 4 && i < 8 ? usageCells(c, open.get(id) || 0) : null;
        switch (i) {
          case 0: return c.name;
          case 1: return el("span", { class: "mono", text: id });
          case 2: {
            const hidden = "••••••••";
            const span = el("span", { class: "mono", text: revealed.has(id) ? c.password : hidden });
            const btn = el("button", { class: "small", "data-testid": "reveal-password", text: revealed.has(id) ? "Hide" : "Reveal", onclick: () => {
              const shown = revealed.has(id);
              if (shown) revealed.delete(id); else revealed.add(id);
              span.textContent = shown ? hidden : c.password;
              btn.textContent = shown ? "Reveal" : "Hide";
            } });
            return el("span", {}, span, " ", btn);
          }
          case 3: return el("span", { "data-testid": "conn-device", "data-device": c.deviceId || "",
            text: c.deviceId ? `${names.get(c.deviceId) || ""} ${short(c.deviceId)}` : "none" });
          case 4: return u.access;
          case 5: return u.rates;
          case 6: return u.sessions;
          case 7: return u.quota;
          case 8: return when(c.createdAt);
          default: return el("span", {},
            el("button", { class: "small", "data-testid": "rotate-exit", text: "Rotate exit…", onclick: async () => {
              const options = devs.map((d) => `${d.remote_device_id}  ${d.name || ""}`).join("\n");
              const to = window.prompt(`New exit device id:\n${options}`);
              if (to) { await confirmCall("Move this connection to that device?", "PUT", `/api/v2/proxy/connections/${id}/device`, { device_id: to.trim().split(/\s+/)[0] }); load().catch(status); }
            } }),
            el("button", { class: "small", "data-testid": "dissociate", text: "Dissociate", disabled: !c.deviceId, onclick: async () => {
              await confirmCall("Dissociate (open sessions end)?", "DELETE", `/api/v2/proxy/connections/${id}/device`); load().catch(status);
            } }),
            el("button", { class: "small", "data-testid": "blacklist", text: "Blacklist…", onclick: () => {
              const domains = askDomains();
              if (domains) confirmCall(`Blacklist ${domains.join(", ")}?`, "POST", `/api/v2/proxy/connections/${id}/blacklist`, { domains });
            } }));
        }
      }));
  };
  return every(2000, load);
}

// -- Live sessions -----------------------------------------------------------------------------
export function sessions(root) {
  const totals = el("div", { class: "totals" });
  const holder = el("div");
  root.append(el("h2", { text: "Live sessions" }), totals, holder);
  return every(1000, async () => {
    const data = await call("GET", "/api/v2/proxy/sessions");
    const s = data.sessions;
    const sum = (k) => s.reduce((n, x) => n + x[k], 0);
    totals.replaceChildren(...[["Open", String(data.total)], ["Down", rate(sum("rateIn"))], ["Up", rate(sum("rateOut"))],
      ["Received", bytes(sum("bytesIn"))], ["Sent", bytes(sum("bytesOut"))]]
      .map(([k, v]) => el("div", {}, el("b", { "data-testid": `total-${k.toLowerCase()}`, text: v }), el("span", { text: k }))));
    holder.replaceChildren(table("sessions-table", [["Target"], ["Client"], ["Protocol"], ["Connection"], ["Device"], ["Node"],
      ["Started"], ["Down", "num"], ["Up", "num"], ["Rate down", "num"], ["Rate up", "num"]], s, (x, i) =>
      [x.target, x.clientAddress, x.protocol, short(x.connectionId), short(x.deviceId), x.node, when(x.startedAt),
       bytes(x.bytesIn), bytes(x.bytesOut), el("span", { "data-rate": x.rateIn, text: rate(x.rateIn) }), rate(x.rateOut)][i]));
  });
}

// -- Bandwidth ---------------------------------------------------------------------------------
function windowControls(hours, onChange, extra = []) {
  const now = new Date();
  const from = el("input", { type: "datetime-local", value: isoInput(new Date(now - hours * 3600e3)) });
  const to = el("input", { type: "datetime-local", value: isoInput(new Date(now.getTime() + 3600e3)) });
  const bar = el("form", { class: "toolbar" }, el("label", {}, "From", from), el("label", {}, "To", to), extra,
    el("button", { type: "submit", text: "Show" }));
  bar.addEventListener("submit", (e) => { e.preventDefault(); onChange(); });
  return { bar, range: () => ({ from: fromInput(from.value), to: fromInput(to.value) }) };
}

export function bandwidth(root, ctx) {
  if (ctx.admin) { root.append(el("p", { class: "empty", text: "Bandwidth is shown per user; sign in with a user token." })); return () => {}; }
  const group = el("select", {}, el("option", { value: "hour", text: "per hour" }), el("option", { value: "day", text: "per day" }));
  const by = el("select", {}, el("option", { value: "deviceId", text: "by device" }), el("option", { value: "connectionId", text: "by connection" }));
  const chart = el("div", { class: "chart", "data-testid": "bandwidth-chart" });
  const note = el("p", { class: "empty" });
  const load = async () => {
    const { from, to } = w.range();
    const [data, devs, conns] = await Promise.all([
      call("GET", "/api/v2/proxy/bandwidth", { params: { from, to, groupBy: group.value } }),
      call("GET", "/api/v2/devices"), call("GET", "/api/v2/proxy/connections")]);
    const names = new Map([...devs.map((d) => [d.remote_device_id, d.name]),
                           ...conns.connections.map((c) => [c.connectionId, c.name])]);
    // Every bucket of the window, so empty hours/days show as zero and the axis spans the window.
    const step = group.value === "day" ? 86400 : 3600;
    const first = Math.floor(Date.parse(from) / 1000 / step) * step;
    const last = Math.floor(Date.parse(to) / 1000 / step) * step;
    const xs = [];
    for (let t = first; t <= last && xs.length < 5000; t += step) xs.push(t);
    const index = new Map(xs.map((t, i) => [t, i]));
    const keys = [...new Set(data.rows.map((r) => r[by.value]))].sort();
    const series = keys.map((k) => ({ label: `${names.get(k) || ""} ${short(k)}`.trim(), values: xs.map(() => 0) }));
    for (const r of data.rows) {
      const i = index.get(Date.parse(r.bucket) / 1000);
      if (i !== undefined) series[keys.indexOf(r[by.value])].values[i] += r.bytesIn + r.bytesOut;
    }
    note.textContent = data.rows.length ? "" : "No traffic in this window.";
    timeChart(chart, xs, series.length ? series : [{ label: "bytes", values: xs.map(() => 0) }]);
  };
  const w = windowControls(24, () => load().catch(status), [el("label", {}, "Bucket", group), el("label", {}, "Series", by)]);
  root.append(el("h2", { text: "Bandwidth" }), w.bar, note, chart);
  load().catch(status);
  return () => {};
}

// -- Domains -----------------------------------------------------------------------------------
export function domains(root) {
  const chart = el("div", { class: "chart", "data-testid": "domains-chart" });
  const holder = el("div");
  const load = async () => {
    const data = await call("GET", "/api/v2/proxy/domains", { params: { ...w.range(), limit: 50 } });
    const d = data.domains;
    holder.replaceChildren(table("domains-table", [["Domain"], ["Sessions", "num"], ["Blocked", "num"], ["Failed", "num"],
      ["Down", "num"], ["Up", "num"], ["First seen"], ["Last seen"]], d, (x, i) =>
      [x.domain, String(x.sessions), String(x.blocked), String(x.failed), bytes(x.bytesIn), bytes(x.bytesOut), when(x.firstSeen), when(x.lastSeen)][i]));
    const top = d.slice(0, 12);
    barChart(chart, top.map((x) => x.domain), top.map((x) => x.bytesIn + x.bytesOut));
  };
  const w = windowControls(24, () => load().catch(status));
  root.append(el("h2", { text: "Domains" }), w.bar, chart, holder);
  load().catch(status);
  return () => {};
}

// -- Request log -------------------------------------------------------------------------------
export function logs(root, ctx) {
  if (ctx.admin) { root.append(el("p", { class: "empty", text: "The request log is shown per user; sign in with a user token." })); return () => {}; }
  const PAGE = 50;
  let offset = 0;
  const f = {
    connectionId: el("input", { placeholder: "connection id", size: 36 }),
    deviceId: el("input", { placeholder: "device id", size: 36 }),
    target: el("input", { placeholder: "target contains" }),
    action: el("select", {}, el("option", { value: "", text: "any" }), el("option", { value: "allowed", text: "allowed" }),
      el("option", { value: "blocked", text: "blocked" })),
  };
  const holder = el("div");
  const pager = el("div", { class: "toolbar" });
  const load = async () => {
    const params = { ...w.range(), limit: PAGE, offset };
    for (const [k, input] of Object.entries(f)) params[k] = input.value.trim();
    const data = await call("GET", "/api/v2/proxy/logs", { params });
    holder.replaceChildren(table("logs-table", [["Time"], ["Target"], ["Action"], ["Reason"], ["Reply", "num"], ["Protocol"],
      ["Client"], ["Connection"], ["Down", "num"], ["Up", "num"], ["ms", "num"]], data.entries, (x, i) =>
      [when(x.timestamp), x.target, x.action, x.blockReason || x.error, String(x.replyCode), x.protocol, x.clientAddr,
       short(x.connectionId), bytes(x.bytesIn), bytes(x.bytesOut), String(x.durationMs)][i]));
    const last = Math.min(offset + PAGE, data.total);
    pager.replaceChildren(
      el("button", { text: "‹ Newer", disabled: offset === 0, onclick: () => { offset = Math.max(0, offset - PAGE); load().catch(status); } }),
      el("span", { text: data.total ? `${offset + 1}–${last} of ${data.total}` : "no entries" }),
      el("button", { text: "Older ›", disabled: last >= data.total, onclick: () => { offset += PAGE; load().catch(status); } }));
  };
  const w = windowControls(24, () => { offset = 0; load().catch(status); },
    Object.entries(f).map(([k, input]) => el("label", {}, k, input)));
  root.append(el("h2", { text: "Request log" }), w.bar, holder, pager);
  load().catch(status);
  return () => {};
}
