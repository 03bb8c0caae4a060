// ComfyUI-ErasePro front-end extension (plain ES module, no build step).
//
// Both node renderers: the classic LiteGraph canvas and Nodes 2.0 (Vue nodes, setting
// Comfy.VueNodes.Enabled), which never calls canvas drawing (onDrawForeground, a canvas widget's
// draw). So the views below are DOM widgets (node.addDOMWidget): classic positions the element over
// the canvas, Nodes 2.0 puts it in the node body. They are never serialised (widget.serialize =
// false, options.serialize = false): widgets_values and the API prompt are unchanged. A front end
// without addDOMWidget gets the older canvas widget (addViewWidget).
//
// ErasePro_ProgressiveSolver: the server sends `message.erasepro_report = [report]` with the node's
//   "executed" message (the node returns {"ui": {"erasepro_report": [report]}, "result": ...}).
//   The report is stored in node.properties.erasepro_report (serialised with the workflow, so it
//   is shown again after a page reload or when the workflow is reopened) and drawn in a view under
//   the other widgets: per-site relative dW bars (shallow text-encoder vs the diffusion model's deep sites) on a
//   <canvas>, and the badge "residual 3.1e-7 · burden 0.41% · 0.52 s" as text.
// ErasePro_ConceptPair: after target / anchor / concept_type / prompts change (300 ms debounce),
//   and when the node is created or loaded, it POSTs {target, anchor, concept_type, prompts} to
//   /api/erasepro/tokens (nodes/routes.py; GET with the same query parameters works too) ->
//   {"target_tokens": n, "anchor_tokens": m, "overflow": ["template", ...], "error": null}
//   and shows "target n tokens · anchor m tokens" plus an orange overflow warning (also a view).
//   Any failure (route missing, bad JSON) shows no readout.
// ErasePro_Evaluate needs nothing here: its grid is a standard preview image (ui.images).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const SOLVER = "ErasePro_ProgressiveSolver";
const PAIR = "ErasePro_ConceptPair";
const REPORT_KEY = "erasepro_report";

const COLORS = { shallow: "#3478e6", deep: "#e87624", other: "#8c6ebe", na: "#7a7e88" };
const TEXT = "#d8d8d8";
const MUTED = "#9a9ea8";
const WARN = "#ff9a3c";
const FONT = "10px Arial, sans-serif";
const BADGE_FONT = "11px Arial, sans-serif";
const PAD = 6;
const CHART_H = 110;
const LINE_H = 15;
const REPORT_H = CHART_H + PAD + LINE_H + 2;
const MIN_W = 300;
const REPORT_WIDGET = "erasepro_report_view";
const TOKENS_WIDGET = "erasepro_tokens_view";
const DEBOUNCE_MS = 300;
const TOKENS_ROUTE = "/erasepro/tokens";
const MAX_CHARS = 1000; // the route's caps (nodes/routes.py)
const MAX_PROMPTS_CHARS = 8000;

// ----------------------------------------------------------------------------- formatting
// Same rules as erasepro_ops/report.py (format_sci / format_percent / format_seconds).
function num(x) {
  if (x === null || x === undefined || typeof x === "boolean") return null;
  const v = typeof x === "number" ? x : Number(x);
  return Number.isFinite(v) ? v : null;
}
function fmtSci(x) {
  const v = num(x);
  if (v === null) return "n/a";
  if (v === 0) return "0";
  const [m, e] = v.toExponential(1).split("e");
  return `${m}e${parseInt(e, 10)}`;
}
function fmtPercent(x) {
  const v = num(x);
  if (v === null) return "n/a";
  const p = v * 100;
  if (p === 0) return "0%";
  if (Math.abs(p) < 0.01) return `${fmtSci(p)}%`;
  if (Math.abs(p) >= 100) return `${p.toFixed(0)}%`;
  return `${Number(p.toPrecision(2))}%`;
}
function fmtSeconds(x) {
  const v = num(x);
  if (v === null) return "n/a";
  if (Math.abs(v) < 0.1) return `${(v * 1000).toFixed(1)} ms`;
  if (Math.abs(v) < 10) return `${v.toFixed(2)} s`;
  return `${v.toFixed(1)} s`;
}
function badgeText(r) {
  return `residual ${fmtSci(r.train_residual)} · burden ${fmtPercent(r.deep_burden)} · ${fmtSeconds(r.solve_seconds)}`;
}

