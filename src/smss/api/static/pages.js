// The dashboard's pages. Each has mount(main, arg) (builds what stays: controls) and
// update() (redraws what the latest data changes), called after every sample.

import {
  PALETTE, TIER_COLORS, fmt, gantt, legend, lineChart, stackedBars, GANTT_COLORS,
} from "/ui/charts.js";
import { api, history, latencyMs, rate, session, tierOf } from "/ui/data.js";

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c);
  return el;
}

function card(title, ...body) {
  return h("section", { class: "card" }, h("h2", {}, title), ...body);
}

function table(headers, rows, attrs = {}) {
  return h("table", attrs,
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))),
    h("tbody", {}, rows));
}

function badge(text, kind = text) {
  return h("span", { class: `badge ${kind}` }, text);
}

function mib(mb) {
  return mb >= 1024 ? `${(mb / 1024).toFixed(1)} GiB` : `${fmt(mb)} MiB`;
}

function when(t) {
  return new Date(t * 1000).toLocaleString([], { hour12: false });
}

function colorOf(names) {
  const map = {};
  names.forEach((n, i) => { map[n] = PALETTE[i % PALETTE.length]; });
  return map;
}

function replace(el, ...children) {
  el.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined));
}

// --- functions ------------------------------------------------------------------------

export const functionsPage = {
  mount(main) {
    this.table = h("div", { class: "scroll" });
    this.charts = h("div", { class: "grid" });
    replace(main, card("Functions", this.table), this.charts);
  },
  update() {
    const s = history.last;
    if (!s) return;
    const prev = history.samples[history.samples.length - 2];
    const names = s.functions.map((f) => f.name);
    const colors = colorOf(names);
    const rows = s.functions.map((f) => {
      const tier = tierOf(f, s.stores);
      const ready = f.instances.filter((i) => i.state !== "starting").length;
      const status = f.state === "failed" ? `failed: ${f.last_error}` : f.last_error ? `retrying: ${f.last_error}` : f.state;
      return h("tr", { "data-function": f.name },
        h("td", {}, h("b", {}, f.name)), h("td", {}, f.version), h("td", {}, f.runtime),
        h("td", {}, badge(tier)),
        h("td", { class: "num" }, `${ready}${f.starting ? ` (+${f.starting} starting)` : ""}`),
        h("td", { class: "num" }, String(f.queued)),
        h("td", { class: "num" }, fmt(rate(f.name, s, prev))),
        h("td", { class: "num" }, fmt(latencyMs(f.name, 0.5, s, prev))),
        h("td", { class: "num" }, fmt(latencyMs(f.name, 0.99, s, prev))),
        h("td", { class: "num" }, String(f.cold_starts)),
        h("td", { class: f.last_error ? "error" : "" }, status));
    });
    replace(this.table, rows.length
      ? table(["function", "version", "runtime", "tier", "instances", "queued", "req/s", "p50 ms", "p99 ms", "starts", "state"], rows, { id: "functions-table" })
      : h("p", { class: "muted" }, "No function is deployed: smss deploy FILE.py:Class"));
    const byFn = (f) => names.map((n) => ({ name: n, color: colors[n], points: history.points((x, p) => f(n, x, p)) }));
    const instances = byFn((n, x) => {
      const fn = x.functions.find((g) => g.name === n);
      return fn ? fn.instances.length + fn.starting : null;
    });
    const rates = byFn((n, x, p) => rate(n, x, p));
    const p50 = byFn((n, x, p) => latencyMs(n, 0.5, x, p));
    const p99 = byFn((n, x, p) => latencyMs(n, 0.99, x, p)).map((l) => ({ ...l, name: `${l.name} p99`, dash: true }));
    const tiers = [...new Set(Object.values(s.counters).flatMap((c) => Object.keys(c.startsByTier)))].sort();
    const startRows = names.filter((n) => s.counters[n]).map((n) => ({
      label: n,
      parts: tiers.map((t) => ({ key: t, value: s.counters[n].startsByTier[t] || 0, color: TIER_COLORS[t] || "#64748b" })),
    }));
    const fnLegend = legend(names.map((n) => ({ name: n, color: colors[n] })));
    replace(this.charts,
      card("Instances over time", lineChart({ series: instances, yLabel: "instances" }), fnLegend.cloneNode(true)),
      card("Request rate", lineChart({ series: rates, yLabel: "requests / s" }), fnLegend.cloneNode(true)),
      card("Latency p50 (solid) and p99 (dashed)", lineChart({ series: [...p50, ...p99], yLabel: "ms" }), fnLegend.cloneNode(true)),
      card("Instance starts by tier of readiness", stackedBars({ rows: startRows, xLabel: "starts since the platform started", empty: "no instance has started yet" }),
        legend(tiers.map((t) => ({ name: t, color: TIER_COLORS[t] || "#64748b" })))),
    );
  },
};

