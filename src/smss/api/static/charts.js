// Small SVG charts: lines over time, horizontal stacked bars, a Gantt timeline.
// Everything is built as DOM nodes (no markup strings), so names from the server are text.

const SVG = "http://www.w3.org/2000/svg";
export const PALETTE = [
  "#2563eb", "#16a34a", "#ea580c", "#9333ea", "#0891b2",
  "#ca8a04", "#db2777", "#4b5563", "#65a30d", "#dc2626",
];
export const TIER_COLORS = {
  warm: "#16a34a", standby: "#2563eb", resident: "#9333ea", cold: "#64748b",
  no_runtime: "#94a3b8", process: "#ea580c",
};

export function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== undefined && v !== null) el.setAttribute(k, v);
  for (const c of children) el.append(c);
  return el;
}

function title(text) {
  return s("title", {}, text);
}

// Round tick values covering [0, max].
export function ticks(max, count = 4) {
  if (!(max > 0)) return [0, 1];
  const raw = max / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((x) => x >= raw);
  const out = [];
  for (let v = 0; v <= max + step * 1e-9; v += step) out.push(v);
  if (out[out.length - 1] < max) out.push(out[out.length - 1] + step);
  return out;
}

export function fmt(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  const a = Math.abs(v);
  if (a >= 1000) return v.toFixed(0);
  if (a >= 10) return v.toFixed(1).replace(/\.0$/, "");
  return String(Number(v.toPrecision(3)));
}

function clock(t) {
  return new Date(t).toLocaleTimeString([], { hour12: false });
}