// ----------------------------------------------------------------------------- layout helpers
function fit(ctx, text, maxW) {
  text = String(text ?? "");
  if (maxW <= 0) return "";
  if (ctx.measureText(text).width <= maxW) return text;
  let lo = 0;
  let hi = text.length;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (ctx.measureText(text.slice(0, mid) + "…").width <= maxW) lo = mid;
    else hi = mid - 1;
  }
  return lo > 0 ? text.slice(0, lo) + "…" : "";
}

function dirty(node) {
  try {
    if (typeof node.setDirtyCanvas === "function") node.setDirtyCanvas(true, true);
    else app.graph?.setDirtyCanvas?.(true, true);
  } catch (e) { /* ignore */ }
}

// Grow the node so its widgets fit, never shrinking a user's larger size.
function ensureSize(node) {
  try {
    if (!node.size || typeof node.computeSize !== "function") return;
    const min = node.computeSize();
    const w = Math.max(node.size[0], min[0]);
    const h = Math.max(node.size[1], min[1]);
    if (w !== node.size[0] || h !== node.size[1]) {
      if (typeof node.setSize === "function") node.setSize([w, h]);
      else { node.size[0] = w; node.size[1] = h; }
    }
  } catch (e) { /* ignore */ }
  dirty(node);
}

const warned = new Set();
function guard(name, fn) {
  try {
    return fn();
  } catch (e) {
    if (!warned.has(name)) { warned.add(name); console.warn("[ErasePro]", name, e); } // once, not per frame
  }
  return undefined;
}

function chain(proto, name, fn) {
  const orig = proto[name];
  proto[name] = function () {
    const r = orig ? orig.apply(this, arguments) : undefined;
    guard(name, () => fn.apply(this, arguments));
    return r;
  };
}

function findWidget(node, name) {
  return (node.widgets || []).find((w) => w && w.name === name) || null;
}

// A canvas-drawn, never-serialised widget, appended last. height(node) -> px; paint(node, ctx, y, width, h).
function addViewWidget(node, name, height, paint) {
  const existing = findWidget(node, name);
  if (existing) return existing;
  const widget = {
    name,
    type: name,
    value: "",
    serialize: false, // not in widgets_values
    options: { serialize: false }, // not in the API prompt
    computeSize(width) {
      let h = 0;
      guard(`${name}.computeSize`, () => { h = height(node); });
      return [Math.max(MIN_W, Number(width) || 0), Math.max(0, h)];
    },
    draw(ctx, n, width, y) {
      const target = n || node;
      if (!target || target.flags?.collapsed || !target.size) return;
      const h = Math.min(height(target), target.size[1] - y);
      if (h <= 0) return;
      guard(`${name}.draw`, () => {
        ctx.save();
        try { paint(target, ctx, y, Number(width) || target.size[0], h); } finally { ctx.restore(); }
      });
    },
    mouse() { return false; },
  };
  if (typeof node.addCustomWidget === "function") node.addCustomWidget(widget);
  else (node.widgets ||= []).push(widget);
  return findWidget(node, name) || widget;
}

function removeWidget(node, name) {
  const i = (node.widgets || []).findIndex((w) => w && w.name === name);
  if (i >= 0) {
    const w = node.widgets[i];
    if (typeof node.removeWidget === "function") {
      try { node.removeWidget(w); return; } catch (e) { /* fall back to splicing it out */ }
    }
    node.widgets.splice(i, 1);
    try { w?.onRemove?.(); } catch (e) { /* ignore */ }
  }
}

