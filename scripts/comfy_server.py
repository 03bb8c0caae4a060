#!/usr/bin/env python3
"""Start / stop a real ComfyUI server (loopback only) and run workflows through its HTTP API.

Library use (pytest fixtures, the demo)::

    from comfy_server import ComfyServer, run_workflow, ui_to_api
    with ComfyServer(output_dir="test-artifacts/out") as srv:      # free port, --cpu if no GPU
        info = srv.object_info()                                   # GET /object_info
        api = ui_to_api(json.load(open("workflows/x.json")), info) # UI format -> API format
        hist = run_workflow(srv.base_url, api)                     # POST /prompt, poll /history
        files = output_files(hist, srv.output_dir)

Command line::

    python scripts/comfy_server.py serve [--port 8188]      # foreground, Ctrl-C stops (make serve)
    python scripts/comfy_server.py run WORKFLOW.json        # start, run (UI or API format), stop

The ComfyUI folder is $COMFYUI or <repo>/.comfyui; the interpreter is <repo>/.venv/bin/python
when present. Only flags the ComfyUI at hand declares in comfy/cli_args.py are passed, so an
older ComfyUI works too. Standard library only.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = ("127.0.0.1", "localhost", "::1")

# Widget input types in /object_info ("COMBO" lists are widgets too).
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Options that make the frontend add one extra serialized widget value after the input.
EXTRA_VALUE_OPTIONS = ("control_after_generate", "image_upload", "video_upload", "audio_upload",
                       "animated_image_upload")
# UI-only nodes that never reach the API prompt.
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode", "PrimitiveString", "Group"}


class WorkflowError(RuntimeError):
    """A prompt was rejected (validation) or failed while executing; message has node errors."""

    def __init__(self, message: str, details=None):
        super().__init__(message)
        self.details = details


# ---------------------------------------------------------------------------------------
# Paths and process management
# ---------------------------------------------------------------------------------------
def comfy_dir() -> Path:
    return Path(os.environ.get("COMFYUI") or (REPO / ".comfyui")).expanduser().resolve()


def default_python() -> str:
    v = REPO / ".venv" / "bin" / "python"
    return str(v) if v.exists() else sys.executable


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _supported_flags(cdir: Path) -> set[str]:
    try:
        text = (cdir / "comfy" / "cli_args.py").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    import re
    return set(re.findall(r'add_argument\(\s*"(--[a-z0-9-]+)"', text))


def _default_sigint():
    # A child of a background job inherits SIGINT=ignored; give ComfyUI its Ctrl-C back so
    # SIGINT stops it cleanly (Python turns SIG_DFL into KeyboardInterrupt at startup).
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _want_cpu() -> bool:
    env = os.environ.get("ERASEPRO_CPU")
    if env is not None:
        return env == "1"
    if sys.platform == "darwin":
        return False
    return not (Path("/dev/nvidiactl").exists() or Path("/dev/kfd").exists())


class ComfyServer:
    """A ComfyUI ``main.py`` subprocess on 127.0.0.1:<free port>."""

    def __init__(self, comfy: str | Path | None = None, port: int | None = None, host: str = "127.0.0.1",
                 python: str | None = None, output_dir=None, input_dir=None, temp_dir=None, user_dir=None,
                 log_path=None, cpu: bool | None = None, extra_args=(), env=None):
        if host not in LOOPBACK:
            raise ValueError(f"loopback only (got {host!r})")
        self.comfy = Path(comfy).resolve() if comfy else comfy_dir()
        if not (self.comfy / "main.py").is_file():
            raise FileNotFoundError(f"no ComfyUI main.py in {self.comfy}: run scripts/bootstrap.sh or set COMFYUI")
        self.host = host
        self.port = port or free_port(host)
        self.python = python or default_python()
        self._tmp = None
        if output_dir is None or temp_dir is None or user_dir is None or log_path is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="erasepro-comfy-"))
        self.output_dir = Path(output_dir or self._tmp / "output").resolve()
        self.input_dir = Path(input_dir).resolve() if input_dir else None
        self.temp_dir = Path(temp_dir or self._tmp / "temp").resolve()
        self.user_dir = Path(user_dir or self._tmp / "user").resolve()
        self.log_path = Path(log_path or self._tmp / "comfyui.log").resolve()
        self.cpu = _want_cpu() if cpu is None else cpu
        self.extra_args = list(extra_args)
        self.env = env
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def base_url(self) -> str:
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{h}:{self.port}"

    def command(self) -> list[str]:
        flags = _supported_flags(self.comfy)
        cmd = [self.python, "main.py", "--listen", self.host, "--port", str(self.port)]

        def add(flag, *vals):
            if not flags or flag in flags:
                cmd.extend([flag, *vals])

        add("--disable-auto-launch")
        if self.cpu:
            add("--cpu")
        add("--output-directory", str(self.output_dir))
        add("--temp-directory", str(self.temp_dir))
        add("--user-directory", str(self.user_dir))
        if self.input_dir:
            add("--input-directory", str(self.input_dir))
        if "--database-url" in flags:  # keep concurrent servers off the shared sqlite file
            cmd.extend(["--database-url", "sqlite:///:memory:"])
        return cmd + self.extra_args

    def start(self, timeout: float = 180.0) -> str:
        """Start, wait until /object_info answers; returns the base URL."""
        if self.proc is not None:
            return self.base_url
        for d in (self.output_dir, self.temp_dir, self.user_dir, self.log_path.parent):
            d.mkdir(parents=True, exist_ok=True)
        if self.input_dir:
            self.input_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), cwd=str(self.comfy), stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     start_new_session=True, preexec_fn=_default_sigint)
        atexit.register(self.stop)
        try:
            wait_ready(self.base_url, timeout=timeout, proc=self.proc, log_path=self.log_path)
        except BaseException:
            self.stop()
            raise
        return self.base_url

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGINT (ComfyUI's clean shutdown), then SIGTERM, then SIGKILL; this process only."""
        p, self.proc = self.proc, None
        if p is None:
            return None
        if p.poll() is None:
            for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                try:
                    p.send_signal(sig)
                    p.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    break
        if self._log:
            self._log.close()
            self._log = None
        return p.returncode

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def object_info(self) -> dict:
        return object_info(self.base_url)

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        return run_workflow(self.base_url, prompt, timeout=timeout)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


