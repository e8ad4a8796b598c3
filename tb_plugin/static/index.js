// moe-trace for TensorBoard: the "MoE" dashboard.
//
// An ES module. TensorBoard loads it in an iframe whose <base href> is /data/plugin/moe_trace/ and
// calls render(). Every asset (this file, style.css, plotly.min.js) comes from the plugin's own
// routes: nothing is fetched from the network.
//
// Test/benchmark hooks: when every chart of the current selection is drawn, <body> gets
// data-painted="1" and data-paint-ms (ms since navigation start), and document.title ends in
// "painted"; each chart <div> carries data-rows / data-cols / data-traces. The iframe URL may carry
// ?run=NAME&compare=NAME&phase=all|prefill|decode|verify&mode=tokens|share&ep=N.

const PHASES = ["prefill", "decode", "verify"];
const PARTS = ["router", "experts", "shared"];
const PART_COLORS = { router: "#5c6bc0", experts: "#f57c00", shared: "#26a69a" };
const PHASE_COLORS = { prefill: "#1e88e5", decode: "#e53935", verify: "#43a047", all: "#616161" };
const RUN_COLORS = ["#1e88e5", "#f57c00"];
const PLOT_CONFIG = { displaylogo: false, responsive: true, showLink: false, showSendToCloud: false,
  modeBarButtonsToRemove: ["lasso2d", "select2d"] };
const FONT = { family: 'Roboto, "Helvetica Neue", Arial, sans-serif', size: 12, color: "#212121" };

const state = { runs: [], run: null, compare: "", phase: "all", mode: "tokens", ep: 0, reports: new Map(), seq: 0 };
let els = null;

// -- entry ------------------------------------------------------------------------------------
export async function render() {
  const params = new URLSearchParams(window.location.search);
  state.phase = pick(params.get("phase"), ["all", ...PHASES], "all");
  state.mode = pick(params.get("mode"), ["tokens", "share"], "tokens");
  state.compare = params.get("compare") || "";
  state.ep = Number(params.get("ep")) || 0;
  addStyle();
  buildShell();
  import("./timeline_link.js").then((m) => m.addTimelineLink()).catch(() => {});  // the "Timeline" view
  const plotly = loadPlotly();
  try {
    await loadRuns(params.get("run") || safeStorage("get", "moe_trace.run"));
    await Promise.all([plotly, refresh()]);
  } catch (err) {
    showError(String(err && err.message || err));
    markPainted("error");
  }
}

function pick(v, allowed, dflt) { return allowed.includes(v) ? v : dflt; }

function safeStorage(op, key, value) {
  try {
    if (op === "get") return window.localStorage.getItem(key);
    window.localStorage.setItem(key, value);
  } catch (_) { /* storage may be disabled */ }
  return null;
}

function addStyle() {
  if (document.querySelector("link[data-moe]")) return;
  const link = document.createElement("link");
  link.rel = "stylesheet"; link.href = "style.css"; link.dataset.moe = "1";
  document.head.appendChild(link);
  const meta = document.createElement("meta");
  meta.name = "viewport"; meta.content = "width=device-width, initial-scale=1";
  document.head.appendChild(meta);
}

let plotlyPromise = null;
function loadPlotly() {
  if (window.Plotly) return Promise.resolve(window.Plotly);
  if (!plotlyPromise) {
    plotlyPromise = new Promise((resolve, reject) => {
      const s = document.createElement("script");
      s.src = "plotly.min.js";
      s.onload = () => (performance.mark("moe:plotly"), window.Plotly ? resolve(window.Plotly) : reject(new Error("plotly.min.js did not define Plotly")));
      s.onerror = () => reject(new Error("could not load plotly.min.js from the plugin (is the plotly package installed?)"));
      document.head.appendChild(s);
    });
  }
  return plotlyPromise;
}

// -- DOM ----------------------------------------------------------------------------------------
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function seg(name, options, current, onPick) {
  return h("span", { class: "seg", id: `moe-${name}`, role: "group" },
    options.map(([value, label]) => h("button", {
      type: "button", "data-value": value, class: value === current ? "on" : "",
      onclick: (ev) => {
        for (const b of ev.target.parentNode.children) b.classList.toggle("on", b === ev.target);
        onPick(value);
      } }, label)));
}

function card(id, title, ...body) {
  return h("section", { class: "card", id: `moe-${id}` }, h("h2", {}, title, h("small", { class: "sub" })), ...body);
}

function chart(id) { return h("div", { class: "chart", id: `chart-${id}` }); }

function buildShell() {
  document.body.innerHTML = "";
  document.body.setAttribute("data-painted", "0");
  const runSel = h("select", { id: "moe-run", onchange: (e) => { state.run = e.target.value; safeStorage("set", "moe_trace.run", state.run); refresh(); } });
  const cmpSel = h("select", { id: "moe-compare", onchange: (e) => { state.compare = e.target.value; refresh(); } });
  const bar = h("header", { class: "moe-bar" },
    h("h1", {}, h("span", {}, "MoE"), " trace"),
    h("label", {}, "Run", runSel),
    h("label", {}, "Compare with", cmpSel),
    h("label", {}, "Phase", seg("phase", [["all", "All"], ...PHASES.map((p) => [p, p[0].toUpperCase() + p.slice(1)])], state.phase,
      (v) => { state.phase = v; draw(); })),
    h("label", {}, "Heatmap", seg("mode", [["tokens", "Tokens"], ["share", "Share %"]], state.mode,
      (v) => { state.mode = v; draw(); })),
    h("button", { type: "button", id: "moe-reload", title: "Re-read runs and traces",
      onclick: async () => { state.reports.clear(); await loadRuns(state.run); await refresh(); } }, "Reload"),
    h("span", { id: "moe-status" }));
  const app = h("div", { id: "moe-app" },
    bar,
    h("div", { id: "moe-error", class: "moe-error hidden", role: "alert" }),
    h("div", { id: "moe-main" },
      card("overview", "Run overview", h("div", { class: "kv", id: "moe-kv" }), h("div", { id: "moe-phase-table" })),
      card("settings", "Settings", h("div", { class: "kv", id: "moe-settings-kv" }), h("div", { id: "moe-downloads" })),
      card("heatmap", "Expert load", chart("heatmap")),
      card("k", "Experts per token (k)", chart("k")),
      card("balance", "Load balance per layer", chart("balance")),
      card("latency", "Latency per device", h("div", { class: "moe-note hidden", id: "moe-latency-note" }),
        chart("latency")),
      card("flops", "FLOPs per layer and phase", chart("flops")),
      card("steps", "Step timeline: tokens, MoE time and expert-load drift per forward", chart("steps"),
        h("div", { class: "moe-note hidden", id: "moe-steps-note" }), chart("step-time"), chart("drift")),
      card("roofline", "Roofline: weights read and FLOPs vs measured time", h("div", { id: "moe-roofline-table" }),
        chart("roofline")),
      card("ep", "Load per expert-parallel rank", h("div", { class: "moe-ep-bar", id: "moe-ep-controls" }),
        chart("ep")),
      card("sweep", "Sweep", h("div", { class: "moe-note hidden", id: "moe-sweep-warnings" }),
        h("div", { id: "moe-sweep-table" }), chart("sweep-latency"), chart("sweep-routing")),
      card("cmpdoc", "Comparison of routing configurations", h("div", { id: "moe-cmpdoc-table" }), chart("cmpdoc")),
      card("cmp", "Compare runs",
        h("div", { id: "moe-compare-error", class: "moe-error hidden" }),
        h("div", { id: "moe-compare-table" }),
        chart("cmp-heat"), chart("cmp-layers"), chart("cmp-latency"))));
  document.body.appendChild(app);
  els = { runSel, cmpSel };
}

function setStatus(text) { const s = document.getElementById("moe-status"); if (s) s.textContent = text; }

function showError(msg) {
  const e = document.getElementById("moe-error");
  if (!e) return;
  e.textContent = msg || "";
  e.classList.toggle("hidden", !msg);
  document.getElementById("moe-main").classList.toggle("hidden", !!msg);
}