// --- nodes and devices ----------------------------------------------------------------

const KIND_COLORS = { instance: "#2563eb", template: "#9333ea", spare: "#0891b2", weights: "#ca8a04" };

function memoryMap(device) {
  const gpu = device.kind === "cuda";
  const key = gpu ? "gpu_memory_mb" : "memory_mb";
  const side = gpu ? "gpu" : "cpu";
  const total = device.total[key] || 1;
  const bar = h("div", { class: "memmap" });
  const seg = (mb, cls, label, color) => {
    const el = h("div", { class: `seg ${cls}`, title: `${label}: ${mib(mb)}` }, mb / total > 0.08 ? label : "");
    el.style.width = `${Math.max((100 * mb) / total, 0.4)}%`;
    if (color) el.style.background = color;
    return el;
  };
  if (device.reserved[key] > 0) bar.append(seg(device.reserved[key], "reserved", "platform reserve"));
  for (const a of device.placed) {
    const mb = a[side][key];
    if (mb > 0) bar.append(seg(mb, a.kind, `${a.function} ${a.kind}`, KIND_COLORS[a.kind]));
  }
  const free = device.capacity[key] - device.allocated[key];
  if (free > 0) bar.append(seg(free, "free", "free"));
  return bar;
}

function deviceCard(d) {
  const gpu = d.kind === "cuda";
  const side = gpu ? "gpu" : "cpu";
  const cores = gpu ? `${fmt(d.allocated.gpu)} of ${fmt(d.capacity.gpu)} GPU` : `${fmt(d.allocated.cpu)} of ${fmt(d.capacity.cpu)} cores`;
  const mem = gpu ? "gpu_memory_mb" : "memory_mb";
  const rows = d.placed.map((a) => h("tr", {},
    h("td", {}, a.id), h("td", {}, a.function), h("td", {}, badge(a.kind)),
    h("td", { class: "num" }, fmt(a[side][gpu ? "gpu" : "cpu"])), h("td", { class: "num" }, mib(a[side][mem])),
    h("td", {}, a.idle_since === null ? (a.kind === "instance" ? "busy or starting" : "") : "idle"),
    h("td", {}, a.evictable ? "yes" : "")));
  return card(`${d.node} · ${d.kind}:${d.index} ${d.name}`,
    h("p", {}, `memory: ${mib(d.allocated[mem])} allocated of ${mib(d.capacity[mem])} (total ${mib(d.total[mem])}, platform reserve ${mib(d.reserved[mem])})`,
      d.free_memory_mb !== null && d.free_memory_mb !== undefined ? ` · measured free ${mib(d.free_memory_mb)}` : "",
      ` · compute: ${cores}`),
    memoryMap(d),
    legend(Object.entries(KIND_COLORS).map(([name, color]) => ({ name, color }))),
    rows.length ? table(["placed", "function", "kind", gpu ? "GPU" : "cores", "memory", "", "evictable"], rows) : h("p", { class: "muted" }, "nothing placed"));
}

