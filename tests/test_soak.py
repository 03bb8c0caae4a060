"""Soak: many solves through a real ComfyUI server's HTTP API, interrupts, and two servers sharing
one retain-weightings folder. Marked ``soak``: CI runs it as its own step (``pytest -m soak``),
never skipped; the quick suite may leave it out with ``-m "not soak"``.

Every server is a real ComfyUI 0.3.75 (``comfy_server.ComfyServer``: loopback, ``--cpu`` without
a GPU) on the tiny random-weight SD1.5 checkpoint (full 12-layer CLIP-L, tiny UNet), with its own
temp and output folders and its own loras folder (an extra model paths file with ``is_default``:
Save ErasePro Edit writes into this test's temporary folder, never into ``.comfyui/models``). The
retain bank's weightings live in ``<--user-directory>/__erasepro/weightings``. Each prompt is
Load Checkpoint → Concept Pair → Progressive Solver → Save ErasePro Edit (float32). The solves are
kept cheap on purpose — ``progressive_layers`` 1 and one custom template, ``"a painting by {}"``
(plus the bare concept), the rest at the node's defaults (retain bank on, empty prompt kept) — and
still use the weightings cache: block 0's file, and the bridge block 11's for a concept whose
token count differs from the anchor's (``WEIGHTING_FILES`` = 2, 36 MiB each). The solves alternate
the two shallow rules (``RULES``) so that the edits compared also hold UNet K/V sites.

(a) ``test_many_solves_with_interrupts_on_one_server``: one server, 30 solves of different
concepts (``CONCEPTS``); 3 of them (``INTERRUPTED``) are first interrupted mid-solve — POST
/interrupt for that prompt as soon as the solver's progress (on the websocket) reaches
``INTERRUPT_AT`` of its 16 sites: the shallow sites are done (block 0, and the bridge solved or
skipped), the UNet's are not — then queued again. Checked:

- every run succeeds; every interrupted one stops as *interrupted* in the solver node (no
  ``execution_error``) and saves no file; the server log has no traceback after start-up;
- memory: the server's VmRSS is read after each solve. From the end of the ``WARMUP`` (3) solves
  (checkpoint loaded, both weightings built, a bridge solve done) to the last it may grow by at
  most ``RSS_GROWTH_MIB`` (64 MiB), and its least-squares slope over those solves must stay below
  ``RSS_SLOPE_MIB`` (1 MiB per solve). Why: keeping anything per solve — an edit (1.5–9 MiB
  here), the report chart, a weighting (36 MiB) — shows as more than that, while measured here the
  RSS after the warm-up moved by less than 10 MiB over the 27 solves (slope ≤ 0.15 MiB/solve);
- the weightings folder never holds more than ``WeightingCache.max_bytes`` (the pack's default,
  2 GiB; the pack has no setting to start a server with a smaller one), and at the end exactly the
  two site files, each reading back through the cache's own loader, no ``*.partial`` left;
- the last solve's edit, and each one solved again after an interrupt, equals tensor by tensor
  and bit for bit a fresh server's edit of the same solve (``reference``: a second ComfyUI process
  started afterwards with an empty user folder, so it builds its weightings itself). Equal by
  construction: same interpreter, same ComfyUI flags (``--cpu``: same device and dtypes), same
  torch thread count (the machine's cores), same file, and each solve reads the stored float32
  weighting either way. A server that drifts after 30 solves and 3 interrupts (state kept between
  solves, a half-built weighting kept after an interrupt) would not give the same bits.

(b) ``test_two_servers_share_one_weightings_folder``: two servers with one ``--user-directory``
and an empty weightings folder, each given two prompts at once (``SHARED``: a bridge concept
first, so both find no file and build and write the same two files while the other does). A
watcher polls the folder meanwhile and reads back every finished file as it appears (a reader
never sees a half-written one); each writer's rename puts a new file in place, so a file written
by both servers is read twice. Checked: the two first solves overlap in time, at least one file was
written by both, every file reads back, no ``*.partial`` is left, and every edit equals the
reference server's edit of the same solve bit for bit.

Wall time: 4 server starts and 40 solves; see the printed figures (a few minutes on an idle
2-core machine, several times that while other test runs share the cores).
"""
from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import comfy_host
import comfy_server as cs
from erasepro_ops.weighting_cache import WeightingCache

pytestmark = pytest.mark.soak