// resolves once the next frame has been painted: rAF runs just before the paint, a task queued
// from it runs after
const nextFrame = () => new Promise((r) => requestAnimationFrame(() => setTimeout(r, 0)));

function markPainted(kind = "ok") {
  const ms = performance.now();
  document.body.setAttribute("data-paint-ms", ms.toFixed(1));
  document.body.setAttribute("data-state", kind);
  document.body.setAttribute("data-painted", "1");
  document.title = `MoE dashboard: ${kind === "ok" ? "painted" : kind + " painted"}`;
}

// -- data ---------------------------------------------------------------------------------------
async function getJson(url) {
  const resp = await fetch(url, { headers: { Accept: "application/json" }, cache: "no-store" });
  let body = null;
  try { body = await resp.json(); } catch (_) { body = { error: `HTTP ${resp.status}: response is not JSON` }; }
  if (!resp.ok && !(body && body.error)) body = { error: `HTTP ${resp.status}` };
  return body;
}

async function loadRuns(preferred) {
  const body = await getJson("runs");
  if (body.error) throw new Error(body.error);
  state.runs = body.runs || [];
  const names = state.runs.map((r) => r.name);
  // default: the newest run that did not fail to load (the one just profiled, usually)
  const newest = [...state.runs].sort((a, b) => (b.mtime || 0) - (a.mtime || 0));
  const fallback = (newest.find((r) => r.status !== "error") || newest[0] || {}).name || null;
  state.run = names.includes(preferred) ? preferred : (names.includes(state.run) ? state.run : fallback);
  if (state.compare && !names.includes(state.compare)) state.compare = "";
  const KIND_TAG = { report: "  [report]", sweep: "  [sweep]", compare: "  [compare]" };
  const label = (r) => r.name + (KIND_TAG[r.kind] || "") + (r.status === "error" ? "  (error)" : "");
  els.runSel.replaceChildren(...state.runs.map((r) => h("option", { value: r.name, selected: r.name === state.run }, label(r))));
  els.cmpSel.replaceChildren(h("option", { value: "" }, "(none)"),
    ...state.runs.map((r) => h("option", { value: r.name, selected: r.name === state.compare }, label(r))));
  if (!state.runs.length) {
    const plain = body.plain_runs || [];
    throw new Error(body.logdir_set === false
      ? "TensorBoard was started without --logdir."
      : "No moe-trace runs found under --logdir. Write one with moe_trace.profile(model, mode=\"kineto\", logdir=...)."
        + (plain.length ? `\n${plain.length} director${plain.length > 1 ? "ies hold" : "y holds"} plain torch.profiler traces `
          + `without moe-trace metadata: ${plain.slice(0, 5).join(", ")}${plain.length > 5 ? ", …" : ""}` : ""));
  }
}

function getReport(name) {
  if (!state.reports.has(name)) {
    state.reports.set(name, getJson(`report?run=${encodeURIComponent(name)}`).then((b) => {
      if (b.error) return { error: b.error };
      if (b.sweep && Array.isArray(b.sweep.summary)) return { sweep: b.sweep, source: b.source || null };
      if (b.compare && Array.isArray(b.compare.configs)) return { compare: b.compare, source: b.source || null };
      if (!b.report || !Array.isArray(b.report.layers)) return { error: "the server sent no report for this run" };
      return { report: b.report, timeline: b.step_timeline || null, source: b.source || null };
    }).catch((e) => ({ error: String(e) })));
  }
  return state.reports.get(name);
}

async function refresh() {
  if (!state.run) return;
  const seq = ++state.seq;
  document.body.setAttribute("data-painted", "0");
  setStatus("loading…");
  const wanted = [getReport(state.run)];
  if (state.compare && state.compare !== state.run) wanted.push(getReport(state.compare));
  await Promise.all(wanted);
  await loadPlotly();
  if (seq !== state.seq) return;  // a newer selection superseded this one
  await draw();
}

// -- helpers --------------------------------------------------------------------------------------
// plotly renders its texts as a subset of HTML: escape the names that come from the file system
const esc = (t) => String(t).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
const sum = (a) => a.reduce((x, y) => x + (y || 0), 0);
const pad3 = (i) => String(i).padStart(3, "0");
const layerX = (l) => l.index;
// numeric layer axes: plotly picks a few ticks instead of measuring one label per layer
let LAYER_AXIS = layerAxis(0);
function layerAxis(n) {  // integer ticks only, about 16 at most
  return { title: { text: "MoE layer" }, type: "linear", tickformat: "d", zeroline: false, tick0: 0,
    dtick: Math.max(1, Math.ceil(n / 16)) };
}
function blk(layer, phase) { return phase === "all" ? layer : (layer.phases && layer.phases[phase]) || {}; }
function fmt(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  const a = Math.abs(x);
  for (const [u, s] of [["T", 1e12], ["G", 1e9], ["M", 1e6], ["k", 1e3]]) if (a >= s) return `${(x / s).toFixed(digits)}${u}`;
  return Number.isInteger(x) ? String(x) : x.toFixed(digits);
}
// (not toLocaleString: its first call costs ~20 ms of ICU set-up)
const fmtInt = (x) => (x === null || x === undefined ? "–" : String(Math.round(x)).replace(/\B(?=(\d{3})+(?!\d))/g, ","));
const fmtMs = (x) => (x === null || x === undefined ? "–" : `${x.toFixed(3)} ms`);
function timeTotal(t) {
  if (!t) return null;
  const v = PARTS.map((p) => t[`${p}_ms`]).filter((x) => x !== null && x !== undefined);
  return v.length ? sum(v) : null;
}
function phaseLabel() { return state.phase === "all" ? "all phases" : state.phase; }

function baseLayout(extra = {}) {
  return Object.assign({
    font: FONT, margin: { l: 60, r: 20, t: 36, b: 44 }, height: 300, paper_bgcolor: "#fff", plot_bgcolor: "#fff",
    legend: { orientation: "h", y: -0.25 }, hoverlabel: { font: { family: FONT.family } },
  }, extra);
}

function plot(id, traces, layout, meta = {}) {
  // "allow": plotly otherwise measures every tick label's box to hide overflowing ones (a third of
  // the drawing time); our margins leave room for the labels anyway
  for (const k of Object.keys(layout)) {
    if (/^[xy]axis\d*$/.test(k) && layout[k].ticklabeloverflow === undefined) layout[k] = { ...layout[k], ticklabeloverflow: "allow" };
    // a fixed angle spares the label-collision measurements of tickangle "auto"
    if (/^xaxis\d*$/.test(k) && layout[k].tickangle === undefined) layout[k] = { ...layout[k], tickangle: 0 };
  }
  for (const k of ["xaxis", "yaxis"]) if (!layout[k]) layout[k] = { ticklabeloverflow: "allow" };
  const div = document.getElementById(`chart-${id}`);
  performance.mark(`moe:plot:${id}`);
  div.classList.remove("hidden");
  div.setAttribute("data-traces", String(traces.length));
  for (const [k, v] of Object.entries(meta)) div.setAttribute(`data-${k}`, String(v));
  return window.Plotly.react(div, traces, layout, PLOT_CONFIG);
}

function hideChart(id) {
  const div = document.getElementById(`chart-${id}`);
  if (window.Plotly && div.data) window.Plotly.purge(div);
  div.classList.add("hidden");
  div.setAttribute("data-traces", "0");
}