// A DOM widget (node.addDOMWidget): shown by both renderers, the LiteGraph canvas (classic, an
// element positioned over the canvas) and Nodes 2.0 (Vue nodes render DOM widgets in the node
// body; they never call canvas drawing). Never serialised. render(node, el) fills the element;
// height(node) -> px (0 hides it). Front ends without addDOMWidget get the canvas widget.
function addDomView(node, name, height, render, paint) {
  const existing = findWidget(node, name);
  if (existing) return existing;
  if (typeof node.addDOMWidget !== "function") return addViewWidget(node, name, height, paint);
  const el = document.createElement("div");
  el.className = `erasepro-view ${name}`;
  el.style.cssText = `box-sizing:border-box;width:100%;overflow:hidden;padding:0 ${PAD}px;font:${BADGE_FONT};color:${TEXT};`;
  const h = () => { let v = 0; guard(`${name}.height`, () => { v = height(node); }); return Math.max(0, v); };
  const widget = node.addDOMWidget(name, name, el, {
    serialize: false, hideOnZoom: false, getValue: () => "", setValue: () => {},
    getMinHeight: h, getMaxHeight: h, getHeight: h,
  });
  widget.serialize = false; // not in widgets_values
  widget.eraseproRender = () => guard(`${name}.render`, () => {
    el.style.height = `${h()}px`;
    el.style.display = h() > 0 ? "block" : "none";
    render(node, el);
  });
  return widget;
}

function refreshView(node, name) {
  const w = findWidget(node, name);
  if (w && typeof w.eraseproRender === "function") w.eraseproRender();
}

// ----------------------------------------------------------------------------- solver report
function getReport(node) {
  const r = node.properties && node.properties[REPORT_KEY];
  return r && typeof r === "object" && !Array.isArray(r) ? r : null;
}

function stageOf(site) {
  const s = String(site.stage || "").toLowerCase();
  return s === "shallow" || s === "deep" ? s : "other";
}

function drawChart(ctx, report, x, y, w, h) {
  const sites = Array.isArray(report.sites) ? report.sites.filter((s) => s && typeof s === "object") : [];
  ctx.fillStyle = "rgba(0,0,0,0.25)";
  ctx.fillRect(x, y, w, h);
  ctx.font = FONT;
  ctx.textBaseline = "top";
  ctx.textAlign = "left";

  const values = sites.map((s) => num(s.relative_change));
  const finite = values.filter((v) => v !== null).map((v) => Math.max(0, v));
  const vmax = finite.length ? Math.max(...finite) : 0;

  // header: legend left, max right
  let lx = x + 4;
  const stages = [];
  for (const s of sites) { const st = stageOf(s); if (!stages.includes(st)) stages.push(st); }
  const legend = { shallow: "text enc", deep: "model", other: "other" };
  for (const st of ["shallow", "deep", "other"]) {
    if (!stages.includes(st)) continue;
    ctx.fillStyle = COLORS[st];
    ctx.fillRect(lx, y + 4, 7, 7);
    lx += 10;
    ctx.fillStyle = MUTED;
    const count = sites.filter((s) => stageOf(s) === st).length;
    const label = `${legend[st]} ×${count}`;
    ctx.fillText(label, lx, y + 3);
    lx += ctx.measureText(label).width + 8;
  }
  const maxLabel = `max ΔW/W ${finite.length ? fmtPercent(vmax) : "n/a"}`;
  const mw = ctx.measureText(maxLabel).width;
  if (lx + mw < x + w - 4) {
    ctx.fillStyle = TEXT;
    ctx.fillText(maxLabel, x + w - 4 - mw, y + 3);
  }

  const px = x + 4;
  const pw = w - 8;
  const py = y + 16;
  const ph = h - 16 - 4;
  if (ph < 4 || pw < 4) return;
  ctx.fillStyle = "rgba(255,255,255,0.15)";
  ctx.fillRect(px, py + ph, pw, 1); // baseline
  ctx.fillRect(px, py, pw, 1); // max line

  const n = sites.length;
  if (!n) {
    ctx.fillStyle = MUTED;
    ctx.textAlign = "center";
    ctx.fillText("no sites", x + w / 2, py + ph / 2 - 5);
    ctx.textAlign = "left";
    return;
  }
  const slot = pw / n;
  const gap = slot >= 4 ? Math.max(1, slot * 0.2) : 0;
  const bw = Math.max(1, slot - gap);
  const denom = vmax > 0 ? vmax : 1;
  for (let i = 0; i < n; i++) {
    const bx = px + i * slot;
    const v = values[i];
    if (v === null) {
      ctx.fillStyle = COLORS.na;
      ctx.fillRect(bx, py + ph - 2, bw, 2);
      continue;
    }
    let bh = (Math.max(0, v) / denom) * ph;
    if (v > 0 && bh < 1) bh = 1;
    if (bh <= 0) continue;
    ctx.fillStyle = COLORS[stageOf(sites[i])];
    ctx.fillRect(bx, py + ph - bh, bw, bh);
  }
}