# --- the solves -------------------------------------------------------------------------------
SOLVER, SAVER = "3", "4"  # node ids in solve_prompt()
ANCHOR = "a painting"
TEMPLATE = "a painting by {}"
PROGRESSIVE_LAYERS = 1
# The published rule leaves the residual stream's gap to the UNet's K/V sites, so a concept with
# the anchor's token count edits them too; the default rule (and any bridge) closes it in the text
# encoder and the UNet is left unedited. The solves alternate, so the edits compared hold both.
RULES = ("residual_schedule", "anchor_features")
CONCEPTS = ["van gogh", "rembrandt", "claude monet", "pablo picasso", "salvador dali", "frida kahlo",
            "gustav klimt", "edvard munch", "hokusai", "andy warhol", "jackson pollock", "henri matisse",
            "paul cezanne", "georgia o'keeffe", "caravaggio", "johannes vermeer", "wassily kandinsky", "joan miro",
            "rene magritte", "francisco goya", "william turner", "paul gauguin", "egon schiele",
            "amedeo modigliani", "marc chagall", "roy lichtenstein", "keith haring", "jean-michel basquiat",
            "alphonse mucha", "edward hopper"]
# "rembrandt" (one token; the anchor has two) needs the bridge: both weightings are built in the
# warm-up. The last, "edward hopper" (two tokens, anchor_features), edits the UNet's K/V sites.
INTERRUPTED = (8, 17, 26)  # indices into CONCEPTS: interrupted mid-solve first, then queued again
INTERRUPT_AT = 2  # the solver's progress (sites done, a skipped bridge counting as done) to interrupt at
SHARED = (("rembrandt", "caravaggio"), ("hokusai", "caravaggio"))  # (b): each server's two prompts, bridges first
SHARED_RULE = "anchor_features"

# --- the bounds (see the module docstring) ----------------------------------------------------
WARMUP = 3
RSS_GROWTH_MIB = 64.0
RSS_SLOPE_MIB = 1.0
WEIGHTING_FILES = 2  # block 0 (S = 1) and the bridge block 11
MAX_BYTES = WeightingCache().max_bytes


# --- servers ----------------------------------------------------------------------------------
def start_server(root: Path, name: str, user_dir: Path | None = None) -> cs.ComfyServer:
    """A ComfyServer with its folders under ``root/name`` (the user folder ``user_dir`` when given)
    and its own default loras folder, where Save ErasePro Edit writes."""
    home = root / name
    loras = home / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    paths = home / "extra_model_paths.yaml"
    paths.write_text(f"erasepro_soak:\n  is_default: true\n  loras: {json.dumps(str(loras))}\n", encoding="utf-8")
    srv = cs.ComfyServer(output_dir=home / "output", temp_dir=home / "temp", user_dir=user_dir or home / "user",
                         log_path=home / "comfyui.log", extra_args=["--extra-model-paths-config", str(paths)])
    srv.loras = loras
    srv.start(timeout=300)
    srv.log_start = len(srv.log_text())  # ComfyUI's own start-up may log tracebacks (optional extras)
    return srv


def weightings_dir(srv: cs.ComfyServer) -> Path:
    """``erasepro_comfy.host.cache_directory()`` as that server sees it."""
    return srv.user_dir / "__erasepro" / "weightings"