// -- drawing --------------------------------------------------------------------------------------
async function draw() {
  const seq = ++state.seq;
  const a = await getReport(state.run);
  const cmp = state.compare && state.compare !== state.run ? state.compare : "";
  const b = cmp ? await getReport(cmp) : null;
  if (seq !== state.seq) return;
  document.body.setAttribute("data-painted", "0");
  try {
    if (a.error) {
      showError(`Run "${state.run}" could not be loaded:\n${a.error}`);
      setStatus("");
      markPainted("error");
      return;
    }
    showError("");
    timelineFor(!a.sweep && !a.compare && !a.source);
    if (a.sweep || a.compare) {  // a sweep result or a comparison: its own card, no report panels
      showCards(a.sweep ? "sweep" : "cmpdoc");
      await Promise.all(a.sweep ? drawSweepDoc(a.sweep, a.source) : drawCompareDoc(a.compare, a.source));
      await nextFrame();
      if (seq !== state.seq) return;
      setStatus(a.sweep ? `sweep of ${(a.sweep.experiment || {}).knob}` : `${a.compare.configs.length} configurations`);
      markPainted("ok");
      return;
    }
    showCards(null);
    const rep = a.report;
    performance.mark("moe:draw-start");
    LAYER_AXIS = layerAxis(Math.max((rep.layers || []).length, b && b.report ? (b.report.layers || []).length : 0));
    const jobs = [];
    drawOverview(rep);
    drawSettings(rep, a.timeline, a.source);
    await drawHeatmap("heatmap", rep, state.phase, state.mode);
    // let the browser paint the first screen (overview + heatmap) before the charts below it
    await nextFrame();
    if (seq !== state.seq) return;
    if (!document.body.hasAttribute("data-first-paint-ms")) {
      document.body.setAttribute("data-first-paint-ms", performance.now().toFixed(1));
    }
    jobs.push(...drawK(rep), ...drawBalance(rep), ...drawLatency(rep), ...drawFlops(rep), ...drawExpertParallel(rep));
    jobs.push(...drawRoofline(rep));
    jobs.push(...drawSteps(rep, a.timeline));
    jobs.push(...drawCompare(rep, b, cmp));
    await Promise.all(jobs);
    performance.mark("moe:drawn");
    await nextFrame();
    if (seq !== state.seq) return;
    const m = rep.model || {};
    setStatus(`${m.num_moe_layers} MoE layers × ${m.num_experts} experts`);
    markPainted("ok");
  } catch (err) {
    console.error(err);
    showError(`Drawing run "${state.run}" failed: ${err && err.message || err}`);
    markPainted("error");
  }
}

function drawOverview(rep) {
  const m = rep.model || {};
  const ph = rep.phases || {};
  const tot = rep.totals || {};
  const timed = rep.timing_source !== null && rep.timing_source !== undefined;
  const items = [
    ["Model", m.name || m.family || "?"], ["Family", m.family || "?"],
    ["MoE layers", m.num_moe_layers], ["Experts / layer", m.num_experts], ["Top-k", m.top_k],
    ["Hidden / expert dim", `${m.hidden_size} / ${m.expert_dim}`],
    ["Shared expert dim", m.shared_expert_dim || "–"],
    ["Tokens (all phases)", fmtInt(tot.tokens)], ["FLOPs (all phases)", fmt(tot.flops && tot.flops.total)],
    ["FLOPs / token", fmt(tot.flops_per_token)], ["Devices", (rep.devices || []).length],
    ["Timing", timed ? rep.timing_source : "not timed"],
  ];
  const kv = document.getElementById("moe-kv");
  kv.replaceChildren(...items.map(([k, v]) => h("div", { "data-key": k }, h("span", {}, k), h("b", {}, String(v)))));
  const rows = PHASES.map((p) => {
    const x = ph[p] || {};
    const t = timeTotal(x.time_ms);
    return h("tr", { "data-phase": p }, h("td", {}, p), h("td", {}, fmtInt(x.forward_calls)), h("td", {}, fmtInt(x.tokens)),
      h("td", {}, fmt(x.flops && x.flops.total)), h("td", {}, fmt(x.flops_per_token)),
      h("td", {}, fmtMs(t)), h("td", {}, t !== null && x.tokens ? fmtMs(t / x.tokens) : "–"));
  });
  document.getElementById("moe-phase-table").replaceChildren(h("table", { class: "moe" },
    h("thead", {}, h("tr", {}, ["phase", "forwards", "tokens", "FLOPs", "FLOPs / token", "MoE time", "MoE time / token"]
      .map((c) => h("th", {}, c)))), h("tbody", {}, rows)));
  document.querySelector("#moe-overview h2 .sub").textContent =
    timed ? "MoE time = router + routed experts + shared experts ranges" : "";
}

function heatRows(rep, phase, mode) {
  const layers = rep.layers || [];
  const width = Math.max(0, ...layers.map((l) => (blk(l, phase).expert_counts || []).length));
  const z = layers.map((l) => {
    const c = blk(l, phase).expert_counts || [];
    const row = new Array(width).fill(null);
    const s = sum(c);
    for (let i = 0; i < c.length; i++) row[i] = mode === "share" ? (s ? (100 * c[i]) / s : 0) : c[i];
    return row;
  });
  return { z, width, y: layers.map(layerX), names: layers.map((l) => l.name) };
}

function drawHeatmap(id, rep, phase, mode) {
  const { z, width, y } = heatRows(rep, phase, mode);
  const unit = mode === "share" ? "% of the layer's assignments" : "assignments";
  const trace = {
    type: "heatmap", z, y, x: Array.from({ length: width }, (_, i) => i), colorscale: "Viridis",
    zmin: 0, hoverongaps: false, xgap: width <= 64 ? 1 : 0, ygap: y.length <= 64 ? 1 : 0,
    colorbar: { title: { text: mode === "share" ? "share %" : "tokens", side: "right" }, thickness: 12 },
    hovertemplate: `layer L%{y:03d}<br>expert %{x}<br>%{z:${mode === "share" ? ".2f" : ","}} ${unit}<extra></extra>`,
  };
  const height = Math.min(1400, Math.max(260, 90 + y.length * (y.length > 40 ? 13 : 20)));
  const layout = baseLayout({
    height, title: { text: `Routed assignments per expert (${phaseLabel()})`, font: { size: 13 } },
    xaxis: { title: { text: "expert" }, showgrid: false, zeroline: false },
    yaxis: { ...LAYER_AXIS, autorange: "reversed", showgrid: false },
    margin: { l: 70, r: 20, t: 36, b: 44 },
  });
  document.querySelector("#moe-heatmap h2 .sub").textContent =
    `${y.length} layers × ${width} experts, ${mode === "share" ? "share of each layer's assignments" : "assignments (token, expert)"}`;
  return plot(id, [trace], layout, { rows: y.length, cols: width, mode, phase });
}

function khistOf(rep, phase) {
  const out = new Map();
  for (const l of rep.layers || []) {
    const hist = blk(l, phase).k_hist || {};
    for (const [k, n] of Object.entries(hist)) out.set(Number(k), (out.get(Number(k)) || 0) + n);
  }
  return out;
}

// Two panels side by side in one figure (one Plotly plot costs ~25 ms even when tiny).
const LEFT = [0, 0.43];
const RIGHT = [0.57, 1];
function panelTitle(text, x) {
  return { text, x, xref: "paper", xanchor: "center", y: 1.0, yref: "paper", yanchor: "bottom", yshift: 8,
    showarrow: false, font: { size: 13 } };
}
function twoPanels(leftTitle, rightTitle, extra) {
  return baseLayout(Object.assign({
    height: 340, margin: { l: 60, r: 60, t: 40, b: 40 }, legend: { orientation: "h", y: -0.3, x: 0 },
    annotations: [panelTitle(leftTitle, (LEFT[0] + LEFT[1]) / 2), panelTitle(rightTitle, (RIGHT[0] + RIGHT[1]) / 2)],
  }, extra));
}

function drawK(rep) {
  const phases = state.phase === "all" ? PHASES : [state.phase];
  const hists = phases.map((p) => [p, khistOf(rep, p)]);
  const ks = [...new Set(hists.flatMap(([, m]) => [...m.keys()]))].sort((x, y) => x - y);
  const layers = rep.layers || [];
  const traces = hists.map(([p, m]) => ({
    type: "bar", name: p, legendgroup: p, x: ks.map(String), y: ks.map((k) => m.get(k) || 0), marker: { color: PHASE_COLORS[p] },
    hovertemplate: `${p}: k=%{x}: %{y:,} token-layer pairs<extra></extra>`,
  })).concat(phases.map((p) => ({
    type: "scatter", mode: "lines+markers", name: p, legendgroup: p, showlegend: false, xaxis: "x2", yaxis: "y2",
    x: layers.map(layerX), y: layers.map((l) => blk(l, p).k_mean), marker: { color: PHASE_COLORS[p], size: 4 },
    line: { color: PHASE_COLORS[p], width: 1.5 },
    error_y: { type: "data", symmetric: true, array: layers.map((l) => blk(l, p).k_std || 0), thickness: 1, width: 0 },
    hovertemplate: `${p} L%{x:03d}: k mean %{y:.3f}<extra></extra>`,
  })));
  return [plot("k", traces, twoPanels("k histogram (summed over layers)", "mean k per layer (± std)", {
    barmode: "group",
    xaxis: { domain: LEFT, title: { text: "experts used by a token (k)" }, type: "category" },
    yaxis: { title: { text: "tokens × layers" } },
    xaxis2: { ...LAYER_AXIS, domain: RIGHT, anchor: "y2" },
    yaxis2: { anchor: "x2", title: { text: "k" }, rangemode: "tozero" },
  }), { rows: layers.length, cols: ks.length })];
}