function solverBadge(report) {
  const prefix = String(report.method || "").toLowerCase() === "uce" ? "UCE · " : "";
  const nWarn = Array.isArray(report.warnings) ? report.warnings.length : 0;
  return { badge: prefix + badgeText(report), warnText: nWarn ? `⚠ ${nWarn}` : "" };
}

// Nodes 2.0 and classic alike: a <canvas> with the chart, the badge as text under it.
function renderSolver(node, el) {
  const report = getReport(node);
  if (!report) { el.replaceChildren(); return; }
  const ratio = window.devicePixelRatio || 1;
  const w = Math.max(MIN_W - 2 * PAD, (el.clientWidth || MIN_W) - 2 * PAD);
  let cv = el.querySelector("canvas");
  if (!cv) {
    cv = document.createElement("canvas");
    cv.style.cssText = `display:block;width:100%;height:${CHART_H}px;`;
    const line = document.createElement("div");
    line.className = "erasepro-badge";
    line.style.cssText = `margin-top:${PAD}px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;`;
    el.replaceChildren(cv, line);
  }
  cv.width = Math.round(w * ratio);
  cv.height = Math.round(CHART_H * ratio);
  const ctx = cv.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, CHART_H);
  drawChart(ctx, report, 0, 0, w, CHART_H);
  const { badge, warnText } = solverBadge(report);
  const line = el.querySelector(".erasepro-badge");
  line.textContent = badge;
  if (warnText) {
    const warn = document.createElement("span");
    warn.style.color = WARN;
    warn.textContent = `  ${warnText}`;
    line.appendChild(warn);
  }
  node._eraseproDrawn = { badge, chart: true, sites: Array.isArray(report.sites) ? report.sites.length : 0, dom: true, t: Date.now() };
}

function paintSolver(node, ctx, top, width, avail) {
  const report = getReport(node);
  if (!report) return;
  const w = width - 2 * PAD;
  if (w < 40 || avail < LINE_H) return;
  const chartH = Math.min(CHART_H, avail - LINE_H - PAD);
  let by = top;
  if (chartH >= 30) {
    drawChart(ctx, report, PAD, top, w, chartH);
    by = top + chartH + PAD;
  }
  ctx.font = BADGE_FONT;
  ctx.textBaseline = "top";
  ctx.textAlign = "left";
  const label = solverBadge(report);
  const warnText = label.warnText;
  const ww = warnText ? ctx.measureText(warnText).width + 6 : 0;
  ctx.fillStyle = TEXT;
  const badge = fit(ctx, label.badge, w - ww);
  ctx.fillText(badge, PAD, by);
  if (warnText) {
    ctx.fillStyle = WARN;
    ctx.fillText(warnText, PAD + w - ww + 6, by);
  }
  // What was drawn last, for tests and debugging (not serialised: not in properties).
  node._eraseproDrawn = { badge, chart: chartH >= 30, sites: Array.isArray(report.sites) ? report.sites.length : 0, top, chartH, width: w, t: Date.now() };
}