def rss_mib(srv: cs.ComfyServer) -> float:
    for line in Path(f"/proc/{srv.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def log_problems(srv: cs.ComfyServer) -> list[str]:
    """Tracebacks and failed nodes in the server's log since it was ready."""
    return [line for line in srv.log_text()[srv.log_start:].splitlines()
            if "Traceback" in line or "!!! Exception during processing" in line]


# --- prompts ----------------------------------------------------------------------------------
def slug(target: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", target.lower()).strip("_")


def solve_prompt(target: str, rule: str, prefix: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": comfy_host.TINY_CHECKPOINT_NAME}},
        "2": {"class_type": "ErasePro_ConceptPair",
              "inputs": {"target": target, "anchor": ANCHOR, "concept_type": "custom", "prompts": TEMPLATE}},
        SOLVER: {"class_type": "ErasePro_ProgressiveSolver",
                 "inputs": {"model": ["1", 0], "clip": ["1", 1], "concepts": ["2", 0],
                            "progressive_layers": PROGRESSIVE_LAYERS, "method": "erasepro", "shallow_rule": rule}},
        SAVER: {"class_type": "ErasePro_SaveEdit",
                "inputs": {"edit": [SOLVER, 0], "filename_prefix": prefix, "dtype": "float32"}},
    }


def outcome(srv: cs.ComfyServer, prompt_id: str, timeout: float = 900.0) -> dict:
    """The prompt's /history entry once it has finished, whatever its status (never raises on it)."""
    t_end = time.time() + timeout
    while time.time() < t_end:
        entry = (cs.http_json(srv.base_url, f"/history/{prompt_id}") or {}).get(prompt_id)
        if entry and (entry.get("status") or {}).get("completed") is not None:
            return entry
        time.sleep(0.1)
    raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")


def messages(entry: dict, kind: str) -> list[dict]:
    return [data for k, data in (entry.get("status") or {}).get("messages", []) if k == kind]


def executed_between(entry: dict) -> tuple[float, float]:
    """(start, end) of a finished prompt in seconds, from its status messages' timestamps."""
    stamps = [data["timestamp"] for _, data in entry["status"]["messages"] if "timestamp" in data]
    return min(stamps) / 1000, max(stamps) / 1000


def succeeded(entry: dict) -> dict:
    """The solver's report of a run, which must have succeeded."""
    st = entry.get("status") or {}
    assert st.get("status_str") == "success", f"run failed: {json.dumps(st)[:3000]}"
    assert not messages(entry, "execution_error")
    return entry["outputs"][SOLVER]["erasepro_report"][0]


def saved_edit(srv: cs.ComfyServer, prefix: str) -> Path:
    files = sorted(srv.loras.glob(f"{prefix}_*_.safetensors"))
    assert len(files) == 1, f"{prefix}: {files}"
    return files[0]


def solve(srv: cs.ComfyServer, target: str, rule: str, prefix: str) -> tuple[Path, dict]:
    """Solve ``target`` on ``srv``: the saved edit file and the solver's report."""
    entry = outcome(srv, cs.queue_prompt(srv.base_url, solve_prompt(target, rule, prefix)))
    return saved_edit(srv, prefix), succeeded(entry)


def interrupt_mid_solve(srv: cs.ComfyServer, prompt: dict, timeout: float = 900.0):
    """Queue ``prompt`` and POST /interrupt for it as soon as the solver's progress (``progress``
    messages on the websocket) reaches ``INTERRUPT_AT``: ``(prompt id, (value, max))``, or None for
    the progress when the run ended before that."""
    async def go():
        client_id = uuid.uuid4().hex
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{srv.base_url}/ws?clientId={client_id}") as ws:
                pid = cs.queue_prompt(srv.base_url, prompt, client_id)
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        continue
                    m = json.loads(msg.data)
                    data = m.get("data") or {}
                    if data.get("prompt_id") != pid:
                        continue
                    if m.get("type") == "progress" and data.get("node") == SOLVER and data["value"] >= INTERRUPT_AT:
                        cs.http_json(srv.base_url, "/interrupt", {"prompt_id": pid})
                        return pid, (data["value"], data["max"])
                    if m.get("type") in ("execution_success", "execution_error", "execution_interrupted"):
                        return pid, None
        raise AssertionError("the websocket closed before the run ended")
    return asyncio.run(asyncio.wait_for(go(), timeout))


# --- edits and weighting files ----------------------------------------------------------------
def assert_same_edit(a: Path, b: Path) -> list[str]:
    """The two edit files hold the same tensors, bit for bit; returns their names."""
    ta, tb = load_file(str(a)), load_file(str(b))
    assert sorted(ta) == sorted(tb), f"{a.name} and {b.name} edit different layers"
    differ = [k for k in ta if ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape
              or not torch.equal(ta[k].reshape(-1).view(torch.uint8), tb[k].reshape(-1).view(torch.uint8))]
    assert not differ, f"{a.name} and {b.name} differ in {len(differ)} tensors, e.g. {differ[:3]}"
    return sorted(ta)


class _StoredKey:
    """A key that reprs as the text a weighting file stores (the cache names and checks files by repr)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def read_back(path: Path):
    """The weighting in ``path``, read through the cache's own loader under the key its metadata
    names (which must also be the key its file name is made from); AssertionError when the cache
    would not use it (damaged, truncated, content not matching its checksum, misnamed)."""
    with safe_open(str(path), framework="pt") as f:
        key = _StoredKey((f.metadata() or {}).get("key", ""))
    cache = WeightingCache(max_bytes=1 << 62, directory=path.parent)
    assert cache.path(key) == path, f"{path.name} is not named for the key it holds"

    def refuse(missing):
        raise AssertionError(f"{path.name} does not read back as the weighting it holds")

    return cache.get([key], refuse)[0]()


def weighting_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("weighting-*.safetensors"))


def check_folder(folder: Path) -> int:
    """Every weighting file reads back and none is half-written; returns the folder's total bytes."""
    partial = sorted(p.name for p in folder.glob("*.partial"))
    assert not partial, f"left behind: {partial}"
    for path in weighting_files(folder):
        assert read_back(path) is not None, path.name
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


class FolderWatch(threading.Thread):
    """Polls a weightings folder while servers write to it: the writer pids in ``*.partial`` names,
    and every finished file read back as soon as it appears. Each writer's rename puts a new inode
    under the file's name, so ``written`` counts the files put in place (a file written by both
    servers counts twice)."""

    def __init__(self, folder: Path, every: float = 0.02):
        super().__init__(daemon=True)
        self.folder, self.every, self.halt = folder, every, threading.Event()
        self.partial_pids, self.written, self.failures, self._inode = set(), 0, [], {}

    def run(self):
        while not self.halt.wait(self.every):
            try:
                names = list(self.folder.iterdir())
            except OSError:
                continue
            for path in names:
                if path.name.endswith(".partial"):
                    self.partial_pids.add(path.name.split(".")[-2])
                    continue
                try:
                    inode = path.stat().st_ino
                except OSError:
                    continue
                if path.suffix != ".safetensors" or self._inode.get(path.name) == inode:
                    continue
                try:
                    read_back(path)
                    if path.stat().st_ino != inode:
                        continue  # replaced while it was read: counted when the new one is read
                except FileNotFoundError:
                    continue
                except Exception as e:  # noqa: BLE001  (reported by the test)
                    self.failures.append(f"{path.name}: {e!r}")
                self._inode[path.name] = inode
                self.written += 1

    def stop(self):
        self.halt.set()
        self.join(30)


# --- statistics -------------------------------------------------------------------------------
def slope(ys: list[float]) -> float:
    """Least-squares slope of ``ys`` against 0, 1, 2, …"""
    n = len(ys)
    mx, my = (n - 1) / 2, sum(ys) / n
    return sum((x - mx) * (y - my) for x, y in enumerate(ys)) / sum((x - mx) ** 2 for x in range(n))


# --- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def soak_root(tmp_path_factory, tiny_checkpoint) -> Path:
    return tmp_path_factory.mktemp("soak")


@pytest.fixture(scope="module")
def reference(soak_root):
    """A single fresh server (its own empty user folder) that gives each solve's reference edit,
    started when first needed: ``reference(target, rule)`` → its saved edit file (solved once)."""
    state, edits = {}, {}

    def edit_of(target: str, rule: str) -> Path:
        if "srv" not in state:
            state["srv"] = start_server(soak_root, "reference")
        if (target, rule) not in edits:
            edits[target, rule], _ = solve(state["srv"], target, rule, f"reference/{slug(target)}_{rule}")
        return edits[target, rule]

    yield edit_of
    if "srv" in state:
        srv = state["srv"]
        srv.stop()
        assert not log_problems(srv), "\n".join(log_problems(srv))


# --- (a) --------------------------------------------------------------------------------------
def interrupt_then_check(srv: cs.ComfyServer, target: str, rule: str, prefix: str) -> tuple[int, int]:
    """Run ``target`` and interrupt it mid-solve: it must stop as interrupted in the solver, with no
    error and no file saved. Returns the solver's progress when the interrupt was sent."""
    pid, progress = interrupt_mid_solve(srv, solve_prompt(target, rule, prefix))
    entry = outcome(srv, pid)
    assert progress is not None and progress[0] < progress[1], \
        f"{target}: the solve ended before its progress reached {INTERRUPT_AT} with sites left ({progress})"
    stopped = messages(entry, "execution_interrupted")
    assert entry["status"]["status_str"] == "error" and len(stopped) == 1, json.dumps(entry["status"])[:3000]
    assert stopped[0]["node_type"] == "ErasePro_ProgressiveSolver", stopped[0]
    assert not messages(entry, "execution_error"), "an interrupt must not show as an error"
    assert not list(srv.loras.glob(f"{prefix}_*")), "an interrupted solve saved an edit"
    return progress


def rss_figures(rss: list[float]) -> dict:
    """RSS after the warm-up, at the end, the growth between, the fitted slope per solve and the
    means of the first and second half of the solves after the warm-up."""
    after = rss[WARMUP - 1:]
    half = len(after) // 2
    return {"after_first_solve": rss[0], "after_warmup": after[0], "end": rss[-1], "max": max(rss),
            "growth_after_warmup": after[-1] - after[0], "slope_per_solve": slope(after),
            "first_half_mean": sum(after[:half]) / half, "second_half_mean": sum(after[-half:]) / half}


def write_figures(artifacts_dir: Path, name: str, figures: dict) -> None:
    (artifacts_dir / "soak").mkdir(parents=True, exist_ok=True)
    (artifacts_dir / "soak" / f"{name}.json").write_text(json.dumps(figures, indent=1, default=str))


def test_many_solves_with_interrupts_on_one_server(soak_root, reference, artifacts_dir):
    t0 = time.time()
    srv = start_server(soak_root, "single")
    start_s = time.time() - t0
    folder = weightings_dir(srv)
    rows, interrupts, sizes = [], {}, []
    try:
        for i, target in enumerate(CONCEPTS):
            rule, prefix = RULES[i % 2], f"single/{i:02d}_{slug(target)}"
            if i in INTERRUPTED:
                interrupts[target] = interrupt_then_check(srv, target, rule, prefix)
            t = time.time()
            path, report = solve(srv, target, rule, prefix)  # (again, after an interrupt)
            rows.append({"target": target, "rule": rule, "wall_s": time.time() - t, "solve_s": report["solve_seconds"],
                         "sites": len(report["sites"]), "rss_mib": rss_mib(srv), "edit": path})
            sizes.append(check_folder(folder))
        log = srv.log_text()[srv.log_start:]
        problems = log_problems(srv)
    finally:
        srv.stop()
    solves_s = time.time() - t0 - start_s
    files = weighting_files(folder)

    t = time.time()
    compared = [rows[i] for i in INTERRUPTED] + [rows[-1]]  # the solves queued again after an interrupt, the last
    fresh = [reference(r["target"], r["rule"]) for r in compared]
    fresh_s = time.time() - t

    rss = rss_figures([r["rss_mib"] for r in rows])
    walls = sorted(r["wall_s"] for r in rows)
    write_figures(artifacts_dir, "single_server", {
        "solves": len(rows), "interrupted_at_site": interrupts, "rss_mib": rss,
        "weightings": {"files": len(files), "bytes": sizes[-1], "max_bytes_seen": max(sizes), "max_bytes": MAX_BYTES},
        "wall_s": {"server_start": start_s, "solves": solves_s, "per_solve_median": walls[len(walls) // 2],
                   "fresh_server_and_its_solves": fresh_s},
        "per_solve": [{k: v for k, v in r.items() if k != "edit"} for r in rows]})
    print(f"\n[soak a] {len(rows)} solves, {len(interrupts)} of them interrupted first (at site "
          f"{', '.join(f'{v}/{m}' for v, m in interrupts.values())}): {solves_s:.0f} s (median "
          f"{walls[len(walls) // 2]:.1f} s per solve), server start {start_s:.0f} s, fresh server + "
          f"{len(compared)} solves {fresh_s:.0f} s; RSS {rss['after_first_solve']:.0f} MiB after the first solve, "
          f"{rss['after_warmup']:.0f} after the warm-up, {rss['end']:.0f} at the end (max {rss['max']:.0f}): "
          f"growth {rss['growth_after_warmup']:+.1f} MiB, slope {rss['slope_per_solve']:+.2f} MiB/solve, "
          f"halves {rss['first_half_mean']:.0f} / {rss['second_half_mean']:.0f}; weightings {len(files)} files, "
          f"{sizes[-1] / 2**20:.1f} MiB (at most {max(sizes) / 2**20:.1f}; limit {MAX_BYTES / 2**20:.0f} MiB)")

    assert not problems, "server log:\n" + "\n".join(problems)
    assert log.count("Processing interrupted") == len(INTERRUPTED)
    assert max(sizes) <= MAX_BYTES
    assert len(files) == WEIGHTING_FILES, [p.name for p in files]
    assert rss["growth_after_warmup"] <= RSS_GROWTH_MIB, f"RSS grew after the warm-up: {rss}"
    assert rss["slope_per_solve"] <= RSS_SLOPE_MIB, f"RSS grows with the solves: {rss}"
    for row, edit in zip(compared, fresh):
        names = assert_same_edit(row["edit"], edit)
    assert any(n.startswith("lora_te_") for n in names) and any(n.startswith("lora_unet_") for n in names), names
    print(f"[soak a] the last edit and the {len(INTERRUPTED)} solved after an interrupt equal the fresh server's "
          f"bit for bit (the last: {len(names)} tensors, text encoder and UNet)")


# --- (b) --------------------------------------------------------------------------------------
def start_pair(root: Path, user_dir: Path) -> list[cs.ComfyServer]:
    """Two servers on one user folder, started together."""
    with ThreadPoolExecutor(2) as pool:
        starts = [pool.submit(start_server, root, name, user_dir) for name in ("left", "right")]
    servers = [s.result() for s in starts if s.exception() is None]
    if len(servers) < 2:
        for srv in servers:
            srv.stop()
        raise next(s.exception() for s in starts if s.exception() is not None)
    return servers


def test_two_servers_share_one_weightings_folder(soak_root, reference, artifacts_dir):
    t0 = time.time()
    shared_user = soak_root / "shared-user"
    folder = shared_user / "__erasepro" / "weightings"
    servers = start_pair(soak_root, shared_user)
    start_s = time.time() - t0
    pids = [str(srv.proc.pid) for srv in servers]
    watch = FolderWatch(folder)
    watch.start()
    try:
        queued = []  # (server, target, prefix, prompt id), both servers' queues filled at once
        for srv, targets in zip(servers, SHARED):
            for target in targets:
                prefix = f"shared/{srv.log_path.parent.name}_{slug(target)}"
                queued.append((srv, target, prefix,
                               cs.queue_prompt(srv.base_url, solve_prompt(target, SHARED_RULE, prefix))))
        entries = [outcome(srv, pid) for srv, _, _, pid in queued]
        problems = [line for srv in servers for line in log_problems(srv)]
    finally:
        watch.stop()
        for srv in servers:
            srv.stop()
    solves_s = time.time() - t0 - start_s
    firsts = [executed_between(entries[0]), executed_between(entries[len(SHARED[0])])]
    overlap = min(end for _, end in firsts) - max(start for start, _ in firsts)
    size = check_folder(folder)
    files = weighting_files(folder)
    write_figures(artifacts_dir, "shared_folder", {
        "first_solves_overlap_s": overlap, "partial_writers_seen": sorted(watch.partial_pids), "server_pids": pids,
        "files_read_back_as_they_appeared": watch.written, "weightings": {"files": len(files), "bytes": size},
        "wall_s": {"servers_start": start_s, "solves": solves_s}})
    print(f"\n[soak b] two servers, {len(entries)} solves ({solves_s:.0f} s, start {start_s:.0f} s), first solves "
          f"overlapping {overlap:.1f} s; *.partial seen from {len(watch.partial_pids)} of the 2 server pids; "
          f"{watch.written} finished files read back as they appeared; folder {len(files)} files, "
          f"{size / 2**20:.1f} MiB")

    for entry in entries:
        succeeded(entry)
    assert not problems, "server logs:\n" + "\n".join(problems)
    assert overlap > 0, f"the two first solves did not overlap: {firsts}"
    assert not watch.failures, watch.failures
    assert watch.written > WEIGHTING_FILES, \
        f"no weighting file was written by both servers (files seen {watch.written}): they did not race"
    assert watch.partial_pids <= set(pids), (watch.partial_pids, pids)
    assert len(files) == WEIGHTING_FILES and size <= MAX_BYTES, [p.name for p in files]
    t = time.time()
    names = [n for srv, target, prefix, _ in queued
             for n in assert_same_edit(saved_edit(srv, prefix), reference(target, SHARED_RULE))]
    assert any(n.startswith("lora_unet_") for n in names), "no edit compared touches the UNet"
    print(f"[soak b] every edit equals the single server's bit for bit ({time.time() - t:.0f} s for the references)")
