// Charts with the vendored uPlot (global `uPlot`, loaded by index.html).
import { bytes } from "./dom.js";

const bytesAxis = { size: 80, values: (u, vals) => vals.map((v) => bytes(v)) };
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];

function mount(container, opts, data) {
  container.replaceChildren();
  const width = Math.max(320, container.clientWidth || 800);
  const plot = new uPlot({ width, height: 300, ...opts }, data, container);
  container.dataset.points = String(data.slice(1).reduce((n, s) => n + s.filter((v) => v).length, 0));
  return plot;
}

// Time series: x = epoch seconds, one line per named series.
export function timeChart(container, xs, series) {
  return mount(container, {
    series: [{}, ...series.map((s, i) => ({ label: s.label, stroke: COLORS[i % COLORS.length], width: 2,
                                             fill: COLORS[i % COLORS.length] + "22" }))],
    axes: [{}, bytesAxis],
    scales: { y: { range: (u, min, max) => [0, Math.max(1024, max * 1.1)] } },
  }, [xs, ...series.map((s) => s.values)]);
}

// Bars: one bar per label.
export function barChart(container, labels, values, unitLabel = "bytes") {
  const xs = labels.map((_, i) => i);
  return mount(container, {
    scales: { x: { time: false, range: [-0.5, Math.max(0.5, labels.length - 0.5)] } },
    series: [{}, { label: unitLabel, stroke: COLORS[0], fill: COLORS[0] + "aa",
                   paths: uPlot.paths.bars({ size: [0.7, 60] }), points: { show: false } }],
    axes: [{ values: (u, splits) => splits.map((i) => (Number.isInteger(i) && labels[i] !== undefined ? labels[i] : "")),
             rotate: 0, size: 40 }, bytesAxis],
    legend: { show: false },
  }, [xs, values]);
}