function drawBalance(rep) {
  const layers = rep.layers || [];
  const x = layers.map(layerX);
  const get = (k) => layers.map((l) => blk(l, state.phase)[k]);
  const line = (k, name, color, axis = "y") => ({ type: "scatter", mode: "lines+markers", name, x, y: get(k), yaxis: axis,
    marker: { size: 4, color }, line: { color, width: 1.5 }, hovertemplate: `L%{x:03d} ${name}: %{y:.3f}<extra></extra>` });
  const traces = [line("cv", "CV", "#1e88e5"), line("gini", "Gini", "#8e24aa"), line("entropy_norm", "entropy (norm.)", "#43a047"),
    line("max_over_mean", "max / mean (right axis)", "#f57c00", "y3"),
    { type: "bar", name: "dead experts", x, y: get("dead_experts"), xaxis: "x2", yaxis: "y2", marker: { color: "#e53935" },
      customdata: layers.map((l) => l.num_experts), hovertemplate: "L%{x:03d}: %{y} of %{customdata} experts got no token<extra></extra>" },
    { type: "bar", name: "active experts", x, y: get("active_experts"), xaxis: "x2", yaxis: "y2", marker: { color: "#c5e1a5" },
      hovertemplate: "L%{x:03d}: %{y} active<extra></extra>" }];
  document.querySelector("#moe-balance h2 .sub").textContent = phaseLabel();
  return [plot("balance", traces, twoPanels(`balance metrics (${phaseLabel()})`, `dead and active experts (${phaseLabel()})`, {
    barmode: "stack",
    xaxis: { ...LAYER_AXIS, domain: LEFT },
    yaxis: { title: { text: "CV, Gini, entropy" }, rangemode: "tozero" },
    yaxis3: { title: { text: "max / mean" }, overlaying: "y", side: "right", rangemode: "tozero", showgrid: false, anchor: "x" },
    xaxis2: { ...LAYER_AXIS, domain: RIGHT, anchor: "y2" },
    yaxis2: { anchor: "x2", title: { text: "experts" } },
  }), { rows: layers.length })];
}

function drawLatency(rep) {
  const note = document.getElementById("moe-latency-note");
  const timed = rep.timing_source !== null && rep.timing_source !== undefined;
  note.classList.toggle("hidden", timed);
  if (!timed) {
    note.textContent = "This run has no timings (it was profiled in stats mode, or the trace had no ranges).";
    hideChart("latency");
    document.querySelector("#moe-latency h2 .sub").textContent = "";
    return [];
  }
  document.querySelector("#moe-latency h2 .sub").textContent = `timing source: ${rep.timing_source}`;
  const devs = rep.devices || [];
  const xd = [devs.flatMap((d) => PHASES.map(() => d.device)), devs.flatMap(() => PHASES)];
  const layers = rep.layers || [];
  const tm = (l) => (state.phase === "all" ? l.time_ms : ((l.phases || {})[state.phase] || {}).time_ms) || {};
  const traces = PARTS.map((part) => ({
    type: "bar", name: part, legendgroup: part, x: xd, marker: { color: PART_COLORS[part] },
    y: devs.flatMap((d) => PHASES.map((p) => (d.phases && d.phases[p] ? d.phases[p][`${part}_ms`] : null))),
    hovertemplate: `%{x}: ${part} %{y:.3f} ms<extra></extra>`,
  })).concat(PARTS.map((part) => ({
    type: "bar", name: part, legendgroup: part, showlegend: false, xaxis: "x2", yaxis: "y2",
    x: layers.map(layerX), y: layers.map((l) => tm(l)[`${part}_ms`]),
    marker: { color: PART_COLORS[part] }, hovertemplate: `L%{x:03d} ${part}: %{y:.3f} ms<extra></extra>`,
  })));
  return [plot("latency", traces, twoPanels("per device and phase", `per layer (${phaseLabel()})`, {
    barmode: "stack",
    xaxis: { domain: LEFT }, yaxis: { title: { text: "ms" } },
    xaxis2: { ...LAYER_AXIS, domain: RIGHT, anchor: "y2" }, yaxis2: { anchor: "x2", title: { text: "ms" } },
  }), { rows: devs.length, layers: layers.length })];
}

function drawFlops(rep) {
  const layers = rep.layers || [];
  const ph = rep.phases || {};
  const traces = PARTS.map((part) => ({
    type: "bar", name: part, legendgroup: part, x: layers.map(layerX),
    y: layers.map((l) => (blk(l, state.phase).flops || {})[part] || 0),
    marker: { color: PART_COLORS[part] }, hovertemplate: `L%{x:03d} ${part}: %{y:.4s}FLOP<extra></extra>`,
  })).concat(PARTS.map((part) => ({
    type: "bar", name: part, legendgroup: part, showlegend: false, xaxis: "x2", yaxis: "y2",
    x: PHASES, y: PHASES.map((p) => ((ph[p] || {}).flops || {})[part] || 0),
    marker: { color: PART_COLORS[part] }, hovertemplate: `%{x} ${part}: %{y:.4s}FLOP<extra></extra>`,
  })));
  document.querySelector("#moe-flops h2 .sub").textContent =
    "analytic: router 2·H·E per token, experts 2·H·I·(3|2) per assignment, shared 2·H·Is·(3|2) per token";
  return [plot("flops", traces, twoPanels(`per layer (${phaseLabel()})`, "per phase", {
    barmode: "stack",
    xaxis: { ...LAYER_AXIS, domain: LEFT }, yaxis: { title: { text: "FLOP" }, tickformat: ".2s" },
    xaxis2: { domain: RIGHT, anchor: "y2" }, yaxis2: { anchor: "x2", title: { text: "FLOP" }, tickformat: ".2s" },
  }), { rows: layers.length })];
}

// Experts placed contiguously over N ranks (as transformers shards them): rank r holds experts
// [r*E/N, (r+1)*E/N). The run's own EP size when it was expert parallel, else a what-if (same sums
// as Report(..., ep_size=N) in Python, checked by the end-to-end test).
function epChoices(E) {
  const out = [];
  for (let n = 2; n <= Math.min(E, 64); n++) if (E % n === 0) out.push(n);
  return out;
}