function storeCard(node, st) {
  const used = h("div", { class: "memmap" });
  const fill = h("div", { class: "seg weights" }, `${mib(st.bytes / 2 ** 20)}`);
  fill.style.width = `${Math.max((100 * st.bytes) / Math.max(st.budget_bytes, 1), 0.4)}%`;
  fill.style.background = KIND_COLORS.weights;
  used.append(fill);
  const templates = Object.entries(st.templates || {}).map(([k, t]) =>
    h("tr", {}, h("td", {}, k), h("td", { class: "num" }, String(t.pid)), h("td", { class: "num" }, mib(t.weights_bytes / 2 ** 20))));
  const zygotes = Object.entries(st.zygotes || {}).map(([rt, z]) => h("li", {}, `${rt} (pid ${z.pid})`));
  return card(`${node} · weight store`,
    h("p", {}, `${mib(st.bytes / 2 ** 20)} of ${mib(st.budget_bytes / 2 ** 20)} budget · ${st.entries} segments · hits ${st.hits}, misses ${st.misses}, evictions ${st.evictions}`),
    used,
    h("p", {}, h("b", {}, "weight segments: "), (st.models || []).join(", ") || "none"),
    h("p", {}, h("b", {}, "zygotes: "), zygotes.length ? h("ul", { class: "inline" }, zygotes) : "none running"),
    templates.length ? table(["template (with its spare)", "pid", "weights"], templates) : h("p", { class: "muted" }, "no template"));
}

export const nodesPage = {
  mount(main) {
    this.body = h("div", {}, h("p", { class: "muted" }, "Loading devices…"));
    replace(main, this.body);
  },
  async update() {
    const devices = (await api("/v1/devices")).devices;
    const stores = history.last?.stores || {};
    replace(this.body,
      h("div", { class: "grid" }, Object.entries(stores).map(([n, st]) => storeCard(n, st))),
      devices.map(deviceCard));
  },
};

// --- workflow runs --------------------------------------------------------------------

function needsTokenNote() {
  return h("p", { class: "note" }, "Run logs need the admin token (they hold outputs, session names and tracebacks): enter it above.");
}

export const runsPage = {
  mount(main) {
    const q = new URLSearchParams(location.hash.split("?")[1] || "");
    this.status = h("select", { name: "status" },
      ["", "running", "completed", "failed", "parked"].map((v) => h("option", { value: v, selected: q.get("status") === v }, v || "any status")));
    this.workflow = h("select", { name: "workflow" }, h("option", { value: "" }, "any workflow"));
    this.wanted = q.get("workflow") || "";
    this.limit = h("input", { type: "number", min: 1, max: 1000, value: q.get("limit") || 50, name: "limit" });
    const filters = h("div", { class: "filters" },
      h("label", {}, "status ", this.status), h("label", {}, "workflow ", this.workflow), h("label", {}, "latest ", this.limit));
    for (const el of [this.status, this.workflow, this.limit]) el.addEventListener("change", () => this.update());
    this.body = h("div", { class: "scroll" });
    replace(main, card("Workflow runs", filters, this.body));
  },
  async update() {
    const { workflows } = await api("/v1/workflows");
    const have = [...this.workflow.options].map((o) => o.value);
    for (const w of workflows) {
      if (!have.includes(w.name)) this.workflow.append(h("option", { value: w.name, selected: w.name === this.wanted }, w.name));
    }
    if (session.needsToken && !session.token) return replace(this.body, needsTokenNote());
    const params = new URLSearchParams({ limit: this.limit.value || 50 });
    if (this.status.value) params.set("status", this.status.value);
    if (this.workflow.value) params.set("workflow", this.workflow.value);
    let runs;
    try {
      ({ runs } = await api(`/v1/runs?${params}`));
    } catch (e) {
      if (e.status === 401) return replace(this.body, needsTokenNote());
      throw e;
    }
    const rows = runs.map((r) => h("tr", { class: "link", "data-run": r.run_id, onclick: () => { location.hash = `#run/${r.run_id}`; } },
      h("td", {}, h("a", { href: `#run/${r.run_id}` }, r.run_id.slice(0, 12))), h("td", {}, r.workflow), h("td", {}, r.session || "–"),
      h("td", {}, badge(r.status)), h("td", {}, when(r.created)), h("td", { class: "num" }, fmt((r.updated - r.created) * 1000))));
    replace(this.body, rows.length
      ? table(["run", "workflow", "session", "status", "started", "ms"], rows, { id: "runs-table" })
      : h("p", { class: "muted" }, "No run matches. Start one: smss runs start WORKFLOW --random"));
  },
};

