// What the dashboard knows: the REST routes it reads (the same the CLI reads), the
// admin token the user typed, and a history of samples taken while the page is open.

const TOKEN_KEY = "smss-admin-token";
const HISTORY_SAMPLES = 450; // 15 minutes at one sample every 2 s

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export const session = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  // Whether the admin routes need a token (the server says so in the page).
  needsToken: document.querySelector('meta[name="smss-token-required"]')?.content === "true",
  refused: false,
  setToken(token) {
    this.token = token;
    this.refused = false;
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  },
  // Whether the admin routes can be used now: the server has no token, or we hold one.
  get admin() {
    return this.token !== "" || this.needsToken === false;
  },
};

export async function api(path, { method = "GET", body, text = false } = {}) {
  const headers = {};
  if (session.token) headers.Authorization = `Bearer ${session.token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
  } catch (e) {
    throw new ApiError(0, `cannot reach the platform (${e.message})`);
  }
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try {
      message = (await response.json()).error || message;
    } catch (_) {
      /* not a JSON error body */
    }
    if (response.status === 403 && session.token) {
      // A wrong token: forgotten at once, so that polling does not count failure after
      // failure against this address (past 10 a minute the server answers 429).
      session.setToken("");
      session.refused = true;
    }
    throw new ApiError(response.status, message);
  }
  return text ? response.text() : response.json();
}

// --- Prometheus text ------------------------------------------------------------------

const SAMPLE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

export function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = SAMPLE.exec(line);
    if (!m) continue;
    const labels = {};
    for (const l of (m[3] || "").matchAll(LABEL)) labels[l[1]] = l[2];
    out.push({ name: m[1], labels, value: Number(m[4]) });
  }
  return out;
}

// Per function: requests answered (all statuses), the latency histogram's cumulative
// buckets, and instance starts by tier of readiness.
function countersOf(metrics) {
  const fns = {};
  const fn = (name) =>
    (fns[name] ??= { requests: 0, buckets: new Map(), startsByTier: {} });
  for (const s of metrics) {
    const f = s.labels.function;
    if (f === undefined) continue;
    if (s.name === "smss_requests_total") fn(f).requests += s.value;
    else if (s.name === "smss_request_seconds_bucket")
      fn(f).buckets.set(Number(s.labels.le === "+Inf" ? Infinity : s.labels.le), s.value);
    else if (s.name === "smss_start_seconds_count")
      fn(f).startsByTier[s.labels.tier] = (fn(f).startsByTier[s.labels.tier] || 0) + s.value;
  }
  return fns;
}

// A quantile of the requests between two samples of a cumulative histogram, by linear
// interpolation inside the bucket it falls in (as PromQL's histogram_quantile).
export function quantile(q, before, after) {
  const les = [...after.keys()].sort((a, b) => a - b);
  const counts = les.map((le) => after.get(le) - (before?.get(le) || 0));
  const total = counts[counts.length - 1];
  if (!(total > 0)) return null;
  const rank = q * total;
  let prevLe = 0;
  let prevCount = 0;
  for (let i = 0; i < les.length; i++) {
    if (counts[i] >= rank) {
      if (les[i] === Infinity) return prevLe;
      const inBucket = counts[i] - prevCount;
      return prevLe + (les[i] - prevLe) * (inBucket > 0 ? (rank - prevCount) / inBucket : 0);
    }
    prevLe = les[i];
    prevCount = counts[i];
  }
  return prevLe;
}

// --- tiers ------------------------------------------------------------------------------

// The tier of readiness of a function: the one the platform reports (`tier` in
// GET /v1/functions) where it does; else derived from what is resident: warm with an
// instance running, standby with a template in a node's store (its spare beside it),
// resident with its weights in a store, cold otherwise.
export function tierOf(fn, stores) {
  if (typeof fn.tier === "string" && fn.tier) return fn.tier;
  if (fn.instances.length > 0) return "warm";
  const key = `${fn.name}@g${fn.generation}`;
  const nodes = Object.values(stores || {});
  if (nodes.some((s) => s.templates && key in s.templates)) return "standby";
  if (nodes.some((s) => (s.models || []).includes(key))) return "resident";
  return "cold";
}

// --- history --------------------------------------------------------------------------

export const history = {
  samples: [],
  push(sample) {
    this.samples.push(sample);
    if (this.samples.length > HISTORY_SAMPLES) this.samples.shift();
  },
  get last() {
    return this.samples[this.samples.length - 1];
  },
  // [t, value] points of f(sample, previous) for each sample (null values leave gaps).
  points(f) {
    const out = [];
    for (let i = 0; i < this.samples.length; i++) {
      const v = f(this.samples[i], this.samples[i - 1]);
      out.push([this.samples[i].t, v]);
    }
    return out;
  },
};

export function rate(name, s, prev) {
  if (!prev) return null;
  const a = prev.counters[name];
  const b = s.counters[name];
  if (!b) return null;
  const dt = (s.t - prev.t) / 1000;
  return dt > 0 ? Math.max(b.requests - (a?.requests || 0), 0) / dt : null;
}

export function latencyMs(name, q, s, prev) {
  if (!prev) return null;
  const b = s.counters[name];
  if (!b) return null;
  const v = quantile(q, prev.counters[name]?.buckets, b.buckets);
  return v === null ? null : v * 1000;
}

// One sample: what every page's time series are drawn from.
export async function takeSample() {
  const [functions, metricsText, stores, cost] = await Promise.all([
    api("/v1/functions"),
    api("/metrics", { text: true }),
    api("/v1/weights"),
    api("/v1/cost"),
  ]);
  const sample = {
    t: Date.now(),
    functions: functions.functions,
    stores,
    cost,
    counters: countersOf(parseMetrics(metricsText)),
  };
  history.push(sample);
  return sample;
}
