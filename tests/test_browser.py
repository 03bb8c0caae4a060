"""The pack in a real browser: headless Chromium (Debian's /usr/bin/chromium, driven by the
Playwright Python package; no browser download) against the live ComfyUI server and its real
front end (comfyui-frontend-package).

- every workflow in workflows/ appears in the front end's template browser (Templates ->
  Extensions -> ComfyUI-ErasePro) and loads from there with every node type known (no missing-node
  dialog); with the solver showing a report, no two of its nodes overlap, with Nodes 2.0 on or off;
- the style workflow (classic renderer) and the Evaluate workflow (Nodes 2.0 on, then off) are
  queued with the Run button and finish; the solver node then holds the report the server returned
  (/history ui output) and shows it on the screen: the badge text matches the numbers, and the
  chart's stage colours are in a screenshot of its view; the Concept Pair shows its token count
  and the Evaluate node its grid preview;
- the report survives a page reload, a save / reopen of the workflow (serialised JSON), collapsing
  and resizing the node;
- the Concept Pair node shows the token readout from /erasepro/tokens, with the overflow warning;
- no page error and no console error / warning from the extension, across the whole module.

Screenshots go to test-artifacts/browser/. CPU only: the shipped 64x64, 2-step workflows on the
tiny random-weight SD1.5 checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import comfy_server as comfy_server_mod
from erasepro_ops.report import STAGE_COLORS, format_percent, format_sci, format_seconds

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
EVALUATE_STEM = "erasepro_evaluate"  # run in both renderers by test_evaluate_workflow_in_both_renderers
# Run from the browser with the classic renderer: the style workflow (the other shipped workflows
# differ only in their Concept Pair and sampler nodes, and each runs headless in test_workflows.py;
# here every one of them is loaded from the template browser by test_shipped_layouts_have_no_overlap).
CLASSIC_RUNS = [p for p in WORKFLOWS if p.stem == "erasepro_style_erasure"]
PACK_DIR_NAME = "ComfyUI-ErasePro"  # the folder name under custom_nodes (the template browser's group)
SOLVER = "ErasePro_ProgressiveSolver"
PAIR = "ErasePro_ConceptPair"
CHROMIUM = os.environ.get("ERASEPRO_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RUN_TIMEOUT_S = 900  # a shared CPU runner: a solve plus the Evaluate images can take minutes
# An error or warning is the extension's when it carries its log prefix, comes from its script,
# or is about its route. (The front end itself also logs errors here: 404s for optional user
# files and template thumbnails, and registry look-ups of every node type, api.comfy.org, which
# the closed network refuses. Those are written to console-errors.txt, not failed on.)
OUR_MARKERS = ("[erasepro]", f"/extensions/{PACK_DIR_NAME.lower()}/", "/erasepro/tokens")

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")


def _chromium_or_skip() -> str:
    if Path(CHROMIUM).is_file():
        return CHROMIUM
    msg = f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; `playwright install` is not used)"
    if os.environ.get("CI"):
        pytest.fail(msg)  # CI installs it (.ci/run): a missing browser must not pass silently
    pytest.skip(msg)


def _get(base: str, path: str):
    with urllib.request.urlopen(base + path, timeout=30) as r:
        return json.loads(r.read().decode())


# ---------------------------------------------------------------------------------------
# Fixtures: one browser page for the module, errors collected across all tests
# ---------------------------------------------------------------------------------------
class PageErrors:
    def __init__(self):
        self.all: list[str] = []   # every page error / console error (the front end has its own)
        self.ours: list[str] = []  # those from this pack's extension

    def add(self, kind: str, text: str, location: str = ""):
        line = f"{kind}: {text} {location}".strip()
        self.all.append(line)
        if any(m in line.lower() for m in OUR_MARKERS):
            self.ours.append(line)


@pytest.fixture(scope="module")
def shots(artifacts_dir) -> Path:
    d = artifacts_dir / "browser"
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def errors() -> PageErrors:
    return PageErrors()


@pytest.fixture(scope="module")
def page(comfy_server, tiny_checkpoint, errors, shots):
    exe = _chromium_or_skip()
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_FLAGS, headless=True)
        try:
            ctx = browser.new_context(viewport={"width": 1400, "height": 900}, device_scale_factor=1)
            pg = ctx.new_page()
            pg.on("pageerror", lambda e: errors.add("pageerror", f"{e}\n{getattr(e, 'stack', '') or ''}"))

            def on_console(m):
                if m.type == "error" or (m.type == "warning" and "[erasepro]" in m.text.lower()):
                    loc = m.location or {}
                    errors.add(f"console.{m.type}", m.text, str(loc.get("url", "")))
            pg.on("console", on_console)
            t0 = time.time()
            _open(pg, comfy_server)
            print(f"\n[browser] front end ready in {time.time() - t0:.1f} s")
            yield pg
            (shots / "console-errors.txt").write_text("\n".join(errors.all) + "\n", encoding="utf-8")
        finally:
            browser.close()


def _open(pg, base_url: str):
    pg.goto(base_url + "/", wait_until="domcontentloaded")
    pg.wait_for_function(
        "() => window.app && window.app.graph && window.app.canvas && window.LiteGraph"
        f" && LiteGraph.registered_node_types && '{SOLVER}' in LiteGraph.registered_node_types",
        timeout=120_000)
    try:  # custom extensions load before node types register: missing now = web/erasepro.js failed
        pg.wait_for_function("() => app.extensions.some(e => e.name === 'ErasePro.Report')", timeout=5_000)
    except sync_api.TimeoutError:
        pytest.fail("the ErasePro.Report extension did not load (web/erasepro.js); see test-artifacts/browser/console-errors.txt")


# ---------------------------------------------------------------------------------------
# Page helpers
# ---------------------------------------------------------------------------------------
JS_NODE = f"""(type) => {{
  const n = app.graph._nodes.find(n => n.type === type);
  return n ? {{ id: n.id, pos: [...n.pos], size: [...n.size], collapsed: !!n.flags?.collapsed,
               report: n.properties?.erasepro_report ?? null, drawn: n._eraseproDrawn ?? null,
               tokens: n._eraseproTokens ?? null }} : null;
}}"""


def node_state(pg, type_: str):
    return pg.evaluate(JS_NODE, type_)


def focus_node(pg, type_: str, front: bool = True) -> dict:
    """Zoom 1, the node at a fixed place on the canvas, selected and brought to the front (as a
    click on it would; the shipped layouts put another node right under the solver), redrawn;
    returns its screen box (CSS px in the page, title bar included)."""
    if front:  # not a real click: two within the double-click time open the title editor
        pg.evaluate("""(type) => { const n = app.graph._nodes.find(n => n.type === type);
            app.canvas.bringToFront(n); app.canvas.selectNode?.(n); }""", type_)
    return _place(pg, type_)


def _place(pg, type_: str) -> dict:
    return pg.evaluate("""async (type) => {
      const node = app.graph._nodes.find(n => n.type === type);
      const c = app.canvas;
      c.ds.scale = 1;
      c.ds.offset[0] = 320 - node.pos[0];
      c.ds.offset[1] = 220 - node.pos[1];
      c.setDirty(true, true);
      c.draw(true, true);
      await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
      const rect = c.canvas.getBoundingClientRect();
      const vue = document.querySelector(`[data-node-id='${node.id}']`);  // Nodes 2.0: the node is a DOM element
      if (vue) {
        const r = vue.getBoundingClientRect();
        return { page: { x: r.left, y: r.top, width: r.width, height: r.height }, canvas: null, vue: true };
      }
      const titleH = LiteGraph.NODE_TITLE_HEIGHT || 30;
      const [x, y] = c.ds.convertOffsetToCanvas([node.pos[0], node.pos[1]]);
      const sizeH = node.flags?.collapsed ? 0 : node.size[1];
      const sizeW = node.flags?.collapsed ? (node._collapsed_width || 120) : node.size[0];
      return { page: { x: rect.left + x, y: rect.top + y - titleH, width: sizeW, height: sizeH + titleH },
               canvas: { x, y, ratio: c.canvas.width / rect.width } };
    }""", type_)


def node_boxes(pg) -> dict:
    """Every node's box in graph coordinates (title bar included), as the renderer shows it: the
    LiteGraph bounding box (classic) or the Vue node's DOM rectangle (Nodes 2.0), each measured with
    that node on the screen at zoom 1 (Nodes 2.0 may leave nodes off the screen unrendered)."""
    return pg.evaluate("""async () => {
      const c = app.canvas;
      const out = {};
      for (const node of app.graph._nodes) {
        c.ds.scale = 1;
        c.ds.offset[0] = 100 - node.pos[0];
        c.ds.offset[1] = 100 - node.pos[1];
        c.setDirty(true, true);
        c.draw(true, true);
        await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
        const label = `${node.id} ${node.type}`;
        const vue = document.querySelector(`[data-node-id='${node.id}']`);
        if (vue) {
          const r = vue.getBoundingClientRect();
          const cr = c.canvas.getBoundingClientRect();
          out[label] = [r.left - cr.left - c.ds.offset[0], r.top - cr.top - c.ds.offset[1], r.width, r.height];
        } else {
          const b = new Float32Array(4);
          node.getBounding(b);
          out[label] = [...b];
        }
      }
      return out;
    }""")


def overlaps(boxes: dict, margin: float = 0.0) -> list:
    """Pairs of node boxes that intersect (by more than ``margin`` px in both directions)."""
    names = sorted(boxes)
    bad = []
    for i, a in enumerate(names):
        ax, ay, aw, ah = boxes[a]
        for b in names[i + 1:]:
            bx, by, bw, bh = boxes[b]
            dx = min(ax + aw, bx + bw) - max(ax, bx)
            dy = min(ay + ah, by + bh) - max(ay, by)
            if dx > margin and dy > margin:
                bad.append((a, b, round(dx), round(dy)))
    return bad


def assert_no_overlap(pg, shots: Path, name: str):
    boxes = node_boxes(pg)
    (shots / f"{name}-boxes.json").write_text(json.dumps(boxes, indent=1), encoding="utf-8")
    bad = overlaps(boxes)
    assert not bad, f"nodes overlap ({name}): {bad}; boxes {boxes}"


def expected_badge(report: dict) -> str:
    prefix = "UCE · " if str(report.get("method", "")).lower() == "uce" else ""
    return (f"{prefix}residual {format_sci(report.get('train_residual'))} · burden "
            f"{format_percent(report.get('deep_burden'))} · {format_seconds(report.get('solve_seconds'))}")


def view_box(pg, type_: str, view: str) -> dict | None:
    """The page box and text of the node's ErasePro view (a DOM widget) when it is shown, else None."""
    return pg.evaluate("""([type, view]) => {
      const node = app.graph._nodes.find(n => n.type === type);
      const w = node && (node.widgets || []).find(w => w.name === view);
      const el = w && w.element;
      if (!el || !el.isConnected || el.offsetParent === null) return null;
      const r = el.getBoundingClientRect();
      const style = getComputedStyle(el);
      if (r.width < 10 || r.height < 10 || style.visibility === 'hidden' || style.display === 'none') return null;
      return { x: r.left, y: r.top, width: r.width, height: r.height, text: el.innerText };
    }""", [type_, view])