// Gantt bars from a run's events: one row per stage attempt, from StageStarted to its
// StageCompleted / StageFailed (still running: to the last event), the wait after
// StageScheduled drawn before it.
export function stageBars(events) {
  const t0 = events.length ? events[0].ts : 0;
  const ms = (ts) => (ts - t0) * 1000;
  const end = ms(Math.max(...events.map((e) => e.ts), t0));
  const byKey = new Map();
  const attempts = {};
  for (const e of events) {
    if (!e.type.startsWith("Stage")) continue;
    const key = `${e.stage}#${e.attempt}`;
    const bar = byKey.get(key) || { stage: e.stage, attempt: e.attempt, kind: "running" };
    byKey.set(key, bar);
    attempts[e.stage] = Math.max(attempts[e.stage] || 0, e.attempt || 1);
    if (e.type === "StageScheduled") bar.queuedFrom = ms(e.ts);
    else if (e.type === "StageStarted") bar.start = ms(e.ts);
    else if (e.type === "StageCompleted") { bar.end = ms(e.ts); bar.kind = "completed"; bar.note = e.instance; }
    else if (e.type === "StageFailed") { bar.end = ms(e.ts); bar.kind = "failed"; bar.note = e.error_type || e.error || ""; }
  }
  const bars = [];
  for (const b of byKey.values()) {
    if (b.start === undefined) b.start = b.queuedFrom ?? 0;
    if (b.end === undefined) b.end = end;
    if (b.kind === "failed" && b.attempt < attempts[b.stage]) b.kind = "retried";
    b.label = attempts[b.stage] > 1 ? `${b.stage} (attempt ${b.attempt})` : b.stage;
    bars.push(b);
  }
  return { bars, span: Math.max(end, ...bars.map((b) => b.end)) };
}

