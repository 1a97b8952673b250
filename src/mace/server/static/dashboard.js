// The live dashboard: polls GET /v1/stats a few times a second and draws the last two minutes.
import { TimeChart } from "./charts.js";
import { bindApiKeyField, errorMessage, keyAdvice, requestJSON } from "./common.js";

const POLL_MS = 250;
const CHART_WINDOW_S = 120;
// What the percentiles and rates cover, server side: long enough to hold a few requests' first
// tokens on a slow CPU, short enough to follow a change of load.
const STATS_WINDOW_S = 30;

const $ = (id) => document.getElementById(id);
const ms = (v) => {
  if (v === null || v === undefined) return "—";
  return v >= 1 ? `${v.toFixed(v < 10 ? 2 : 1)} s` : `${(v * 1000).toFixed(v < 0.1 ? 1 : 0)} ms`;
};
const percent = (v) => (v === null || v === undefined ? "—" : `${(v * 100).toFixed(v < 0.1 ? 1 : 0)}%`);
const plain = (digits) => (v) => (v === null || v === undefined ? "—" : v.toFixed(digits));
const mib = (v) => (v === null || v === undefined ? "—" : `${(v / 2 ** 20).toFixed(v < 10 * 2 ** 20 ? 1 : 0)} MiB`);
const ago = (s) => {
  if (s === null || s === undefined) return "—";
  return s < 120 ? `${s.toFixed(0)} s` : `${(s / 60).toFixed(0)} min`;
};

const P = [
  { key: "p50", label: "p50", color: "#2f6fdf" },
  { key: "p90", label: "p90", color: "#e08a1e" },
  { key: "p99", label: "p99", color: "#c23b3b" },
];
const charts = {
  ttft: new TimeChart($("chart-ttft"), { series: P, format: ms }),
  tpot: new TimeChart($("chart-tpot"), { series: P, format: ms }),
  throughput: new TimeChart($("chart-throughput"), {
    series: [{ key: "tokens", label: "tokens/s", color: "#2f6fdf" }], format: plain(0),
  }),
  requests: new TimeChart($("chart-requests"), {
    series: [
      { key: "running", label: "running", color: "#2f6fdf" },
      { key: "waiting", label: "waiting", color: "#e08a1e" },
    ],
    format: plain(0),
    integer: true,
  }),
  kv: new TimeChart($("chart-kv"), { series: [{ key: "usage", label: "in use", color: "#22863a" }], format: percent }),
  train: new TimeChart($("chart-train"), {
    series: [{ key: "share", label: "time training", color: "#7a3fb0" }], format: percent, yMax: 1,
  }),
  loss: new TimeChart($("chart-loss"), {
    series: [
      { key: "learner", label: "learner", color: "#7a3fb0" },
      { key: "serving", label: "serving", color: "#2f6fdf" },
    ],
    format: plain(2),
  }),
  drift: new TimeChart($("chart-drift"), {
    series: [{ key: "drift", label: "drift", color: "#c23b3b" }], format: plain(2),
  }),
  adapters: new TimeChart($("chart-adapters"), {
    series: [{ key: "active", label: "active version", color: "#22863a" }],
    format: plain(0),
    stepped: true,
    integer: true,
  }),
};

let events = []; // [{t, label}]: publishes from the adapter store, then activations seen here
const activations = [];
let lastActive = null;
let lastNewest = null;

function show(id, text) {
  $(id).value = text;
}

function render(stats) {
  const t = stats.time;
  const { latency, requests, kv, train, adapters } = stats;
  $("model").textContent = stats.model;
  for (const name of ["ttft", "tpot"]) {
    const values = latency[`${name}_s`];
    for (const p of P) show(`${name}-${p.key}`, ms(values[p.key]));
    charts[name].push(t, values);
  }
  show("tokens-per-s", plain(1)(stats.generation_tokens_per_s));
  charts.throughput.push(t, { tokens: stats.generation_tokens_per_s });
  show("running", requests ? String(requests.running) : "—");
  show("waiting", requests ? String(requests.waiting) : "—");
  show("preemptions", requests ? String(requests.preemptions) : "—");
  charts.requests.push(t, requests ?? {});
  show("kv-used", mib(kv?.used_bytes));
  show("kv-usage", percent(kv?.usage));
  charts.kv.push(t, { usage: kv?.usage });
  renderTraining(t, train);
  renderTenants(train?.tenants);
  renderAdapters(t, adapters, train);
  for (const chart of Object.values(charts)) chart.draw(t, CHART_WINDOW_S, events);
}