def screen_colors(pg, box: dict, colors: dict, tol: int = 6) -> dict:
    """Pixels of each colour in a screenshot of ``box``: what is on the screen, whichever renderer drew it."""
    import io

    from PIL import Image
    png = pg.screenshot(clip={k: box[k] for k in ("x", "y", "width", "height")})
    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return {k: int((np.abs(a - np.array(rgb)).max(axis=-1) <= tol).sum()) for k, rgb in colors.items()}


def assert_report_drawn(pg, report: dict, shots: Path | None = None, name: str = "") -> dict:
    """The solver node shows ``report`` on screen: the badge text, and the chart's stage colours
    in a screenshot of its view (a DOM widget: the same check in both renderers)."""
    box = focus_node(pg, SOLVER)
    pg.wait_for_function(f"() => app.graph._nodes.find(n => n.type === '{SOLVER}')?._eraseproDrawn",
                         timeout=10_000)
    st = node_state(pg, SOLVER)
    drawn = st["drawn"]
    assert drawn["badge"] == expected_badge(report), (drawn["badge"], expected_badge(report))
    assert drawn["chart"] and drawn["sites"] == len(report.get("sites") or [])
    view = view_box(pg, SOLVER, "erasepro_report_view")
    assert view is not None, "the solver's report view is not shown"
    assert expected_badge(report) in view["text"], view["text"]
    stages = {str(s.get("stage")).lower() for s in report.get("sites") or []
              if isinstance(s.get("relative_change"), (int, float)) and s["relative_change"] > 0}
    colors = {k: list(STAGE_COLORS[k]) for k in ("shallow", "deep")}
    if shots is not None:  # before the checks: the picture is what to look at when one fails
        b = box["page"]
        pg.screenshot(path=str(shots / f"{name}.png"),
                      clip={"x": max(0, b["x"] - 10), "y": max(0, b["y"] - 10),
                            "width": b["width"] + 20, "height": b["height"] + 20})
    counts = screen_colors(pg, view, colors)
    for stage in ("shallow", "deep"):
        if stage in stages:
            assert counts[stage] > 0, f"no {stage} bars on screen in the solver's view: {counts}, {view}, {st}"
    return counts