function drawExpertParallel(rep) {
  const layers = rep.layers || [];
  const E = (rep.model || {}).num_experts || 0;
  const runEp = rep.expert_parallel && rep.expert_parallel.source === "run" ? rep.expert_parallel.ep_size : 0;
  const choices = epChoices(E).filter((n) => layers.every((l) => l.num_experts % n === 0));
  const controls = document.getElementById("moe-ep-controls");
  controls.innerHTML = "";
  if (!choices.length) {
    controls.textContent = `${E} experts cannot be split evenly over several ranks.`;
    hideChart("ep");
    return [];
  }
  const fallback = runEp || choices.filter((n) => n <= 8 && n < E).pop() || choices[0];
  const n = choices.includes(state.ep) ? state.ep : fallback;
  controls.appendChild(h("label", {}, "EP ranks ", seg("ep", choices.map((c) => [String(c), String(c)]), String(n),
    (v) => { state.ep = Number(v); draw(); })));
  const source = n === runEp ? "this run's expert parallelism" : "what-if placement";
  document.querySelector("#moe-ep h2 .sub").textContent = `${source}, ${phaseLabel()}`;
  const width = E / n;
  const perLayer = layers.map((l) => {
    const c = blk(l, state.phase).expert_counts || [];
    const loads = new Array(n).fill(0);
    c.forEach((v, e) => { loads[Math.floor(e / width)] += v; });
    return loads;
  });
  const total = new Array(n).fill(0);
  perLayer.forEach((row) => row.forEach((v, r) => { total[r] += v; }));
  const sum = total.reduce((a, b) => a + b, 0);
  const ratio = (row) => { const m = row.reduce((a, b) => a + b, 0) / row.length; return m ? Math.max(...row) / m : null; };
  const ranks = total.map((_, r) => `rank ${r}`);
  const traces = [
    { type: "bar", name: "assignments", x: ranks, y: total, marker: { color: "#f57c00" },
      customdata: total.map((v, r) => [r * width, (r + 1) * width - 1, sum ? (100 * v) / sum : 0]),
      hovertemplate: "%{x} (experts %{customdata[0]}-%{customdata[1]}): %{y} assignments, %{customdata[2]:.1f}%<extra></extra>" },
    { type: "scatter", mode: "lines+markers", name: "max / mean per layer", xaxis: "x2", yaxis: "y2",
      x: layers.map(layerX), y: perLayer.map(ratio), marker: { size: 4, color: "#e53935" }, line: { color: "#e53935", width: 1.5 },
      hovertemplate: "L%{x:03d}: max / mean %{y:.3f}<extra></extra>" },
  ];
  const overall = ratio(total);
  return [plot("ep", traces, twoPanels(`assignments per rank (max / mean ${overall === null ? "-" : overall.toFixed(3)})`,
    "imbalance per layer (1.0 = balanced)", {
      showlegend: false,
      xaxis: { domain: LEFT }, yaxis: { title: { text: "assignments" } },
      xaxis2: { ...LAYER_AXIS, domain: RIGHT, anchor: "y2" }, yaxis2: { anchor: "x2", title: { text: "max / mean" }, rangemode: "tozero" },
    }), { "ep-size": n, "ep-source": n === runEp ? "run" : "what-if", "ep-loads": total.join(","), rows: layers.length })];
}

// -- compare ------------------------------------------------------------------------------------
// one formatter per row: the same number format in every column of a row
const F = {
  int: (v) => (typeof v === "number" ? fmtInt(v) : "–"),
  si: (v) => (typeof v === "number" ? fmt(v, 3) : "–"),
  ms: (v) => (typeof v === "number" ? v.toFixed(4) : "–"),
  f3: (v) => (typeof v === "number" ? v.toFixed(3) : "–"),
  f2: (v) => (typeof v === "number" ? v.toFixed(2) : "–"),
  text: (v) => (v === null || v === undefined || v === "" ? "–" : String(v)),
};

function kMeanOf(r, phase) {  // token-weighted mean experts per token over the layers
  const bs = (r.layers || []).map((l) => blk(l, phase));
  const tok = sum(bs.map((b) => b.tokens)); const asg = sum(bs.map((b) => b.assignments));
  return tok ? asg / tok : null;
}

function selectorLabel(r) {
  const s = r.settings || {};
  return s.selector || (s.router_middleware ? `middleware ${s.router_middleware}` : "model's own top-k");
}

function compareRows(ra, rb) {
  const ph = (r, p, k) => ((r.phases || {})[p] || {})[k];
  const rows = [
    ["model", (r) => (r.model || {}).name || (r.model || {}).family, false, F.text],
    ["selector / middleware", selectorLabel, false, F.text],
    ["MoE layers", (r) => (r.model || {}).num_moe_layers, true, F.int],
    ["experts / layer", (r) => (r.model || {}).num_experts, true, F.int],
    ["top-k (config)", (r) => (r.model || {}).top_k, true, F.int],
    [`k: mean experts / token (${phaseLabel()})`, (r) => kMeanOf(r, state.phase), true, F.f3],
    ["tokens", (r) => (r.totals || {}).tokens, true, F.int],
    ["FLOPs / token", (r) => (r.totals || {}).flops_per_token, true, F.si],
  ];
  for (const p of PHASES) {
    rows.push([`${p} tokens`, (r) => ph(r, p, "tokens"), true, F.int]);
    rows.push([`${p} k`, (r) => kMeanOf(r, p), true, F.f3]);
    rows.push([`${p} FLOPs`, (r) => (ph(r, p, "flops") || {}).total, true, F.si]);
    rows.push([`${p} MoE time / token (ms)`, (r) => { const t = timeTotal(ph(r, p, "time_ms")); const n = ph(r, p, "tokens");
      return t !== null && n ? t / n : null; }, true, F.ms]);
  }
  const mean = (r, k) => { const v = (r.layers || []).map((l) => blk(l, state.phase)[k]).filter((x) => x !== undefined);
    return v.length ? sum(v) / v.length : null; };
  rows.push([`mean CV (${phaseLabel()})`, (r) => mean(r, "cv"), true, F.f3]);
  rows.push([`mean max/mean (${phaseLabel()})`, (r) => mean(r, "max_over_mean"), true, F.f3]);
  rows.push([`dead experts (${phaseLabel()})`, (r) => sum((r.layers || []).map((l) => blk(l, state.phase).dead_experts)), true, F.int]);
  return rows.map(([name, f, numeric, show]) => {
    const va = f(ra); const vb = f(rb);
    const ratio = numeric && typeof va === "number" && typeof vb === "number" && va !== 0 ? `×${(vb / va).toFixed(3)}` : "";
    return h("tr", { "data-row": name }, h("td", {}, name), h("td", {}, show(va)), h("td", {}, show(vb)), h("td", {}, ratio));
  });
}