# ---------------------------------------------------------------------------------------
# HTTP API
# ---------------------------------------------------------------------------------------
def _check_loopback(base_url: str) -> None:
    host = urllib.parse.urlsplit(base_url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"loopback only (got {base_url})")


def http_json(base_url: str, path: str, data=None, timeout: float = 30.0):
    _check_loopback(base_url)
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(base_url.rstrip("/") + path, data=body,
                                 headers={"Content-Type": "application/json"} if body else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode() or "null")


def wait_ready(base_url: str, timeout: float = 180.0, proc=None, log_path=None) -> dict:
    """Poll until GET /object_info answers; raise with the log tail if the process dies."""
    t_end = time.time() + timeout
    last = None
    while time.time() < t_end:
        if proc is not None and proc.poll() is not None:
            tail = ""
            if log_path:
                tail = Path(log_path).read_text(errors="replace")[-4000:]
            raise RuntimeError(f"ComfyUI exited with code {proc.returncode} during startup:\n{tail}")
        try:
            http_json(base_url, "/system_stats", timeout=5)
            return http_json(base_url, "/object_info", timeout=60)
        except (urllib.error.URLError, ConnectionError, OSError, ValueError) as e:
            last = e
            time.sleep(0.25)
    raise TimeoutError(f"ComfyUI at {base_url} did not answer within {timeout:.0f} s ({last})")


def object_info(base_url: str) -> dict:
    return http_json(base_url, "/object_info", timeout=60)


def _format_errors(payload) -> str:
    if not isinstance(payload, dict):
        return str(payload)
    lines = []
    err = payload.get("error")
    if isinstance(err, dict):
        lines.append(f"{err.get('type', 'error')}: {err.get('message', '')} {err.get('details', '')}".strip())
    elif err:
        lines.append(str(err))
    for nid, ne in (payload.get("node_errors") or {}).items():
        ct = ne.get("class_type", "?")
        for e in ne.get("errors", []):
            lines.append(f"node {nid} ({ct}): {e.get('message', '')}: {e.get('details', '')}")
    return "\n".join(lines) or json.dumps(payload)[:2000]


def queue_prompt(base_url: str, prompt: dict, client_id: str | None = None) -> str:
    """POST /prompt; returns prompt_id or raises WorkflowError with the validation errors."""
    try:
        r = http_json(base_url, "/prompt", {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})
    except urllib.error.HTTPError as e:
        try:
            payload = json.loads(e.read().decode())
        except Exception:
            payload = {"error": f"HTTP {e.code}"}
        raise WorkflowError("ComfyUI rejected the prompt:\n" + _format_errors(payload), payload) from None
    if r.get("node_errors"):
        raise WorkflowError("ComfyUI rejected the prompt:\n" + _format_errors(r), r)
    return r["prompt_id"]


