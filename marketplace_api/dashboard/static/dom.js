// DOM helpers. Every string from the API goes in as text (textContent), never as HTML.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = String(v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

export function table(testid, columns, rows, cell) {
  const head = el("tr", {}, columns.map(([label, cls]) => el("th", { class: cls, text: label })));
  const body = rows.map((row) => el("tr", {}, columns.map((col, i) => {
    const v = cell(row, i);
    return el("td", { class: col[1] }, v instanceof Node ? v : (v ?? "—"));
  })));
  const t = el("table", { "data-testid": testid }, el("thead", {}, head), el("tbody", {}, body));
  t.dataset.rows = String(rows.length);
  return t;
}

export function bytes(n) {
  n = Number(n || 0);
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}
export const rate = (n) => `${bytes(n)}/s`;
export const when = (iso) => (iso ? new Date(iso).toLocaleString() : "—");
export const short = (id) => (id ? String(id).slice(0, 8) : "—");

export function isoInput(date) {  // value for <input type=datetime-local>, local time
  const d = new Date(date.getTime() - date.getTimezoneOffset() * 60000);
  return d.toISOString().slice(0, 16);
}
export const fromInput = (value) => (value ? new Date(value).toISOString() : "");

export function sparkline(values, width = 120, height = 28) {
  const c = el("canvas", { class: "spark", width, height });
  const ctx = c.getContext("2d");
  const max = Math.max(1, ...values);
  ctx.strokeStyle = "#2563eb"; ctx.fillStyle = "rgba(37,99,235,.15)"; ctx.lineWidth = 1.5;
  ctx.beginPath();
  values.forEach((v, i) => {
    const x = values.length > 1 ? (i / (values.length - 1)) * (width - 2) + 1 : 1;
    const y = height - 2 - (v / max) * (height - 4);
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
  c.dataset.max = String(Math.max(0, ...values));
  return c;
}