function drawCompare(ra, b, cmp) {
  const section = document.getElementById("moe-cmp");
  const errBox = document.getElementById("moe-compare-error");
  const ids = ["cmp-heat", "cmp-layers", "cmp-latency"];
  if (!cmp) { section.classList.add("hidden"); ids.forEach(hideChart); return []; }
  section.classList.remove("hidden");
  document.querySelector("#moe-cmp h2 .sub").textContent = `${state.run} vs ${cmp}   (${phaseLabel()})`;
  if (b.error) {
    errBox.textContent = `Run "${cmp}" could not be loaded:\n${b.error}`;
    errBox.classList.remove("hidden");
    document.getElementById("moe-compare-table").replaceChildren();
    ids.forEach(hideChart);
    return [];
  }
  if (!b.report) {
    errBox.textContent = `Run "${cmp}" is a ${b.sweep ? "sweep" : "comparison"}, not a profiled run: pick a run with a report.`;
    errBox.classList.remove("hidden");
    document.getElementById("moe-compare-table").replaceChildren();
    ids.forEach(hideChart);
    return [];
  }
  errBox.classList.add("hidden");
  const rb = b.report;
  document.getElementById("moe-compare-table").replaceChildren(h("table", { class: "moe" },
    h("thead", {}, h("tr", {}, h("th", {}, "metric"), h("th", {}, state.run), h("th", {}, cmp), h("th", {}, `${cmp} / ${state.run}`))),
    h("tbody", {}, compareRows(ra, rb))));

  // the two heatmaps, side by side on one colour scale
  const ha = heatRows(ra, state.phase, state.mode);
  const hb = heatRows(rb, state.phase, state.mode);
  const share = state.mode === "share";
  const heat = (hm, tag, axis) => ({
    type: "heatmap", z: hm.z, y: hm.y, x: Array.from({ length: hm.width }, (_, i) => i), coloraxis: "coloraxis",
    xaxis: axis ? `x${axis}` : "x", yaxis: axis ? `y${axis}` : "y", hoverongaps: false,
    hovertemplate: `${tag} L%{y:03d} expert %{x}: %{z:${share ? ".2f" : ","}}${share ? " %" : ""}<extra></extra>`,
  });
  const rows = Math.max(ha.y.length, hb.y.length);
  const heatLayout = twoPanels(`A: ${esc(state.run)}`, `B: ${esc(cmp)}`, {
    height: Math.min(1200, Math.max(260, 100 + rows * (rows > 40 ? 10 : 16))),
    coloraxis: { colorscale: "Viridis", cmin: 0, colorbar: { title: { text: share ? "share %" : "tokens" }, thickness: 12 } },
    xaxis: { domain: LEFT, title: { text: "expert" }, showgrid: false, zeroline: false },
    yaxis: { ...LAYER_AXIS, autorange: "reversed", showgrid: false },
    xaxis2: { domain: RIGHT, anchor: "y2", title: { text: "expert" }, showgrid: false, zeroline: false },
    yaxis2: { ...LAYER_AXIS, anchor: "x2", autorange: "reversed", showgrid: false },
    margin: { l: 60, r: 20, t: 40, b: 44 },
  });
  const jobs = [plot("cmp-heat", [heat(ha, "A", 0), heat(hb, "B", 2)], heatLayout, { rows, "rows-a": ha.y.length, "rows-b": hb.y.length })];

  // per-layer balance (left) and FLOPs (right), A vs B
  const runs = [["A", ra, RUN_COLORS[0]], ["B", rb, RUN_COLORS[1]]];
  const lx = (r) => (r.layers || []).map(layerX);
  const per = (r, k) => (r.layers || []).map((l) => blk(l, state.phase)[k]);
  const lines = runs.flatMap(([tag, r, color]) => [
    { type: "scatter", mode: "lines+markers", name: `${tag} CV`, legendgroup: tag, x: lx(r), y: per(r, "cv"),
      line: { color, width: 1.5 }, marker: { size: 4, color }, hovertemplate: `${tag} L%{x:03d} CV %{y:.3f}<extra></extra>` },
    { type: "scatter", mode: "lines", name: `${tag} max/mean`, legendgroup: tag, x: lx(r), y: per(r, "max_over_mean"), yaxis: "y3",
      line: { color, dash: "dot", width: 1.5 }, hovertemplate: `${tag} L%{x:03d} max/mean %{y:.3f}<extra></extra>` },
    { type: "bar", name: `${tag} FLOPs`, legendgroup: tag, x: lx(r), xaxis: "x2", yaxis: "y2", marker: { color },
      y: (r.layers || []).map((l) => (blk(l, state.phase).flops || {}).total || 0),
      hovertemplate: `${tag} L%{x:03d}: %{y:.4s}FLOP<extra></extra>` },
  ]);
  jobs.push(plot("cmp-layers", lines, twoPanels("CV (solid) and max/mean (dotted) per layer", "FLOPs per layer", {
    barmode: "group",
    xaxis: { ...LAYER_AXIS, domain: LEFT }, yaxis: { title: { text: "CV" }, rangemode: "tozero" },
    yaxis3: { title: { text: "max / mean" }, overlaying: "y", side: "right", rangemode: "tozero", showgrid: false, anchor: "x" },
    xaxis2: { ...LAYER_AXIS, domain: RIGHT, anchor: "y2" }, yaxis2: { anchor: "x2", title: { text: "FLOP" }, tickformat: ".2s" },
  }), { rows }));

  const timed = runs.filter(([, r]) => r.timing_source !== null && r.timing_source !== undefined);
  if (timed.length) {
    const lat = timed.map(([tag, r, color]) => {
      const devs = r.devices || [];
      return { type: "bar", name: tag, marker: { color },
        x: [devs.flatMap((d) => PHASES.map(() => d.device)), devs.flatMap(() => PHASES)],
        y: devs.flatMap((d) => PHASES.map((p) => timeTotal((d.phases || {})[p]))),
        hovertemplate: `${tag} %{x}: %{y:.3f} ms (router+experts+shared)<extra></extra>` };
    });
    jobs.push(plot("cmp-latency", lat, baseLayout({ title: { text: "MoE time per device and phase", font: { size: 13 } },
      barmode: "group", yaxis: { title: { text: "ms" } } })));
  } else {
    hideChart("cmp-latency");
  }
  return jobs;
}

// -- settings, downloads, roofline (issue 15) ---------------------------------------------------
function drawSettings(rep, timeline, source) {
  const s = rep.settings || {};
  const w = s.workload || {};
  const v = s.versions || {};
  const par = s.parallel;
  const devs = s.devices ? Object.entries(s.devices).map(([d, n]) => (n && n !== d ? `${d} (${n})` : d)).join(", ") : "–";
  const items = [
    ["Mode", s.mode || "?"], ["Selector / middleware", selectorLabel(rep)],
    ["Batch", w.batch ?? "–"], ["Prompt length", w.prompt_len ?? "–"], ["New tokens", w.new_tokens ?? "–"],
    ["generate() calls", w.generate_calls ?? "–"], ["dtype", s.dtype || "–"], ["Devices", devs],
    ["Parallel layout", par ? Object.entries(par).filter(([, x]) => x !== null && x !== undefined).map(([k, x]) => `${k}=${x}`).join(" ") : "single process"],
    ["moe-trace / torch / transformers", `${v.moe_trace || "?"} / ${v.torch || "?"} / ${v.transformers || "?"}`],
    ["Date", s.date || "–"], ["Run id", rep.run_id || "–"],
    ["Source", source && source.file ? `${source.file} (no trace)` : "Kineto trace"],
  ];
  document.getElementById("moe-settings-kv").replaceChildren(
    ...items.map(([k, x]) => h("div", { "data-key": k }, h("span", {}, k), h("b", {}, String(x)))));
  const files = (timeline || []).map((t) => t.file).filter(Boolean);
  const links = files.map((f) => h("a", { href: `trace?run=${encodeURIComponent(state.run)}&file=${encodeURIComponent(f)}`,
    download: f, class: "moe-download" }, `download ${f}`));
  document.getElementById("moe-downloads").replaceChildren(...(links.length
    ? [h("span", {}, "Traces (open in ui.perfetto.dev): "), ...links] : source && source.file ? [downloadLink(source.file)] : []));
  const k = document.querySelector("#moe-k h2 .sub");
  if (k) k.textContent = `selector: ${selectorLabel(rep)}`;
}

function drawRoofline(rep) {
  const rf = rep.roofline;
  const section = document.getElementById("moe-roofline");
  if (!rf) { section.classList.add("hidden"); hideChart("roofline"); return []; }
  section.classList.remove("hidden");
  const peak = rf.peak;
  document.querySelector("#moe-roofline h2 .sub").textContent = peak && peak.tbps
    ? `peak ${peak.tbps} TB/s, ${peak.tflops} TFLOP/s (${peak.source}${peak.name ? ": " + peak.name : ""})`
    : "no known peak for this device (MOE_TRACE_PEAK=TBPS,TFLOPS sets one)";
  const pct = (x) => (typeof x === "number" ? `${(100 * x).toFixed(1)} %` : "–");
  const rows = PHASES.map((p) => {
    const r = (rf.phases || {})[p] || {};
    return h("tr", { "data-phase": p }, h("td", {}, p), h("td", {}, fmt(r.bytes)), h("td", {}, r.reads_source || "–"),
      h("td", {}, fmt(r.flops)), h("td", {}, F.ms(r.time_ms)), h("td", {}, F.f3(r.achieved_tbps)), h("td", {}, pct(r.bandwidth_share)),
      h("td", {}, F.f3(r.achieved_tflops)), h("td", {}, pct(r.compute_share)), h("td", {}, F.f2(r.intensity_flop_per_byte)));
  });
  document.getElementById("moe-roofline-table").replaceChildren(h("table", { class: "moe" },
    h("thead", {}, h("tr", {}, ["phase", "bytes read", "expert reads", "FLOPs", "ms", "TB/s", "of peak", "TFLOP/s", "of peak",
      "FLOP / byte"].map((c) => h("th", {}, c)))), h("tbody", {}, rows)));
  const layers = rf.layers || [];
  const phases = state.phase === "all" ? PHASES : [state.phase];
  const traces = phases.map((p) => ({
    type: "bar", name: p, x: layers.map((l) => l.index), marker: { color: PHASE_COLORS[p] },
    y: layers.map((l) => ((l.phases || {})[p] || {}).achieved_tbps),
    hovertemplate: `${p} L%{x:03d}: %{y:.3f} TB/s<extra></extra>`,
  }));
  if (!traces.some((t) => t.y.some((y) => typeof y === "number"))) { hideChart("roofline"); return []; }
  const shapes = peak && peak.tbps ? [{ type: "line", xref: "paper", x0: 0, x1: 1, y0: peak.tbps, y1: peak.tbps,
    line: { dash: "dot", color: "#757575", width: 1 } }] : [];
  return [plot("roofline", traces, baseLayout({ title: { text: "achieved weight bandwidth per layer", font: { size: 13 } },
    barmode: "group", xaxis: LAYER_AXIS, yaxis: { title: { text: "TB/s" }, rangemode: "tozero" }, shapes }),
  { rows: layers.length })];
}