def load_template(pg, stem: str, tries: int = 3):
    """Templates dialog -> Extensions / ComfyUI-ErasePro -> the workflow's card, until the graph holds
    the workflow's own nodes (new node objects, as many as its file lists) and the dialog is closed.
    A click that lands while the dialog re-renders its cards after the category click loads nothing
    and leaves the dialog open: the card is clicked again then."""
    want = len(json.loads((REPO / "workflows" / f"{stem}.json").read_text(encoding="utf-8"))["nodes"])
    pg.evaluate("() => app.graph._nodes.forEach(n => { n.__eraseproStale = true; })")
    loaded = (f"() => app.graph._nodes.length === {want} && app.graph._nodes.every(n => !n.__eraseproStale)"
              f" && app.graph._nodes.some(n => n.type === '{SOLVER}')"
              " && !document.querySelector(\"[data-testid^='template-workflow-']\")")
    dialog_card = pg.locator(f"[data-testid='template-workflow-{stem}']")
    for attempt in range(tries):
        if not dialog_card.is_visible():
            if not pg.get_by_text(PACK_DIR_NAME, exact=True).first.is_visible():
                pg.evaluate("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
            pg.get_by_text(PACK_DIR_NAME, exact=True).first.click(timeout=30_000)
        dialog_card.click(timeout=30_000)
        try:
            pg.wait_for_function(loaded, timeout=15_000)
            break
        except sync_api.TimeoutError:
            if attempt == tries - 1:
                state = pg.evaluate("() => ({nodes: app.graph._nodes.length, stale: app.graph._nodes.filter(n => n.__eraseproStale).length,"
                                    " dialog: !!document.querySelector(\"[data-testid^='template-workflow-']\")})")
                raise AssertionError(f"{stem}: the template did not load after {tries} clicks "
                                     f"(want {want} new nodes and the dialog closed): {state}") from None
            print(f"\n[browser] {stem}: not loaded 15 s after the card's click, clicking again")
    wait_layout_settled(pg)


def wait_layout_settled(pg):
    """Until no node moves or resizes for one 300 ms interval: Nodes 2.0 rescales a loaded layout and
    sizes its nodes after the load returns, and measuring or moving the view meanwhile races it."""
    pg.wait_for_function("""() => { const s = JSON.stringify(app.graph._nodes.map(n => [n.id, ...n.pos, ...n.size]));
        const same = s === window.__eraseproLayout; window.__eraseproLayout = s; return same; }""",
                         polling=300, timeout=15_000)


def dismiss_toasts(pg) -> list[str]:
    """Close the front end's toasts (returns their texts). With Nodes 2.0 turned on, its "Prefer the
    legacy design? Switch back" toast stays until closed, over the top-right corner where the Run
    button is: a click on Run is then caught by the toast."""
    texts = pg.evaluate("() => [...document.querySelectorAll('.p-toast-message')].map(e => e.innerText)")
    for btn in pg.locator(".p-toast-message .p-toast-close-button").all():
        try:
            btn.click(timeout=5_000)
        except sync_api.Error:
            pass  # gone meanwhile
    try:
        pg.wait_for_function("() => !document.querySelector('.p-toast-message')", timeout=5_000)
    except sync_api.TimeoutError:
        pg.evaluate("() => app.extensionManager.toast?.removeAll?.()")
        pg.wait_for_function("() => !document.querySelector('.p-toast-message')", timeout=10_000)
    return texts


def missing_node_types(pg) -> list[str]:
    return pg.evaluate("() => [...new Set(app.graph._nodes.filter(n => !(n.type in LiteGraph.registered_node_types)"
                       " || n.has_errors).map(n => n.type))]")


def visible_dialog_text(pg) -> str:
    return pg.evaluate("() => [...document.querySelectorAll('.p-dialog, [role=dialog]')]"
                       ".filter(d => d.offsetParent !== null).map(d => d.innerText).join('\\n---\\n')")


QUEUED_TIMEOUT_S = 60  # the click -> the prompt in /queue or /history (the server validates it first)


def _queued_ids(base_url: str) -> set[str]:
    q = _get(base_url, "/queue")
    return {item[1] for key in ("queue_running", "queue_pending") for item in q.get(key) or []}


def queue_and_wait(pg, base_url: str) -> tuple[str, dict]:
    """Click Run (server cache cleared first: comfy_server.clear_cache); the new prompt must reach the server's queue within
    QUEUED_TIMEOUT_S (else the button did nothing: fail at once, not after the run timeout); wait for
    it in /history; returns (prompt_id, history entry)."""
    comfy_server_mod.clear_cache(base_url)
    before = set(_get(base_url, "/history?max_items=1000")) | _queued_ids(base_url)
    dismiss_toasts(pg)
    pg.locator("[data-testid='queue-button']").first.click(timeout=30_000)
    t0 = time.time()
    pid = None
    while pid is None:
        new = (set(_get(base_url, "/history?max_items=1000")) | _queued_ids(base_url)) - before
        if new:
            pid = sorted(new)[0]
            break
        if time.time() - t0 > QUEUED_TIMEOUT_S:
            pytest.fail(f"clicking Run queued nothing within {QUEUED_TIMEOUT_S} s "
                        f"(dialogs: {visible_dialog_text(pg)[:500]!r})")
        time.sleep(0.25)
    t_end = t0 + RUN_TIMEOUT_S
    while time.time() < t_end:
        entry = _get(base_url, f"/history/{pid}").get(pid)
        if entry:
            st = entry.get("status") or {}
            if st.get("status_str") == "error":
                msgs = [m for m in st.get("messages", []) if m[0] == "execution_error"]
                pytest.fail(f"workflow failed in the browser run: {json.dumps(msgs)[:3000]}")
            if st.get("completed"):
                return pid, entry
        time.sleep(0.25)
    raise TimeoutError(f"the queued workflow {pid} did not finish within {RUN_TIMEOUT_S} s")


def solver_ui_report(entry: dict, solver_id) -> dict:
    out = (entry.get("outputs") or {}).get(str(solver_id)) or {}
    reports = out.get("erasepro_report")
    assert isinstance(reports, list) and reports, f"no erasepro_report in the solver's ui output: {out!r:.500}"
    return reports[-1]


def wait_node_report(pg, report: dict):
    """The page's solver node holds the report the server sent (the websocket 'executed' message)."""
    pg.wait_for_function(
        """([type, want]) => { const r = app.graph._nodes.find(n => n.type === type)?.properties?.erasepro_report;
             return r && r.train_residual === want.train_residual && r.deep_burden === want.deep_burden
                    && r.solve_seconds === want.solve_seconds; }""",
        arg=[SOLVER, {k: report.get(k) for k in ("train_residual", "deep_burden", "solve_seconds")}], timeout=30_000)


# ---------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------
def test_templates_listed(comfy_server):
    """/api/workflow_templates lists every shipped workflow under the pack's folder name."""
    listed = _get(comfy_server, "/api/workflow_templates")
    assert sorted(listed.get(PACK_DIR_NAME, [])) == sorted(p.stem for p in WORKFLOWS), listed
    for p in WORKFLOWS:
        served = _get(comfy_server, f"/api/workflow_templates/{urllib.parse.quote(PACK_DIR_NAME)}/{p.name}")
        assert served == json.loads(p.read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", CLASSIC_RUNS, ids=[p.stem for p in CLASSIC_RUNS])
def test_workflow_in_browser(path, page, comfy_server, tiny_checkpoint, shots, errors):
    t0 = time.time()
    load_template(page, path.stem)
    assert missing_node_types(page) == [], "node types the front end does not know"
    dialogs = visible_dialog_text(page)
    assert not re.search(r"missing|not found|error", dialogs, re.I), f"dialog after loading: {dialogs[:1000]}"
    # the tiny random-weight checkpoint (the workflows name it already; set it as a user would)
    page.evaluate("""(name) => { for (const n of app.graph._nodes.filter(n => n.type === 'CheckpointLoaderSimple')) {
        const w = n.widgets.find(w => w.name === 'ckpt_name'); w.value = name; w.callback?.(name); } }""",
                  tiny_checkpoint.name)
    solver_id = node_state(page, SOLVER)["id"]
    t_load = time.time() - t0

    pid, entry = queue_and_wait(page, comfy_server)
    t_run = time.time() - t0 - t_load
    report = solver_ui_report(entry, solver_id)
    wait_node_report(page, report)
    st = node_state(page, SOLVER)
    for k in ("train_residual", "deep_burden", "solve_seconds", "method"):
        assert st["report"].get(k) == report.get(k), (k, st["report"].get(k), report.get(k))
    assert [s.get("relative_change") for s in st["report"]["sites"]] == [s.get("relative_change") for s in report["sites"]]
    counts = assert_report_drawn(page, report, shots, f"solver-{path.stem}")
    page.screenshot(path=str(shots / f"graph-{path.stem}.png"))
    # A template-browser thumbnail candidate (the browser asks for workflows/<name>.jpg)
    b = focus_node(page, SOLVER)["page"]
    (shots / "thumbnails").mkdir(exist_ok=True)
    page.screenshot(path=str(shots / "thumbnails" / f"{path.stem}.jpg"), type="jpeg", quality=85,
                    clip={"x": b["x"] - 10, "y": b["y"] - 10, "width": b["width"] + 20, "height": b["height"] + 20})
    print(f"\n[browser] {path.stem}: load {t_load:.1f} s, run {t_run:.1f} s (solve {report.get('solve_seconds'):.2f} s), "
          f"badge {st['drawn']['badge']!r}, bar pixels {counts}")
    assert errors.ours == [], errors.ours


def test_report_survives_reload_save_collapse_resize(page, comfy_server, shots, errors):
    """After the runs above: reload the page (the front end restores the open workflow), save and
    reopen it, collapse and resize the solver: the report stays and is drawn, nothing throws."""
    st = node_state(page, SOLVER)
    assert st and st["report"], "run test_workflow_in_browser first (the page holds its last workflow)"
    report = st["report"]

    page.reload(wait_until="domcontentloaded")
    _open(page, comfy_server)
    page.wait_for_function(f"() => app.graph._nodes.some(n => n.type === '{SOLVER}')", timeout=30_000)
    assert node_state(page, SOLVER)["report"] == report, "report lost on page reload"
    assert_report_drawn(page, report, shots, "solver-after-reload")

    # save (as a file would: JSON text) and reopen
    saved = page.evaluate("() => JSON.stringify(app.graph.serialize())")
    assert "erasepro_report" in saved
    page.evaluate("async () => { await app.loadGraphData({nodes: [], links: [], groups: [], config: {}, extra: {}, version: 0.4}); }")
    assert node_state(page, SOLVER) is None
    page.evaluate("async (text) => { await app.loadGraphData(JSON.parse(text)); }", saved)
    assert node_state(page, SOLVER)["report"] == report, "report lost on save / reopen"
    assert_report_drawn(page, report, shots, "solver-after-reopen")

    # collapse, draw, expand
    page.evaluate(f"() => {{ const n = app.graph._nodes.find(n => n.type === '{SOLVER}'); n.collapse(true);"
                  " app.canvas.setDirty(true, true); app.canvas.draw(true, true); }")
    assert node_state(page, SOLVER)["collapsed"]
    box = focus_node(page, SOLVER)["page"]
    page.screenshot(path=str(shots / "solver-collapsed.png"),
                    clip={"x": box["x"] - 10, "y": box["y"] - 10, "width": 400, "height": 80})
    page.evaluate(f"() => {{ const n = app.graph._nodes.find(n => n.type === '{SOLVER}'); n.collapse(true); }}")
    assert not node_state(page, SOLVER)["collapsed"]
    assert_report_drawn(page, report)

    # resize: too small for the chart (must not throw), then wide
    for size in ([120, 60], [200, 200], [700, 420]):
        page.evaluate(f"(s) => {{ const n = app.graph._nodes.find(n => n.type === '{SOLVER}'); n.setSize(s);"
                      " app.canvas.setDirty(true, true); app.canvas.draw(true, true); }", size)
    assert_report_drawn(page, report, shots, "solver-resized-wide")
    assert errors.ours == [], errors.ours


def test_concept_pair_token_readout(page, comfy_server, shots, errors):
    if node_state(page, PAIR) is None:
        load_template(page, WORKFLOWS[0].stem)

    def set_pair(target, anchor, concept_type="style"):
        page.evaluate("""([type, vals]) => { const n = app.graph._nodes.find(n => n.type === type);
            for (const [k, v] of Object.entries(vals)) { const w = n.widgets.find(w => w.name === k); w.value = v; w.callback?.(v); }
            app.canvas.setDirty(true, true); }""",
                      [PAIR, {"target": target, "anchor": anchor, "concept_type": concept_type}])
        want = _get(comfy_server, "/erasepro/tokens?" + urllib.parse.urlencode(
            {"target": target, "anchor": anchor, "concept_type": concept_type}))
        focus_node(page, PAIR)
        page.wait_for_function(
            """([type, want]) => { const n = app.graph._nodes.find(n => n.type === type);
                 app.canvas.setDirty(true, true);
                 const t = n._eraseproTokens;
                 return t && t.target_tokens === want.target_tokens && t.anchor_tokens === want.anchor_tokens
                        && JSON.stringify(t.overflow) === JSON.stringify(want.overflow) && n._eraseproDrawn?.lines; }""",
            arg=[PAIR, want], timeout=15_000)
        focus_node(page, PAIR)
        page.wait_for_function(f"() => app.graph._nodes.find(n => n.type === '{PAIR}')._eraseproDrawn?.lines",
                               timeout=10_000)
        return want, node_state(page, PAIR)["drawn"]["lines"]

    want, lines = set_pair("Van Gogh", "a painting")
    assert want["target_tokens"] >= 2 and want["overflow"] == [] and want["error"] is None, want
    assert lines[0] == f"target {want['target_tokens']} tokens · anchor {want['anchor_tokens']} tokens", lines
    assert len(lines) == 1, lines

    long_target = " ".join(f"word{i}" for i in range(40))  # ~80 tokens: every template overflows
    want, lines = set_pair(long_target, "a painting")
    assert want["overflow"], want
    assert any(line.startswith(f"⚠ {len(want['overflow'])} template") and "77-token chunk" in line for line in lines), lines
    box = focus_node(page, PAIR)["page"]
    page.screenshot(path=str(shots / "concept-pair-overflow.png"),
                    clip={"x": box["x"] - 10, "y": box["y"] - 10, "width": box["width"] + 20, "height": box["height"] + 20})

    want, lines = set_pair("Van Gogh", "van gogh")
    assert want["error"] and any("same concept" in line for line in lines), (want, lines)
    set_pair("Van Gogh", "a painting")
    assert errors.ours == [], errors.ours


def set_nodes2(pg, on: bool):
    """Turn ComfyUI's Nodes 2.0 (Vue-rendered nodes, setting Comfy.VueNodes.Enabled) on or off."""
    pg.keyboard.press("Escape")
    pg.evaluate("async (on) => { await app.extensionManager.setting.set('Comfy.VueNodes.Enabled', on); }", on)
    if on:  # Vue nodes off screen may be culled: one rendered node is enough here
        pg.wait_for_function("() => app.graph._nodes.length === 0 || document.querySelector('[data-node-id]')",
                             timeout=30_000)
    else:
        pg.wait_for_function("() => !document.querySelector('[data-node-id]')", timeout=30_000)
    pg.wait_for_timeout(500)


def assert_tokens_shown(pg, comfy_server):
    """The Concept Pair's view shows the token counts /erasepro/tokens gives for its widgets."""
    vals = pg.evaluate(f"() => Object.fromEntries(app.graph._nodes.find(n => n.type === '{PAIR}').widgets"
                       ".filter(w => ['target', 'anchor', 'concept_type'].includes(w.name)).map(w => [w.name, w.value]))")
    want = _get(comfy_server, "/erasepro/tokens?" + urllib.parse.urlencode(vals))
    focus_node(pg, PAIR)
    line = f"target {want['target_tokens']} tokens · anchor {want['anchor_tokens']} tokens"
    pg.wait_for_function("([type, line]) => { const w = app.graph._nodes.find(n => n.type === type).widgets"
                         ".find(w => w.name === 'erasepro_tokens_view'); return w?.element?.innerText?.includes(line); }",
                         arg=[PAIR, line], timeout=15_000)
    view = view_box(pg, PAIR, "erasepro_tokens_view")
    assert view is not None and line in view["text"], (view, line)


@pytest.mark.parametrize("nodes2", [True, False], ids=["nodes2", "classic"])
def test_evaluate_workflow_in_both_renderers(nodes2, page, comfy_server, tiny_checkpoint, shots, errors):
    """The Evaluate workflow run from the browser with Nodes 2.0 on, then off: the solver's chart and
    badge, the Concept Pair's token count and the Evaluate grid preview are on the screen in each."""
    mode = "nodes2" if nodes2 else "classic"
    set_nodes2(page, nodes2)
    try:
        load_template(page, EVALUATE_STEM)
        page.evaluate("""(name) => { for (const n of app.graph._nodes.filter(n => n.type === 'CheckpointLoaderSimple')) {
            const w = n.widgets.find(w => w.name === 'ckpt_name'); w.value = name; w.callback?.(name); } }""",
                      tiny_checkpoint.name)
        solver_id = node_state(page, SOLVER)["id"]
        t0 = time.time()
        _, entry = queue_and_wait(page, comfy_server)
        print(f"\n[browser] {EVALUATE_STEM} ({mode}): run {time.time() - t0:.1f} s")
        report = solver_ui_report(entry, solver_id)
        wait_node_report(page, report)
        assert_report_drawn(page, report, shots, f"{mode}-solver")
        assert_tokens_shown(page, comfy_server)
        focus_node(page, "ErasePro_Evaluate")
        page.wait_for_function("""() => { const n = app.graph._nodes.find(n => n.type === 'ErasePro_Evaluate');
            const sel = document.querySelector(`[data-node-id='${n.id}'] img`);
            return sel ? sel.complete && sel.naturalWidth > 0 : (n.imgs || []).some(i => i.complete && i.naturalWidth > 0); }""",
                               timeout=30_000)
        page.screenshot(path=str(shots / f"{mode}-evaluate-graph.png"))
        if not nodes2:  # the template browser's thumbnail candidate (workflows/erasepro_evaluate.jpg)
            b = focus_node(page, "ErasePro_Evaluate")["page"]
            (shots / "thumbnails").mkdir(exist_ok=True)
            page.screenshot(path=str(shots / "thumbnails" / f"{EVALUATE_STEM}.jpg"), type="jpeg", quality=85,
                            clip={"x": b["x"] - 10, "y": b["y"] - 10, "width": b["width"] + 20, "height": b["height"] + 20})
        assert_no_overlap(page, shots, f"{mode}-{EVALUATE_STEM}-after-run")
        if nodes2:  # the grid preview is an <img> in the Vue node, on the screen
            box = page.evaluate("""() => { const n = app.graph._nodes.find(n => n.type === 'ErasePro_Evaluate');
                const r = document.querySelector(`[data-node-id='${n.id}'] img`).getBoundingClientRect();
                return {x: r.left, y: r.top, width: r.width, height: r.height}; }""")
            assert box["width"] > 50 and box["height"] > 50, box
    finally:
        set_nodes2(page, False)
    assert errors.ours == [], errors.ours


SAMPLE_REPORT = {  # the shape the solver sends (erasepro_ops.report): 3 text-encoder sites, 14 cross-attention
    "method": "erasepro", "train_residual": 2.2e-6, "deep_burden": 0.0, "solve_seconds": 61.3, "warnings": [],
    "sites": [{"stage": "shallow", "relative_change": v} for v in (0.49, 0.21, 0.08)]
    + [{"stage": "deep", "relative_change": 0.0}] * 14,
}


@pytest.mark.parametrize("nodes2", [True, False], ids=["nodes2", "classic"])
def test_shipped_layouts_have_no_overlap(nodes2, page, shots, errors):
    """Every shipped workflow loads from the template browser with every node type known and no
    error dialog, and with the solver showing a report (its tallest state) no two nodes overlap, with Nodes 2.0 on (which also rescales a loaded
    classic layout) and off."""
    mode = "nodes2" if nodes2 else "classic"
    set_nodes2(page, nodes2)
    bad = {}
    try:
        for path in WORKFLOWS:
            t0 = time.time()
            load_template(page, path.stem)
            assert missing_node_types(page) == [], f"{path.stem}: node types the front end does not know"
            dialogs = visible_dialog_text(page)
            assert not re.search(r"missing|not found|error", dialogs, re.I), f"{path.stem}: dialog after loading: {dialogs[:1000]}"
            page.evaluate("""([type, report]) => { const n = app.graph._nodes.find(n => n.type === type);
                n.onExecuted({ erasepro_report: [report] }); }""", [SOLVER, SAMPLE_REPORT])
            page.wait_for_function("(type) => app.graph._nodes.find(n => n.type === type)._eraseproDrawn",
                                   arg=SOLVER, timeout=10_000)
            boxes = node_boxes(page)
            (shots / f"{mode}-{path.stem}-layout-boxes.json").write_text(json.dumps(boxes, indent=1), encoding="utf-8")
            if overlaps(boxes):
                bad[path.stem] = overlaps(boxes)
            print(f"\n[browser] layout {mode} {path.stem}: {len(boxes)} nodes, {time.time() - t0:.1f} s")
    finally:
        set_nodes2(page, False)
    assert not bad, f"nodes overlap ({mode}): {bad}; boxes in test-artifacts/browser/{mode}-*-layout-boxes.json"
    assert errors.ours == [], errors.ours


def test_no_errors_from_extension(page, errors):
    """Across the module: no page error and no console error / warning names the extension."""
    assert errors.ours == [], errors.ours
    pageerrors = [e for e in errors.all if e.startswith("pageerror")]
    assert not [e for e in pageerrors if "erasepro" in e.lower()], pageerrors