// Tell the front end the workflow changed (the report is in properties now), so its change
// tracker records it and workflow persistence keeps it across a page reload.
function persist() {
  try {
    const tracker = app.extensionManager?.workflow?.activeWorkflow?.changeTracker;
    if (tracker && typeof tracker.checkState === "function") tracker.checkState();
    else app.graph?.change?.();
  } catch (e) { /* older front ends: saved on the next edit */ }
}

function showReport(node) {
  if (getReport(node)) {
    addDomView(node, REPORT_WIDGET, (n) => (getReport(n) ? REPORT_H : 0), renderSolver, paintSolver);
    refreshView(node, REPORT_WIDGET);
    ensureSize(node);
  } else {
    removeWidget(node, REPORT_WIDGET);
    dirty(node);
  }
}

function setupSolver(nodeType) {
  chain(nodeType.prototype, "onExecuted", function (message) {
    let r = message && message[REPORT_KEY];
    if (Array.isArray(r)) r = r[r.length - 1];
    if (!r || typeof r !== "object") return;
    if (!this.properties) this.properties = {};
    this.properties[REPORT_KEY] = r;
    showReport(this);
    persist();
  });
  chain(nodeType.prototype, "onConfigure", function () {
    if (getReport(this)) showReport(this); // reopened workflow / page reload: draw the last report
  });
  chain(nodeType.prototype, "getExtraMenuOptions", function (canvas, options) {
    if (!getReport(this) || !Array.isArray(options)) return;
    const node = this;
    options.push({
      content: "Clear ErasePro report",
      callback: () => guard("clear", () => { delete node.properties[REPORT_KEY]; showReport(node); persist(); }),
    });
  });
}

// ----------------------------------------------------------------------------- concept pair tokens
function widgetValue(node, name) {
  const w = findWidget(node, name);
  return w ? String(w.value ?? "") : "";
}

function tokenLines(node) {
  const t = node._eraseproTokens;
  if (!t) return 0;
  return 1 + (Array.isArray(t.overflow) && t.overflow.length ? 1 : 0) + (t.error ? 1 : 0);
}