// step timeline: one point per recorded forward (the trace's per-step counters); drift = total
// variation distance between a step's expert-load distribution and the layer's distribution over
// the whole run (0: same mix of experts, 1: disjoint experts)
function stepDrift(rep, steps) {
  const layers = rep.layers || [];
  const ref = layers.map((l) => { const c = l.expert_counts || []; const t = sum(c); return c.map((x) => (t ? x / t : 0)); });
  const z = layers.map((l, i) => steps.map((s) => {
    const rec = (s.layers || {})[l.index] || (s.layers || {})[String(l.index)];
    const c = rec && rec.expert_tokens; const t = c ? sum(c) : 0;
    if (!t) return null;
    return 0.5 * sum(c.map((x, e) => Math.abs(x / t - (ref[i][e] || 0))));
  }));
  return z;
}

function drawSteps(rep, timeline) {
  const section = document.getElementById("moe-steps");
  const proc = (timeline || [])[0];
  const steps = proc ? (proc.steps || []).filter((s) => s.recorded !== false) : [];
  if (!steps.length) { section.classList.add("hidden"); hideChart("steps"); hideChart("step-time"); hideChart("drift"); return []; }
  section.classList.remove("hidden");
  document.querySelector("#moe-steps h2 .sub").textContent =
    `${steps.length} forwards of ${proc.file}${(timeline || []).length > 1 ? ` (rank ${proc.rank}; ${timeline.length} processes)` : ""}`;
  const x = steps.map((s) => s.step);
  // integer ticks only (plotly would put half steps between few forwards)
  const stepAxis = { title: { text: "step" }, tickformat: "d", dtick: Math.max(1, Math.ceil(steps.length / 20)) };
  const color = steps.map((s) => PHASE_COLORS[s.phase] || PHASE_COLORS.all);
  const traces = [
    { type: "bar", name: "tokens", x, y: steps.map((s) => s.tokens), marker: { color },
      customdata: steps.map((s) => s.phase), hovertemplate: "step %{x} (%{customdata}): %{y} tokens<extra></extra>" },
    { type: "scatter", mode: "lines+markers", name: "host ms", x, y: steps.map((s) => s.host_ms), yaxis: "y2",
      line: { color: "#424242", width: 1 }, marker: { size: 3 }, hovertemplate: "step %{x}: %{y:.3f} ms (host)<extra></extra>" },
  ];
  const jobs = [plot("steps", traces, baseLayout({ title: { text: "tokens (bars: blue prefill, red decode) and host time per forward", font: { size: 13 } },
    xaxis: stepAxis, yaxis: { title: { text: "tokens" }, rangemode: "tozero" },
    yaxis2: { title: { text: "ms" }, overlaying: "y", side: "right", rangemode: "tozero", showgrid: false },
    margin: { l: 60, r: 60, t: 36, b: 44 } }),
  { cols: steps.length })];
  // GPU time of the step's router / experts / shared ranges (kernels inside them); a CPU trace has
  // none: say so and show the ranges' host time instead of zeros
  const gpu = proc.gpu_ranges === true && steps.some((s) => s.gpu_ms);
  const key = gpu ? "gpu_ms" : "cpu_ms";
  const note = document.getElementById("moe-steps-note");
  const unatt = typeof proc.unattributed_gpu_ms === "number" && proc.unattributed_gpu_ms > 0
    ? ` ${proc.unattributed_gpu_ms.toFixed(3)} ms of GPU range time could not be placed in a step.` : "";
  note.textContent = gpu ? (unatt ? unatt.trim() : "")
    : "No GPU kernels in this trace (a CPU run): there is no per-step GPU time. The bars show the host time of the ranges.";
  note.classList.toggle("hidden", !note.textContent);
  const hasTimes = steps.some((s) => s[key]);
  if (hasTimes) {
    const timeTraces = PARTS.map((part) => ({ type: "bar", name: part, x, marker: { color: PART_COLORS[part] },
      y: steps.map((s) => (s[key] ? s[key][part] : null)),
      hovertemplate: `step %{x}: ${part} %{y:.3f} ms (${gpu ? "GPU" : "host"})<extra></extra>` }));
    jobs.push(plot("step-time", timeTraces, baseLayout({
      title: { text: gpu ? "GPU time per forward: router / experts / shared ranges (all layers)"
        : "host time per forward of the router / experts / shared ranges (CPU trace: no GPU time)", font: { size: 13 } },
      barmode: "stack", xaxis: stepAxis, yaxis: { title: { text: "ms" }, rangemode: "tozero" } }),
    { cols: steps.length, source: gpu ? "gpu" : "cpu" }));
  } else {
    hideChart("step-time");
  }
  const z = stepDrift(rep, steps);
  jobs.push(plot("drift", [{ type: "heatmap", z, x, y: (rep.layers || []).map(layerX), colorscale: "Magma", reversescale: true,
    zmin: 0, zmax: 1, hoverongaps: false, colorbar: { title: { text: "drift" }, thickness: 12 },
    hovertemplate: "L%{y:03d} step %{x}: drift %{z:.3f}<extra></extra>" }],
  baseLayout({ title: { text: "expert-load drift per layer and step (total variation vs the whole run)", font: { size: 13 } },
    height: Math.min(900, Math.max(240, 100 + z.length * 14)), xaxis: stepAxis,
    yaxis: { ...LAYER_AXIS, autorange: "reversed" } }), { rows: z.length, cols: steps.length }));
  return jobs;
}

// -- runs that are not a profiled run: a sweep result, a comparison (issue 15) --------------------
const REPORT_CARDS = ["overview", "settings", "heatmap", "k", "balance", "latency", "flops", "steps", "roofline", "ep"];
function showCards(only) {  // only: "sweep" | "cmpdoc" | null (a report: its cards; the draw functions hide empty ones)
  for (const id of REPORT_CARDS) document.getElementById(`moe-${id}`).classList.toggle("hidden", only !== null);
  for (const id of ["sweep", "cmpdoc"]) document.getElementById(`moe-${id}`).classList.toggle("hidden", only !== id);
  if (only !== null) document.getElementById("moe-cmp").classList.add("hidden");
  for (const id of ["moe-phase", "moe-mode", "moe-compare"]) {  // controls of report panels: off for a sweep / comparison
    const el = document.getElementById(id);
    if (!el) continue;
    el.classList.toggle("moe-off", only !== null);
    if (id === "moe-compare") el.disabled = only !== null;
    else for (const b of el.children) b.disabled = only !== null;
  }
}

// the Timeline view needs a trace: greyed out for report / sweep / compare runs
function timelineFor(hasTrace) {
  state.hasTrace = hasTrace;
  window.moeTimelineAdded = () => timelineFor(state.hasTrace);
  const a = document.getElementById("moe-timeline");
  if (!a || a.dataset.unavailable) return;
  if (a.dataset.title === undefined) a.dataset.title = a.title || "";
  a.style.opacity = hasTrace ? "" : "0.5";
  a.style.pointerEvents = hasTrace ? "" : "none";
  if (hasTrace) a.removeAttribute("aria-disabled"); else a.setAttribute("aria-disabled", "true");
  a.title = hasTrace ? a.dataset.title : "this run has no trace (a report JSON, sweep or comparison)";
}

function downloadLink(file) {
  return h("a", { href: `trace?run=${encodeURIComponent(state.run)}&file=${encodeURIComponent(file)}`, download: file,
    class: "moe-download" }, `download ${file}`);
}

const valueLabel = (v) => (Array.isArray(v) ? v.join("+") : String(v));