// series: [{name, color, points: [[t, v|null]], dash}]
export function lineChart({ series, yLabel, xLabel = "time", height = 200, empty = "no data yet" }) {
  const W = 560, H = height, L = 56, R = 12, T = 10, B = 38;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img" });
  const pts = series.flatMap((x) => x.points.filter((p) => p[1] !== null));
  const ts = series.flatMap((x) => x.points.map((p) => p[0]));
  if (ts.length < 2 || pts.length === 0) {
    svg.append(s("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, empty));
    return svg;
  }
  const t0 = Math.min(...ts), t1 = Math.max(...ts);
  const yt = ticks(Math.max(...pts.map((p) => p[1])) * 1.08); // headroom: a line at the maximum stays visible
  const ymax = yt[yt.length - 1];
  const x = (t) => L + ((t - t0) / Math.max(t1 - t0, 1)) * (W - L - R);
  const y = (v) => H - B - (v / ymax) * (H - T - B);
  for (const v of yt) {
    svg.append(s("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }));
    svg.append(s("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end", class: "tick" }, fmt(v)));
  }
  const n = t1 - t0 >= 6000 ? 3 : 1; // time labels (hh:mm:ss) that do not overlap
  for (let i = 0; i <= n; i++) {
    const t = t0 + ((t1 - t0) * i) / n;
    const anchor = i === 0 ? "start" : i === n ? "end" : "middle";
    svg.append(s("text", { x: x(t), y: H - B + 16, "text-anchor": anchor, class: "tick" }, clock(t)));
  }
  svg.append(s("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }));
  svg.append(s("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
  svg.append(s("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", class: "label" }, xLabel));
  svg.append(
    s("text", { x: 12, y: (T + H - B) / 2, transform: `rotate(-90 12 ${(T + H - B) / 2})`,
      "text-anchor": "middle", class: "label" }, yLabel),
  );
  for (const line of series) {
    let d = "";
    let pen = false;
    for (const [t, v] of line.points) {
      if (v === null) { pen = false; continue; }
      d += `${pen ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
      pen = true;
    }
    if (d) {
      svg.append(s("path", { d, fill: "none", stroke: line.color, "stroke-width": 2,
        "stroke-dasharray": line.dash ? "5 4" : null, class: "series" }, title(line.name)));
    }
  }
  return svg;
}

export function legend(items) {
  const el = document.createElement("div");
  el.className = "legend";
  for (const { name, color, dash } of items) {
    const item = document.createElement("span");
    const sw = document.createElement("i");
    sw.className = dash ? "swatch dash" : "swatch";
    sw.style.borderColor = color;
    sw.style.background = dash ? "transparent" : color;
    item.append(sw, name);
    el.append(item);
  }
  return el;
}

// rows: [{label, parts: [{key, value, color}]}] drawn as stacked horizontal bars.
export function stackedBars({ rows, xLabel, empty = "nothing yet" }) {
  const W = 560, row = 24, L = 130, R = 40, T = 6, B = 34;
  const H = T + B + Math.max(rows.length, 1) * row;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img" });
  const totals = rows.map((r) => r.parts.reduce((a, p) => a + p.value, 0));
  if (!rows.length || Math.max(...totals) <= 0) {
    svg.append(s("text", { x: W / 2, y: H / 2 + 4, "text-anchor": "middle", class: "empty" }, empty));
    return svg;
  }
  const xt = ticks(Math.max(...totals));
  const xmax = xt[xt.length - 1];
  const x = (v) => L + (v / xmax) * (W - L - R);
  for (const v of xt) {
    svg.append(s("line", { x1: x(v), x2: x(v), y1: T, y2: H - B, class: "grid" }));
    svg.append(s("text", { x: x(v), y: H - B + 14, "text-anchor": "middle", class: "tick" }, fmt(v)));
  }
  rows.forEach((r, i) => {
    const y0 = T + i * row + 4;
    svg.append(s("text", { x: L - 6, y: y0 + 12, "text-anchor": "end", class: "tick" }, r.label));
    let acc = 0;
    for (const p of r.parts) {
      if (p.value <= 0) continue;
      svg.append(s("rect", { x: x(acc), y: y0, width: Math.max(x(acc + p.value) - x(acc), 1),
        height: row - 8, fill: p.color }, title(`${r.label} · ${p.key}: ${fmt(p.value)}`)));
      acc += p.value;
    }
    svg.append(s("text", { x: x(acc) + 4, y: y0 + 12, class: "tick" }, fmt(totals[i])));
  });
  svg.append(s("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", class: "label" }, xLabel));
  return svg;
}

// bars: [{label, start, end, kind, note}] in ms from the run's start; kind picks the colour.
export const GANTT_COLORS = {
  completed: "#16a34a", failed: "#dc2626", running: "#2563eb", retried: "#f59e0b", waiting: "#cbd5e1",
};

export function gantt({ bars, span }) {
  const W = 760, row = 26, L = 170, R = 130, T = 8, B = 36;
  const H = T + B + Math.max(bars.length, 1) * row;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart gantt", role: "img" });
  const xt = ticks(Math.max(span, 1), 5);
  const xmax = xt[xt.length - 1];
  const x = (v) => L + (v / xmax) * (W - L - R);
  for (const v of xt) {
    svg.append(s("line", { x1: x(v), x2: x(v), y1: T, y2: H - B, class: "grid" }));
    svg.append(s("text", { x: x(v), y: H - B + 14, "text-anchor": "middle", class: "tick" }, fmt(v)));
  }
  bars.forEach((b, i) => {
    const y0 = T + i * row + 4;
    svg.append(s("text", { x: L - 6, y: y0 + 13, "text-anchor": "end", class: "tick" }, b.label));
    if (b.queuedFrom !== undefined && b.start > b.queuedFrom) {
      svg.append(s("rect", { x: x(b.queuedFrom), y: y0 + 6, width: Math.max(x(b.start) - x(b.queuedFrom), 1),
        height: row - 20, fill: GANTT_COLORS.waiting }, title(`${b.label}: scheduled, waiting`)));
    }
    const width = Math.max(x(b.end) - x(b.start), 2);
    svg.append(s("rect", { x: x(b.start), y: y0, width, height: row - 8, rx: 2,
      fill: GANTT_COLORS[b.kind] || "#64748b", class: `bar ${b.kind}` },
    title(`${b.label}: ${b.kind}, ${fmt(b.end - b.start)} ms${b.note ? ` · ${b.note}` : ""}`)));
    svg.append(s("text", { x: x(b.start) + width + 4, y: y0 + 13, class: "tick" },
      `${fmt(b.end - b.start)} ms${b.kind === "failed" && b.note ? ` · ${b.note}` : ""}`));
  });
  svg.append(s("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", class: "label" },
    "ms since the run started"));
  return svg;
}