function renderTraining(t, train) {
  show("train-share", percent(train?.time_share));
  show("train-steps", train ? String(train.optimizer_steps) : "—");
  show("train-pending", train ? String(train.pending_samples) : "—");
  show("train-policy", train ? train.policy : "none");
  document.getElementById("training-off").hidden = Boolean(train);
  document.getElementById("training-resting").hidden = !train?.resting;
  document.getElementById("gate-on-training").hidden = train?.gate_slice !== "training_samples";
  const scope = train?.scope;
  document.getElementById("train-scope").hidden = !scope || scope.in + scope.outside === 0;
  show("scope-outside", scope ? String(scope.outside) : "—");
  show("scope-total", scope ? String(scope.in + scope.outside) : "—");
  show("loss-learner", plain(3)(train?.learner_heldout_loss));
  show("loss-serving", plain(3)(train?.serving_heldout_loss));
  show("drift", plain(2)(train?.drift));
  show("since-publish", ago(train?.seconds_since_publish));
  charts.train.push(t, { share: train?.time_share });
  charts.loss.push(t, { learner: train?.learner_heldout_loss, serving: train?.serving_heldout_loss });
  charts.drift.push(t, { drift: train?.drift });
}

function renderTenants(tenants) {
  show("tenants", tenants ? String(tenants.count) : "—");
  show("tenants-resident", tenants ? String(tenants.resident) : "—");
  $("tenants-top").replaceChildren(...(tenants?.top ?? []).map((tenant) => {
    const item = document.createElement("li");
    const state = [tenant.resident ? "in memory" : "on disk", tenant.resting ? "resting" : null,
      tenant.owned === false ? "trained by another server" : null].filter(Boolean);
    // textContent: a tenant's name is the client's text, never markup
    item.textContent = `${tenant.tenant || "(shared)"} · v${tenant.active_version} · ${ms(tenant.train_seconds_total)}`
      + ` training · ${tenant.optimizer_steps} steps · ${state.join(", ")}`;
    return item;
  }));
}

function renderAdapters(t, adapters, train) {
  if (!adapters) return;
  $("adapter").textContent = `v${adapters.active}`;
  show("adapter-active", `v${adapters.active}`);
  show("adapter-count", String(adapters.versions.length));
  show("auto-publish", train ? (adapters.auto_publish ? "on" : "held") : "off");
  const newest = adapters.versions.at(-1)?.version ?? 0;
  // A change to anything but a version published just now is an operator's rollback or roll-forward.
  const isPublish = newest !== lastNewest && adapters.active === newest;
  if (lastActive !== null && adapters.active !== lastActive && !isPublish) {
    activations.push({ t, label: `→v${adapters.active}` });
  }
  lastActive = adapters.active;
  lastNewest = newest;
  events = [...adapters.versions.map((v) => ({ t: v.created_at, label: `v${v.version}` })), ...activations];
  charts.adapters.push(t, { active: adapters.active });
  renderEventList(adapters.versions);
}

function renderEventList(versions) {
  const list = $("events");
  if (list.childElementCount === versions.length) return;
  list.replaceChildren(...versions.slice().reverse().map((v) => {
    const item = document.createElement("li");
    const when = new Date(v.created_at * 1000).toLocaleTimeString();
    const losses = v.learner_loss === null ? ""
      : ` · held-out loss ${v.serving_loss?.toFixed(3) ?? "?"} → ${v.learner_loss.toFixed(3)}`;
    item.textContent = `${when} · v${v.version} published (${v.reason})${losses}`;
    return item;
  }));
}

function setConnection(state, problem = null) {
  $("connection").dataset.state = state;
  $("connection").textContent = state === "open" ? "live" : "no data";
  $("banner").hidden = problem === null;
  $("banner").textContent = problem ?? "";
}

// Behind `mace serve --replicas N` (responses name their replica) the front end lists the replicas.
async function pollReplicas() {
  try {
    const result = await requestJSON("/cluster/replicas");
    $("replicas-card").hidden = !result.ok;
    if (result.ok) {
      $("replicas").replaceChildren(...result.body.data.map((replica) => {
        const item = document.createElement("li");
        const kv = replica.kv_usage == null ? "—" : `${Math.round(replica.kv_usage * 100)}%`;
        item.textContent = `${replica.replica} · ${replica.ready ? "ready" : "not ready"} · `
          + `${replica.running ?? "—"} running, ${replica.waiting ?? "—"} waiting · KV ${kv}`;
        return item;
      }));
    }
  } catch (error) {
    $("replicas-card").hidden = true;
  }
}

async function poll() {
  try {
    const result = await requestJSON(`/v1/stats?window_s=${STATS_WINDOW_S}`);
    // The replica that answered is named only behind a cluster's front end, which lists them all.
    if (result.headers.get("X-Mace-Replica")) pollReplicas();
    if (!result.ok) {
      setConnection("closed", keyAdvice(result) ?? errorMessage(result));
    } else {
      const notReady = `The engine is not ready: ${result.body.load_error ?? "the model is loading"}`;
      setConnection("open", result.body.ready ? null : notReady);
      render(result.body);
    }
  } catch (error) {
    setConnection("closed", `The server cannot be reached (${error}).`);
  }
  setTimeout(poll, POLL_MS); // after the answer, so a slow server is never asked twice at once
}

bindApiKeyField($("api-key"));
poll();