function drawSweepDoc(doc, source) {
  const ex = doc.experiment || {};
  const m = ex.model || {};
  const rows = doc.summary || [];
  const knob = ex.knob || (rows[0] || {}).knob || "knob";
  document.querySelector("#moe-sweep h2 .sub").textContent =
    `${knob} over ${rows.length} values · ${m.name || m.family || "?"} · ${ex.device_name || ex.device || "?"} · `
    + `timing ${ex.timing || "?"} · ${ex.repeats ?? "?"} repeats × ${ex.num_inputs ?? "?"} inputs`
    + `${ex.interleaved ? ", interleaved" : ""}${ex.selector ? ` · selector ${ex.selector}` : ""} · ${ex.created || ""}`;
  const warn = document.getElementById("moe-sweep-warnings");
  const ws = doc.warnings || [];
  warn.textContent = ws.length ? `Warning: ${ws.join(" · ")}` : "";
  warn.classList.toggle("hidden", !ws.length);
  const pm = (r, k) => (typeof r[`${k}_mean`] === "number"
    ? `${r[`${k}_mean`].toFixed(2)}${typeof r[`${k}_std`] === "number" ? ` ± ${r[`${k}_std`].toFixed(2)}` : ""}` : "–");
  const ci = (r) => (typeof r.total_ms_ci95_low === "number" ? `${r.total_ms_ci95_low.toFixed(2)} – ${r.total_ms_ci95_high.toFixed(2)}` : "–");
  const head = [knob, "samples", "prefill ms", "decode ms", "total ms", "total ms 95% CI", "k (mean)", "active experts", "FLOPs / token"];
  const body = rows.map((r) => h("tr", { "data-value": valueLabel(r.value) }, h("td", {}, valueLabel(r.value)), h("td", {}, F.int(r.n)),
    h("td", {}, pm(r, "prefill_ms")), h("td", {}, pm(r, "decode_ms")), h("td", {}, pm(r, "total_ms")), h("td", {}, ci(r)),
    h("td", {}, F.f3(r.k_mean_mean)), h("td", {}, F.f2(r.active_experts_mean_mean)), h("td", {}, F.si(r.flops_per_token_mean))));
  document.getElementById("moe-sweep-table").replaceChildren(h("table", { class: "moe" },
    h("thead", {}, h("tr", {}, head.map((c) => h("th", {}, c)))), h("tbody", {}, body)),
  ...(source && source.file ? [h("div", { id: "moe-sweep-download" }, downloadLink(source.file))] : []));
  const x = rows.map((r) => valueLabel(r.value));
  const lat = [["prefill_ms", "prefill", PHASE_COLORS.prefill], ["decode_ms", "decode", PHASE_COLORS.decode],
    ["total_ms", "total", PHASE_COLORS.all]].map(([k, name, color]) => ({
    type: "scatter", mode: "lines+markers", name, x, y: rows.map((r) => r[`${k}_mean`]), line: { color, width: 1.5 },
    marker: { color, size: 6 }, error_y: { type: "data", array: rows.map((r) => r[`${k}_std`] || 0), thickness: 1, width: 3 },
    hovertemplate: `${knob} %{x}: ${name} %{y:.3f} ms (mean ± std)<extra></extra>` }));
  const xaxis = { title: { text: esc(knob) }, type: "category" };
  const jobs = [plot("sweep-latency", lat, baseLayout({ title: { text: `latency against ${esc(knob)} (mean ± std over repeats)`, font: { size: 13 } },
    xaxis, yaxis: { title: { text: "ms" }, rangemode: "tozero" } }), { cols: rows.length })];
  const routing = [
    { type: "scatter", mode: "lines+markers", name: "k (mean experts / token)", x, y: rows.map((r) => r.k_mean_mean),
      line: { color: "#5c6bc0" }, hovertemplate: `${knob} %{x}: k %{y:.3f}<extra></extra>` },
    { type: "scatter", mode: "lines+markers", name: "active experts", x, y: rows.map((r) => r.active_experts_mean_mean),
      line: { color: "#26a69a", dash: "dot" }, hovertemplate: `${knob} %{x}: %{y:.2f} active experts<extra></extra>` },
    { type: "bar", name: "FLOPs / token", x, y: rows.map((r) => r.flops_per_token_mean), xaxis: "x2", yaxis: "y2",
      marker: { color: PART_COLORS.experts }, hovertemplate: `${knob} %{x}: %{y:.4s}FLOP / token<extra></extra>` },
  ];
  jobs.push(plot("sweep-routing", routing, twoPanels(`k and active experts against ${esc(knob)}`, `MoE FLOPs per token against ${esc(knob)}`, {
    xaxis: { ...xaxis, domain: LEFT }, yaxis: { title: { text: "experts" }, rangemode: "tozero" },
    xaxis2: { ...xaxis, domain: RIGHT, anchor: "y2" }, yaxis2: { anchor: "x2", title: { text: "FLOP" }, tickformat: ".2s", rangemode: "tozero" },
  }), { cols: rows.length }));
  return jobs;
}

// the Python format of a row of `moe-trace compare` (benchmark.COMPARE_ROWS), one per row
function pyFormat(fmt, v) {
  if (v === null || v === undefined || (typeof v === "number" && Number.isNaN(v))) return "–";
  if (fmt === "{}") return String(v);
  if (typeof v !== "number") return String(v);
  if (fmt === "mflop") return (v / 1e6).toFixed(3);
  if (fmt === "{:d}") return String(Math.round(v));
  const m = /^\{:(\+?)\.(\d+)([f%])\}(%?)$/.exec(fmt);
  if (!m) return String(v);
  const x = m[3] === "%" ? v * 100 : v;
  return `${m[1] && x >= 0 ? "+" : ""}${x.toFixed(Number(m[2]))}${m[3] === "%" || m[4] ? "%" : ""}`;
}

function drawCompareDoc(doc, source) {
  const ex = doc.experiment || {};
  const cfgs = doc.configs || [];
  const names = cfgs.map((c) => String(c.config));
  document.querySelector("#moe-cmpdoc h2 .sub").textContent =
    `${ex.model || "?"} · ${ex.device || "?"} · base ${doc.baseline || names[0] || "?"} · ${ex.repeats ?? "?"} repeat(s) · ${ex.created || ""}`;
  const specs = ex.configs || {};
  const body = (doc.rows || []).map((r) => h("tr", { "data-row": r.key }, h("td", {}, r.label),
    ...cfgs.map((c) => h("td", {}, pyFormat(r.format, c[r.key])))));
  document.getElementById("moe-cmpdoc-table").replaceChildren(h("table", { class: "moe" },
    h("thead", {}, h("tr", {}, h("th", {}, "metric"), ...names.map((n) => h("th", { title: specs[n] || "" }, n)))),
    h("tbody", {}, body)), ...(source && source.file ? [h("div", {}, downloadLink(source.file))] : []));
  const panels = [["total_ms", "total ms", "ms"], ["k_mean", "k (mean experts / token)", "k"], ["flops_per_token", "MoE FLOPs / token", "FLOP"]];
  const dom = [[0, 0.28], [0.36, 0.64], [0.72, 1]];
  const traces = panels.map(([k, label], i) => ({ type: "bar", name: label, x: names, y: cfgs.map((c) => c[k]),
    xaxis: i ? `x${i + 1}` : "x", yaxis: i ? `y${i + 1}` : "y", marker: { color: [PHASE_COLORS.all, PART_COLORS.router, PART_COLORS.experts][i] },
    hovertemplate: `%{x}: %{y:.4s} ${label}<extra></extra>` }));
  const layout = baseLayout({ height: 320, showlegend: false, margin: { l: 60, r: 20, t: 40, b: 60 },
    annotations: panels.map(([, label], i) => panelTitle(label, (dom[i][0] + dom[i][1]) / 2)) });
  panels.forEach(([, , unit], i) => {
    layout[i ? `xaxis${i + 1}` : "xaxis"] = { domain: dom[i], anchor: i ? `y${i + 1}` : "y", type: "category" };
    layout[i ? `yaxis${i + 1}` : "yaxis"] = { anchor: i ? `x${i + 1}` : "x", title: { text: unit }, rangemode: "tozero", tickformat: unit === "FLOP" ? ".2s" : "" };
  });
  return [plot("cmpdoc", traces, layout, { cols: names.length })];
}