def wait_history(base_url: str, prompt_id: str, timeout: float = 600.0, poll: float = 0.2) -> dict:
    """Poll /history/<id> until the prompt completed; raise WorkflowError on execution errors."""
    t_end = time.time() + timeout
    while time.time() < t_end:
        h = http_json(base_url, f"/history/{prompt_id}")
        entry = (h or {}).get(prompt_id)
        if entry:
            st = entry.get("status") or {}
            if st.get("status_str") == "error":
                msgs = []
                for kind, data in st.get("messages", []):
                    if kind in ("execution_error", "execution_interrupted"):
                        msgs.append(f"{kind} in node {data.get('node_id')} ({data.get('node_type')}): "
                                    f"{data.get('exception_type', '')}: {data.get('exception_message', '')}\n"
                                    + "".join(data.get("traceback", []) or [])[-3000:])
                raise WorkflowError("workflow failed:\n" + ("\n".join(msgs) or json.dumps(st)[:2000]), entry)
            if st.get("completed", True) or entry.get("outputs"):
                return entry
        time.sleep(poll)
    raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")


def clear_cache(base_url: str, settle: float = 1.0) -> None:
    """POST /free {"free_memory": true}: the server drops its cached node outputs (and unloads
    models). A queued prompt whose output nodes are all cached executes nothing upstream of them, and
    a node whose output is cached sends no ``ui`` output (no solver report in /history); tests that
    need every node to run clear the cache first. The idle worker wakes on the flag and resets its
    caches within ``settle`` seconds, before it takes the next prompt."""
    http_json(base_url, "/free", {"free_memory": True})
    time.sleep(settle)


def run_workflow(base_url: str, api_prompt: dict, timeout: float = 600.0) -> dict:
    """Queue an API-format prompt and wait; returns its /history entry
    ({"prompt", "outputs": {node_id: {"images": [...]}}, "status"})."""
    pid = queue_prompt(base_url, api_prompt)
    return wait_history(base_url, pid, timeout=timeout)


def output_files(history: dict, output_dir, kind: str = "output") -> list[Path]:
    """Paths of the files (images etc.) a history entry says were written to ``output_dir``."""
    out = []
    for node_out in (history.get("outputs") or {}).values():
        for items in node_out.values():
            if not isinstance(items, list):
                continue
            for it in items:
                if isinstance(it, dict) and "filename" in it and it.get("type", kind) == kind:
                    out.append(Path(output_dir) / it.get("subfolder", "") / it["filename"])
    return out


# ---------------------------------------------------------------------------------------
# UI workflow -> API prompt
# ---------------------------------------------------------------------------------------
def _input_specs(info: dict):
    """[(name, type, options)] in /object_info order: required then optional."""
    specs = []
    inp = info.get("input", {})
    order = info.get("input_order") or {}
    for section in ("required", "optional"):
        sec = inp.get(section) or {}
        names = order.get(section) or list(sec.keys())
        for name in names:
            spec = sec.get(name)
            if spec is None:
                continue
            typ = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
            opts = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
            specs.append((name, typ, opts))
    return specs


def _is_widget(typ, opts) -> bool:
    if opts.get("forceInput"):
        return False
    return isinstance(typ, list) or typ in WIDGET_TYPES


def _extra_values(name: str, typ, opts) -> int:
    n = 0
    if typ in ("INT", "FLOAT") and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
        n += 1
    elif any(opts.get(k) for k in EXTRA_VALUE_OPTIONS if k != "control_after_generate"):
        n += 1
    return n


def _links(workflow: dict) -> dict:
    """link id → (origin id, origin slot, target id, target slot, type), from either link format."""
    links = {}
    for l in workflow.get("links", []):
        if isinstance(l, dict):
            links[int(l["id"])] = (int(l["origin_id"]), int(l["origin_slot"]), int(l["target_id"]), int(l["target_slot"]), l.get("type"))
        else:
            links[int(l[0])] = (int(l[1]), int(l[2]), int(l[3]), int(l[4]), l[5] if len(l) > 5 else None)
    return links


def _input_link(node: dict, name: str):
    for i in node.get("inputs") or []:
        if i.get("name") == name and i.get("link") is not None:
            return int(i["link"])
    return None


def _resolve(link_id, links: dict, nodes: dict, depth: int = 0):
    """Follow a link back through Reroutes and bypassed nodes: (origin_id, slot) or
    ('value', v) for a PrimitiveNode, or None when it ends in a muted node."""
    if depth > 100 or link_id not in links:
        return None
    oid, oslot, _, _, ltype = links[link_id]
    src = nodes.get(oid)
    if src is None:
        return None
    t = src.get("type")
    if t == "Reroute":
        ins = src.get("inputs") or []
        return _resolve(int(ins[0]["link"]), links, nodes, depth + 1) if ins and ins[0].get("link") is not None else None
    if t in ("PrimitiveNode",):
        wv = src.get("widgets_values") or []
        return ("value", wv[0] if wv else None)
    mode = src.get("mode", 0)
    if mode == 2:
        return None
    if mode == 4:  # bypass: pass through the first input of the same type
        out_type = ((src.get("outputs") or [{}])[oslot] or {}).get("type", ltype)
        for i in src.get("inputs") or []:
            if i.get("link") is not None and (i.get("type") == out_type):
                return _resolve(int(i["link"]), links, nodes, depth + 1)
        return None
    return (str(oid), oslot)


