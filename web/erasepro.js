// ComfyUI-ErasePro front-end extension (plain ES module, no build step).
//
// ErasePro_ProgressiveSolver: the server sends `message.erasepro_report = [report]` with the node's
//   "executed" message (the node returns {"ui": {"erasepro_report": [report]}, "result": ...}).
//   The report is stored in node.properties.erasepro_report (serialised with the workflow) and
//   drawn under the widgets: per-site relative dW bars (shallow text-encoder vs deep cross-attn)
//   and a badge "residual 3.1e-7 · burden 0.41% · 0.52 s".
// ErasePro_ConceptPair: after target / anchor / concept_type change (300 ms debounce) it asks
//   GET /erasepro/tokens?target=..&anchor=..&concept_type=.. ->
//   {"target_tokens": n, "anchor_tokens": m, "overflow": ["template", ...], "error": null}
//   and draws "target n tokens · anchor m tokens" plus an orange overflow warning.
//   Any failure (route missing, bad JSON) shows no readout.
import { app } from "../../scripts/app.js";

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
const MIN_W = 300;
const DEBOUNCE_MS = 300;

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
const LG = () => globalThis.LiteGraph || {};

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

// y (node-local, below the title) where the slots and visible widgets end.
function contentBottom(node) {
  const slotH = LG().NODE_SLOT_HEIGHT || 20;
  const widgetH = LG().NODE_WIDGET_HEIGHT || 20;
  const inputs = (node.inputs || []).filter((i) => i && !i.widget).length;
  const outputs = (node.outputs || []).length;
  let y = Math.max(inputs, outputs) * slotH + 4;
  if (typeof node.widgets_start_y === "number") y = Math.max(y, node.widgets_start_y);
  const width = (node.size && node.size[0]) || MIN_W;
  for (const w of node.widgets || []) {
    if (!w || w.hidden || w.type === "converted-widget" || String(w.type || "").startsWith("converted")) continue;
    let h = widgetH;
    try {
      if (typeof w.computeSize === "function") h = w.computeSize(width)[1] ?? h;
      else if (typeof w.computedHeight === "number") h = w.computedHeight;
    } catch (e) { /* keep default */ }
    const top = typeof w.last_y === "number" ? w.last_y : typeof w.y === "number" ? w.y : y;
    y = Math.max(y, top + h + 4);
  }
  return y;
}

function dirty(node) {
  try {
    if (typeof node.setDirtyCanvas === "function") node.setDirtyCanvas(true, true);
    else app.graph?.setDirtyCanvas?.(true, true);
  } catch (e) { /* ignore */ }
}

// Grow the node so the extra area fits, never shrinking a user's larger size.
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

function wrapComputeSize(nodeType, extraFn) {
  const orig = nodeType.prototype.computeSize;
  nodeType.prototype.computeSize = function (out) {
    const s = orig ? orig.apply(this, arguments) : [MIN_W, 60];
    try {
      const extra = extraFn(this);
      if (extra > 0) {
        s[0] = Math.max(s[0], MIN_W);
        s[1] += extra;
      }
    } catch (e) { /* ignore */ }
    return s;
  };
}

const warned = new Set();
function chain(proto, name, fn) {
  const orig = proto[name];
  proto[name] = function () {
    const r = orig ? orig.apply(this, arguments) : undefined;
    try {
      fn.apply(this, arguments);
    } catch (e) {
      if (!warned.has(name)) { warned.add(name); console.warn("[ErasePro]", name, e); } // once, not per frame
    }
    return r;
  };
}

// ----------------------------------------------------------------------------- solver report
function getReport(node) {
  const r = node.properties && node.properties[REPORT_KEY];
  return r && typeof r === "object" && !Array.isArray(r) ? r : null;
}