async function fetchTokens(node, key) {
  const seq = (node._eraseproTokSeq = (node._eraseproTokSeq || 0) + 1);
  const body = {
    target: widgetValue(node, "target").slice(0, MAX_CHARS),
    anchor: widgetValue(node, "anchor").slice(0, MAX_CHARS),
    concept_type: widgetValue(node, "concept_type"),
    prompts: widgetValue(node, "prompts").slice(0, MAX_PROMPTS_CHARS),
  };
  let data = null;
  if (body.target.trim() || body.anchor.trim()) {
    try {
      const init = { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
      // api.fetchApi adds the server's /api prefix (and any user header); plain fetch as fallback.
      const res = typeof api?.fetchApi === "function" ? await api.fetchApi(TOKENS_ROUTE, init) : await fetch(`/api${TOKENS_ROUTE}`, init);
      const d = await res.json().catch(() => null);
      if (d && typeof d === "object" && (num(d.target_tokens) !== null || num(d.anchor_tokens) !== null || d.error)) data = d;
    } catch (e) {
      data = null; // route missing / network error: no readout
    }
  }
  if (seq !== node._eraseproTokSeq || key !== node._eraseproTokKey) return; // a newer request owns the readout
  node._eraseproTokens = data;
  refreshView(node, TOKENS_WIDGET);
  ensureSize(node);
}

function scheduleTokens(node) {
  const key = ["target", "anchor", "concept_type", "prompts"].map((n) => widgetValue(node, n)).join("\u0000");
  if (key === node._eraseproTokKey) return;
  node._eraseproTokKey = key;
  clearTimeout(node._eraseproTokTimer);
  node._eraseproTokTimer = setTimeout(() => { fetchTokens(node, key); }, DEBOUNCE_MS);
}

// The readout's lines: [{text, warn}], the same in both renderers.
function pairLines(t) {
  const tok = (n) => (n === null ? "n/a" : `${n} token${n === 1 ? "" : "s"}`);
  const lines = [{ text: `target ${tok(num(t.target_tokens))} · anchor ${tok(num(t.anchor_tokens))}`, warn: false }];
  const overflow = Array.isArray(t.overflow) ? t.overflow : [];
  if (overflow.length) {
    const named = overflow.map(String).find((x) => x.trim() !== "{}");
    const example = named ? `e.g. "${named}"` : "the concept alone";
    lines.push({ text: `⚠ ${overflow.length} template${overflow.length === 1 ? "" : "s"} over one 77-token chunk: ${example}`, warn: true });
  }
  if (t.error) lines.push({ text: `⚠ ${String(t.error)}`, warn: true });
  return lines;
}

function paintPair(node, ctx, top, width, avail) {
  const t = node._eraseproTokens;
  if (!t) return;
  const w = width - 2 * PAD;
  if (w < 40) return;
  ctx.font = BADGE_FONT;
  ctx.textBaseline = "top";
  ctx.textAlign = "left";
  const lines = pairLines(t).filter((line, i) => top + 2 + (i + 1) * LINE_H <= top + avail + 2);
  lines.forEach((line, i) => {
    ctx.fillStyle = line.warn ? WARN : TEXT;
    ctx.fillText(fit(ctx, line.text, w), PAD, top + 2 + i * LINE_H);
  });
  node._eraseproDrawn = { lines: lines.map((l) => l.text), t: Date.now() }; // for tests and debugging
}

function renderPair(node, el) {
  const t = node._eraseproTokens;
  if (!t) { el.replaceChildren(); return; }
  const lines = pairLines(t);
  el.replaceChildren(...lines.map((line) => {
    const div = document.createElement("div");
    div.className = "erasepro-tokens-line";
    div.style.cssText = `height:${LINE_H}px;line-height:${LINE_H}px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;color:${line.warn ? WARN : TEXT};`;
    div.textContent = line.text;
    div.title = line.text;
    return div;
  }));
  node._eraseproDrawn = { lines: lines.map((l) => l.text), dom: true, t: Date.now() };
}

function setupPair(nodeType) {
  chain(nodeType.prototype, "onNodeCreated", function () {
    const node = this;
    for (const w of node.widgets || []) {
      if (!w || !["target", "anchor", "concept_type", "prompts"].includes(w.name)) continue;
      const orig = w.callback;
      w.callback = function () {
        const r = orig ? orig.apply(this, arguments) : undefined;
        guard("tokens", () => scheduleTokens(node));
        return r;
      };
    }
    addDomView(node, TOKENS_WIDGET, (n) => { const k = tokenLines(n); return k ? k * LINE_H + 4 : 0; }, renderPair, paintPair);
    scheduleTokens(node);
  });
  chain(nodeType.prototype, "onConfigure", function () {
    scheduleTokens(this); // a loaded workflow: Nodes 2.0 never calls onDrawForeground
  });
  chain(nodeType.prototype, "onDrawForeground", function () {
    if (!this.flags?.collapsed) scheduleTokens(this); // edits that bypass widget callbacks, workflow loads (cheap compare)
  });
  chain(nodeType.prototype, "onRemoved", function () {
    clearTimeout(this._eraseproTokTimer);
    this._eraseproTokSeq = (this._eraseproTokSeq || 0) + 1;
  });
}

// ----------------------------------------------------------------------------- registration
app.registerExtension({
  name: "ErasePro.Report",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const name = nodeData?.name;
    if (name === SOLVER) setupSolver(nodeType);
    else if (name === PAIR) setupPair(nodeType);
  },
});