def _node_inputs(node: dict, info: dict, links: dict, nodes: dict) -> dict:
    """One node's API inputs: its widget values in /object_info order, then its linked sockets."""
    wv = node.get("widgets_values")
    inputs = {}
    pos = 0
    for name, typ, opts in _input_specs(info):
        if _is_widget(typ, opts):
            if isinstance(wv, dict):
                if name in wv:
                    inputs[name] = wv[name]
            elif wv is not None and pos < len(wv):
                inputs[name] = wv[pos]
                pos += 1 + _extra_values(name, typ, opts)
        lid = _input_link(node, name)
        if lid is not None:
            r = _resolve(lid, links, nodes)
            if r is None:
                pass  # origin muted: a widget keeps its own value, a socket stays unset
            elif r[0] == "value":
                inputs[name] = r[1]
            else:
                inputs[name] = [r[0], r[1]]
    return inputs


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a ComfyUI UI-format workflow (``nodes``/``links``/``widgets_values``) into the API
    prompt format, using /object_info input order. Handles control_after_generate and upload
    widget values, widgets converted to inputs, Reroute / PrimitiveNode, muted (mode 2) and
    bypassed (mode 4) nodes. Notes are dropped."""
    if "nodes" not in workflow:
        if all(isinstance(v, dict) and "class_type" in v for v in workflow.values()):
            return workflow  # already API format
        raise ValueError("not a UI-format workflow (no 'nodes')")
    if (workflow.get("definitions") or {}).get("subgraphs"):
        raise NotImplementedError("subgraphs are not supported by ui_to_api")
    nodes = {int(n["id"]): n for n in workflow["nodes"]}
    links = _links(workflow)
    unknown = sorted({n["type"] for n in nodes.values()
                      if n.get("type") not in VIRTUAL_NODES and n.get("mode", 0) not in (2, 4)
                      and n.get("type") not in object_info})
    if unknown:
        raise KeyError(f"node types not known to this ComfyUI (missing custom nodes?): {unknown}")
    prompt = {}
    for nid, node in sorted(nodes.items()):
        t = node.get("type")
        if t in VIRTUAL_NODES or node.get("mode", 0) in (2, 4):
            continue
        entry = {"class_type": t, "inputs": _node_inputs(node, object_info[t], links, nodes)}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        prompt[str(nid)] = entry
    return prompt


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Start ComfyUI (with this pack linked) or run a workflow.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run ComfyUI in the foreground for the browser")
    s.add_argument("--port", type=int, default=8188)
    s.add_argument("--host", default="127.0.0.1", choices=LOOPBACK)
    s.add_argument("--output-directory", default=str(REPO / "output"))
    r = sub.add_parser("run", help="start a server, run a workflow file (UI or API format), stop")
    r.add_argument("workflow")
    r.add_argument("--port", type=int, default=None)
    r.add_argument("--output-directory", default=str(REPO / "output"))
    r.add_argument("--timeout", type=float, default=600)
    a = ap.parse_args(argv)

    if a.cmd == "serve":
        srv = ComfyServer(port=a.port, host=a.host, output_dir=a.output_directory)
        cmd = srv.command()
        # in the foreground, with ComfyUI's own (persistent) user/temp folders and database
        for flag in ("--database-url", "--temp-directory", "--user-directory"):
            if flag in cmd:
                i = cmd.index(flag)
                del cmd[i:i + 2]
        Path(a.output_directory).mkdir(parents=True, exist_ok=True)
        print(f"[comfy_server] ComfyUI {srv.comfy} on {srv.base_url}  (Ctrl-C stops)", flush=True)
        print("[comfy_server] " + " ".join(cmd), flush=True)
        p = subprocess.Popen(cmd, cwd=str(srv.comfy), preexec_fn=_default_sigint)

        def forward(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGHUP, forward)
        signal.signal(signal.SIGINT, forward)
        try:
            return p.wait()
        except KeyboardInterrupt:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
            try:
                return p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                return p.wait()

    wf = json.loads(Path(a.workflow).read_text())
    with ComfyServer(port=a.port, output_dir=a.output_directory) as srv:
        info = srv.object_info()
        prompt = ui_to_api(wf, info)
        t0 = time.time()
        hist = run_workflow(srv.base_url, prompt, timeout=a.timeout)
        print(f"[comfy_server] done in {time.time() - t0:.1f} s")
        for f in output_files(hist, srv.output_dir):
            print(f"[comfy_server] wrote {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