function reportExtra(node) {
  return getReport(node) ? PAD + CHART_H + PAD + LINE_H + PAD : 0;
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

  const values = sites.map((s) => num(s.relative_change));
  const finite = values.filter((v) => v !== null).map((v) => Math.max(0, v));
  const vmax = finite.length ? Math.max(...finite) : 0;

  // header: legend left, max right
  let lx = x + 4;
  const stages = [];
  for (const s of sites) { const st = stageOf(s); if (!stages.includes(st)) stages.push(st); }
  const legend = { shallow: "text enc", deep: "cross-attn", other: "other" };
  for (const st of ["shallow", "deep", "other"]) {
    if (!stages.includes(st)) continue;
    ctx.fillStyle = COLORS[st];
    ctx.fillRect(lx, y + 4, 7, 7);
    lx += 10;
    ctx.fillStyle = MUTED;
    ctx.fillText(legend[st], lx, y + 3);
    lx += ctx.measureText(legend[st]).width + 8;
  }
  const maxLabel = `max ΔW ${finite.length ? fmtSci(vmax) : "n/a"}`;
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

function drawSolver(node, ctx) {
  if (!node || node.flags?.collapsed || !node.size) return;
  const report = getReport(node);
  if (!report) return;
  const top = contentBottom(node) + PAD;
  const w = node.size[0] - 2 * PAD;
  const avail = node.size[1] - top - PAD;
  if (w < 40 || avail < LINE_H) return;
  ctx.save();
  try {
    const chartH = Math.min(CHART_H, avail - LINE_H - PAD);
    let by = top;
    if (chartH >= 30) {
      drawChart(ctx, report, PAD, top, w, chartH);
      by = top + chartH + PAD;
    }
    ctx.font = BADGE_FONT;
    ctx.textBaseline = "top";
    ctx.textAlign = "left";
    const nWarn = Array.isArray(report.warnings) ? report.warnings.length : 0;
    const warnText = nWarn ? `⚠ ${nWarn}` : "";
    const ww = warnText ? ctx.measureText(warnText).width + 6 : 0;
    const prefix = String(report.method || "").toLowerCase() === "uce" ? "UCE · " : "";
    ctx.fillStyle = TEXT;
    ctx.fillText(fit(ctx, prefix + badgeText(report), w - ww), PAD, by);
    if (warnText) {
      ctx.fillStyle = WARN;
      ctx.fillText(warnText, PAD + w - ww + 6, by);
    }
  } finally {
    ctx.restore();
  }
}

function setupSolver(nodeType) {
  chain(nodeType.prototype, "onExecuted", function (message) {
    let r = message && message[REPORT_KEY];
    if (Array.isArray(r)) r = r[r.length - 1];
    if (!r || typeof r !== "object") return;
    if (!this.properties) this.properties = {};
    this.properties[REPORT_KEY] = r;
    ensureSize(this);
  });
  chain(nodeType.prototype, "onConfigure", function () {
    if (getReport(this)) ensureSize(this);
  });
  chain(nodeType.prototype, "onDrawForeground", function (ctx) {
    drawSolver(this, ctx);
  });
  chain(nodeType.prototype, "getExtraMenuOptions", function (canvas, options) {
    if (!getReport(this) || !Array.isArray(options)) return;
    const node = this;
    options.push({
      content: "Clear ErasePro report",
      callback: () => { try { delete node.properties[REPORT_KEY]; dirty(node); } catch (e) { /* ignore */ } },
    });
  });
  wrapComputeSize(nodeType, reportExtra);
}

// ----------------------------------------------------------------------------- concept pair tokens
function widgetValue(node, name) {
  const w = (node.widgets || []).find((x) => x && x.name === name);
  return w ? String(w.value ?? "") : "";
}

function tokenExtra(node) {
  const t = node._eraseproTokens;
  if (!t) return 0;
  return PAD + LINE_H + (Array.isArray(t.overflow) && t.overflow.length ? LINE_H : 0) + (t.error ? LINE_H : 0) + PAD;
}

async function fetchTokens(node, key) {
  const seq = (node._eraseproTokSeq = (node._eraseproTokSeq || 0) + 1);
  const target = widgetValue(node, "target");
  const anchor = widgetValue(node, "anchor");
  const conceptType = widgetValue(node, "concept_type");
  let data = null;
  if (target.trim() || anchor.trim()) {
    try {
      const q = new URLSearchParams({ target, anchor, concept_type: conceptType });
      const base = typeof app?.api?.api_base === "string" ? app.api.api_base : "";
      const res = await fetch(`${base}/erasepro/tokens?${q.toString()}`);
      if (res.ok) {
        const d = await res.json();
        if (d && typeof d === "object" && (num(d.target_tokens) !== null || num(d.anchor_tokens) !== null || d.error)) data = d;
      }
    } catch (e) {
      data = null; // route missing / network error: no readout
    }
  }
  if (seq !== node._eraseproTokSeq || key !== node._eraseproTokKey) return; // a newer request owns the readout
  node._eraseproTokens = data;
  if (data) ensureSize(node);
  else dirty(node);
}

function scheduleTokens(node) {
  const key = [widgetValue(node, "target"), widgetValue(node, "anchor"), widgetValue(node, "concept_type")].join("\u0000");
  if (key === node._eraseproTokKey) return;
  node._eraseproTokKey = key;
  clearTimeout(node._eraseproTokTimer);
  node._eraseproTokTimer = setTimeout(() => { fetchTokens(node, key); }, DEBOUNCE_MS);
}

function drawPair(node, ctx) {
  if (!node || !node.size || node.flags?.collapsed) return;
  scheduleTokens(node); // catches edits that bypass widget callbacks, and workflow loads (cheap compare)
  const t = node._eraseproTokens;
  if (!t) return;
  const w = node.size[0] - 2 * PAD;
  let y = contentBottom(node) + PAD;
  if (w < 40 || y + LINE_H > node.size[1]) return;
  ctx.save();
  try {
    ctx.font = BADGE_FONT;
    ctx.textBaseline = "top";
    ctx.textAlign = "left";
    const tt = num(t.target_tokens);
    const at = num(t.anchor_tokens);
    const tok = (n) => (n === null ? "n/a" : `${n} token${n === 1 ? "" : "s"}`);
    ctx.fillStyle = TEXT;
    ctx.fillText(fit(ctx, `target ${tok(tt)} · anchor ${tok(at)}`, w), PAD, y);
    y += LINE_H;
    const overflow = Array.isArray(t.overflow) ? t.overflow : [];
    if (overflow.length && y + LINE_H <= node.size[1]) {
      ctx.fillStyle = WARN;
      const msg = `⚠ ${overflow.length} template${overflow.length === 1 ? "" : "s"} over 77 tokens: ${String(overflow[0])}`;
      ctx.fillText(fit(ctx, msg, w), PAD, y);
      y += LINE_H;
    }
    if (t.error && y + LINE_H <= node.size[1]) {
      ctx.fillStyle = WARN;
      ctx.fillText(fit(ctx, `⚠ ${String(t.error)}`, w), PAD, y);
    }
  } finally {
    ctx.restore();
  }
}

function setupPair(nodeType) {
  chain(nodeType.prototype, "onNodeCreated", function () {
    const node = this;
    for (const w of node.widgets || []) {
      if (!w || !["target", "anchor", "concept_type"].includes(w.name)) continue;
      const orig = w.callback;
      w.callback = function () {
        const r = orig ? orig.apply(this, arguments) : undefined;
        try { scheduleTokens(node); } catch (e) { /* ignore */ }
        return r;
      };
    }
  });
  chain(nodeType.prototype, "onDrawForeground", function (ctx) {
    drawPair(this, ctx);
  });
  chain(nodeType.prototype, "onRemoved", function () {
    clearTimeout(this._eraseproTokTimer);
    this._eraseproTokSeq = (this._eraseproTokSeq || 0) + 1;
  });
  wrapComputeSize(nodeType, tokenExtra);
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