export const runPage = {
  mount(main, runId) {
    this.runId = runId;
    this.message = h("p", { class: "message", id: "action-message" });
    this.stage = h("select", { id: "replay-stage" });
    this.resume = h("button", { id: "resume", onclick: () => this.act("resume") }, "Resume");
    this.replay = h("button", { id: "replay", onclick: () => this.act("replay") }, "Replay from");
    this.actions = h("div", { class: "actions" }, this.resume, this.replay, this.stage, this.message);
    this.body = h("div", {});
    replace(main, h("p", {}, h("a", { href: "#runs" }, "← all runs")), card(`Run ${runId}`, this.actions, this.body));
  },
  async act(kind) {
    this.message.textContent = `${kind}…`;
    try {
      const result = kind === "resume"
        ? await api(`/v1/runs/${this.runId}/resume`, { method: "POST" })
        : await api(`/v1/runs/${this.runId}/replay`, { method: "POST", body: { from: this.stage.value, wait: false } });
      this.message.textContent = `${kind}: run ${result.run_id} ${result.status}`;
      if (result.run_id !== this.runId) location.hash = `#run/${result.run_id}`;
      else await this.update();
    } catch (e) {
      this.message.textContent = `${kind} failed: ${e.message}`;
    }
  },
  // Read-only without the token (where the server needs one); a completed run has
  // nothing to resume.
  buttons(status) {
    const may = session.admin;
    for (const b of [this.resume, this.replay, this.stage]) {
      b.disabled = !may;
      b.title = may ? "" : "needs the admin token";
    }
    if (status === "completed") this.resume.disabled = true;
  },
  async update() {
    this.buttons(null);
    if (session.needsToken && !session.token) return replace(this.body, needsTokenNote());
    let run;
    try {
      run = await api(`/v1/runs/${this.runId}`);
    } catch (e) {
      if (e.status === 401) return replace(this.body, needsTokenNote());
      throw e;
    }
    const stages = [...new Set(run.events.filter((e) => e.type.startsWith("Stage")).map((e) => e.stage))];
    if (this.stage.options.length !== stages.length) replace(this.stage, stages.map((n) => h("option", { value: n }, n)));
    this.buttons(run.status);
    const { bars, span } = stageBars(run.events);
    const failures = run.events.filter((e) => e.type === "StageFailed" || e.type === "RunFailed");
    const failedBox = failures.length
      ? h("div", { class: "failure" }, h("h3", {}, "Where and why it failed"), failures.map((e) =>
        h("div", {}, h("p", {}, h("b", {}, e.type === "RunFailed" ? `the run failed${e.stage ? ` at stage ${e.stage}` : ""}` : `${e.stage}, attempt ${e.attempt}`), ": ",
          [e.error_type, e.message ?? e.error].filter(Boolean).join(": "),
          e.instance ? ` (instance ${e.instance}${e.node ? ` on ${e.node}` : ""})` : ""),
        e.traceback ? h("pre", {}, e.traceback) : null)))
      : null;
    const t0 = run.events.length ? run.events[0].ts : 0;
    const events = run.events.map((e) => h("tr", {},
      h("td", { class: "num" }, String(e.seq)), h("td", {}, e.type), h("td", {}, e.stage || ""), h("td", { class: "num" }, e.attempt ?? ""),
      h("td", { class: "num" }, fmt((e.ts - t0) * 1000)), h("td", {}, e.instance || "")));
    replace(this.body,
      h("p", {}, badge(run.status), ` workflow ${run.workflow} · session ${run.session || "–"}`, run.error ? h("span", { class: "error" }, ` · ${run.error}`) : null),
      h("div", { id: "gantt" }, gantt({ bars, span })),
      legend(Object.entries(GANTT_COLORS).map(([name, color]) => ({ name, color }))),
      failedBox,
      h("details", {}, h("summary", {}, `${run.events.length} events in the log`),
        table(["seq", "event", "stage", "attempt", "ms", "instance"], events)));
  },
};

// --- cost -------------------------------------------------------------------------------

export const costPage = {
  mount(main) {
    this.body = h("div", {});
    replace(main, this.body);
  },
  update() {
    const s = history.last;
    if (!s) return;
    const rep = s.cost;
    const names = Object.keys(rep.functions);
    const colors = colorOf(names);
    const series = names.map((n) => ({ name: n, color: colors[n], points: history.points((x) => x.cost.functions[n]?.cost_usd ?? null) }));
    const total = [
      { name: "SMSS, all functions", color: "#111827", points: history.points((x) => x.cost.total.cost_usd) },
      { name: "always-on containers", color: "#dc2626", dash: true, points: history.points((x) => x.cost.total.container_cost_usd) },
    ];
    const rows = [...names.map((n) => [n, rep.functions[n]]), ["TOTAL", rep.total]].map(([n, f]) => h("tr", {},
      h("td", {}, h("b", {}, n)), h("td", { class: "num" }, String(f.invocations)), h("td", { class: "num" }, fmt(f.alive_s)),
      h("td", { class: "num" }, fmt(f.busy_s)), h("td", { class: "num" }, fmt(f.memory_gb_s)), h("td", { class: "num" }, f.cost_usd.toFixed(6)),
      h("td", { class: "num" }, String(f.containers)), h("td", { class: "num" }, f.container_cost_usd.toFixed(6)),
      h("td", { class: "num" }, f.cost_ratio === null ? "–" : f.cost_ratio.toFixed(3))));
    replace(this.body,
      h("div", { class: "grid" },
        card("Cost over time, by function", lineChart({ series, yLabel: "US$, cumulative" }), legend(series)),
        card("All functions against always-on containers", lineChart({ series: total, yLabel: "US$, cumulative" }), legend(total))),
      card(`Cost report (period ${fmt(rep.period_s)} s)`, h("div", { class: "scroll" },
        table(["function", "invocations", "alive s", "busy s", "GB-s", "cost $", "containers", "container $", "ratio"], rows, { id: "cost-table" }))));
  },
};
