"""Seeded fuzz of workflow JSON (one of three fuzz families; the shared parts: fuzz_support.py).

The shipped ``workflows/*.json`` and every version of them in git history. Unmutated, each
converts with ``comfy_server.ui_to_api``, each ErasePro widget value has its input's own type,
and it passes ComfyUI's ``execution.validate_prompt`` and the pack's input checks. Mutated
(widget values of wrong types / out of range / missing, unknown inputs, removed links and nodes,
muted nodes, rewired slots, API inputs replaced): accepted (then the pack's own checks accept or
refuse it with an EraseProError) or answered with validation messages; never an exception
escaping, never one raised in the pack's code while ComfyUI validates.

The mutations are drawn from ``SEED``, the same on every run; the test prints its count and outcome
tally and asserts it ran at least its floor.
"""
from __future__ import annotations

import asyncio
import copy
import json
import random
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

import comfy_host as H
from fuzz_support import SEED, Tally, quiet_logs
from test_export import pack  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]

# Floor: the family must try at least this many cases (the count is printed).
WORKFLOW_FLOOR = 1500

# comfy_extras nodes the shipped workflows use (a running ComfyUI loads them at start-up)
EXTRA_NODES = {"EmptySD3LatentImage": ("comfy_extras.nodes_sd3", "EmptySD3LatentImage"),
               "FluxGuidance": ("comfy_extras.nodes_flux", "FluxGuidance"),
               "CheckpointSave": ("comfy_extras.nodes_model_merging", "CheckpointSave")}
MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".gguf")
PACK_DIRS = tuple(str(REPO / d) for d in ("nodes", "erasepro_ops", "erasepro_comfy"))


def git(*args: str) -> str:
    """git's output in the checkout; "" without git or a history (then only the files as they are)."""
    try:
        r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=60)
    except OSError:
        return ""
    return r.stdout if r.returncode == 0 else ""


def workflow_versions() -> dict[str, dict]:
    """label -> UI workflow: workflows/*.json as checked out, then every other version in git history."""
    out, seen = {}, set()

    def add(label: str, text: str) -> None:
        if text and text not in seen:
            seen.add(text)
            out[label] = json.loads(text)

    for p in sorted((REPO / "workflows").glob("*.json")):
        add(f"{p.name} (checkout)", p.read_text(encoding="utf-8"))
    for rev in git("log", "--all", "--format=%h", "--", "workflows/").split():
        for path in git("ls-tree", "--name-only", rev, "workflows/").split():
            if path.endswith(".json"):
                add(f"{Path(path).name} @ {rev}", git("show", f"{rev}:{path}"))
    return out


def widget_values(node: dict) -> list:
    wv = node.get("widgets_values")
    return list(wv.values()) if isinstance(wv, dict) else list(wv or [])


def node_info(cls) -> dict:
    """A node's /object_info entry as ComfyUI's server builds it (the parts ui_to_api reads)."""
    from comfy_api.internal import _ComfyNodeInternal
    if issubclass(cls, _ComfyNodeInternal):
        return cls.GET_NODE_INFO_V1()
    types = cls.INPUT_TYPES()
    return {"input": types, "input_order": {k: list(v) for k, v in types.items()}, "output": cls.RETURN_TYPES}


@dataclass
class ComfyEnv:
    """ComfyUI in process, as a server with this pack sees it: node classes, /object_info, validation."""

    pack: object
    execution: object
    info: dict  # class_type -> /object_info entry, for every node type the workflows use
    loop: asyncio.AbstractEventLoop
    versions: dict

    def specs(self, class_type: str) -> dict:
        """input name -> (type, options) of a node type."""
        inp = self.info[class_type]["input"]
        return {k: (v[0], v[1] if len(v) > 1 and isinstance(v[1], dict) else {})
                for sec in ("required", "optional") for k, v in (inp.get(sec) or {}).items()}

    def validate(self, prompt: dict):
        return self.loop.run_until_complete(self.execution.validate_prompt("fuzz", prompt, None))


@pytest.fixture(scope="module")
def comfy_env(pack):
    """ComfyUI's node table with this pack and the extras the workflows use, and every model file the
    workflows name listed in its folders (validation never opens them)."""
    import importlib
    import execution
    import folder_paths
    nodes = H.comfy_nodes()
    versions = workflow_versions()
    mapping = dict(nodes.NODE_CLASS_MAPPINGS)
    mapping.update(pack.NODE_CLASS_MAPPINGS)
    for name, (module, cls) in EXTRA_NODES.items():
        mapping.setdefault(name, getattr(importlib.import_module(module), cls))
    files = {v for wf in versions.values() for n in wf["nodes"] for v in widget_values(n)
             if isinstance(v, str) and v.endswith(MODEL_SUFFIXES)}
    listed = folder_paths.get_filename_list
    used = {n["type"] for wf in versions.values() for n in wf["nodes"]}
    loop = asyncio.new_event_loop()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nodes, "NODE_CLASS_MAPPINGS", mapping)
        mp.setattr(folder_paths, "get_filename_list", lambda folder: sorted(set(listed(folder)) | files))
        info = {t: node_info(mapping[t]) for t in used if t in mapping}
        yield ComfyEnv(pack, execution, info, loop, versions)
    loop.close()


def validation_outcome(label: str, result) -> str:
    """Check ComfyUI's answer: a verdict, every refusal with a message, no exception from the pack's
    code. The outcome's name for the tally."""
    assert isinstance(result, tuple) and len(result) == 4, f"{label}: validate_prompt returned {result!r}"
    ok, error, _, node_errors = result
    if ok is not True:
        assert isinstance(error, dict) and error.get("message"), f"{label}: refused without a message: {error!r}"
    comfy_exception = False
    for nid, entry in node_errors.items():
        for reason in entry["errors"]:
            assert reason.get("message"), f"{label}: node {nid} refused without a message: {reason!r}"
            if reason["type"].startswith("exception_"):
                frames = (reason.get("extra_info") or {}).get("traceback") or []
                pack_frames = [f for f in frames if any(f'File "{d}/' in f for d in PACK_DIRS)]
                assert not pack_frames, f"{label}: the pack raised while ComfyUI validated: {reason}"
                comfy_exception = True
    if ok is True:  # ComfyUI runs the outputs that validate and names the nodes of the others
        return "partly valid" if node_errors else "valid"
    return "refused (ComfyUI's own exception, as a message)" if comfy_exception else f"refused: {error['type']}"


class Linked:
    """A linked input the checks cannot evaluate (a MODEL, CLIP, ...)."""


def upstream(prompt: dict, outputs) -> set[str]:
    """The nodes ComfyUI runs for ``outputs``: those and every node they are linked from."""
    seen, todo = set(), [str(o) for o in outputs]
    while todo:
        nid = todo.pop()
        if nid not in seen and nid in prompt:
            seen.add(nid)
            todo += [str(v[0]) for v in prompt[nid]["inputs"].values() if isinstance(v, list) and len(v) == 2]
    return seen


def pack_checks(env: ComfyEnv, prompt: dict, outputs) -> str:
    """The pack's own input checks on the nodes of a prompt ComfyUI accepted (those it would run for
    its valid ``outputs``), as the nodes run them before any model work: each Concept Pair's build
    (through its chain), the solver's request and its check, Evaluate's sampler setup and prompt rows.
    "valid", or "refused by the pack" for an EraseProError."""
    from erasepro_ops.errors import EraseProError
    from erasepro_ops.evaluate import evaluation_rows, prompt_lines
    m = env.pack.NODE_CLASS_MAPPINGS
    setup_cls = sys.modules[f"{H.PACK_MODULE}.nodes.evaluate_run"].SamplerSetup
    built: dict[str, tuple] = {}

    def args(nid: str) -> dict:
        node = prompt[nid]
        declared = env.specs(node["class_type"])
        out = {}
        for k, v in node["inputs"].items():
            if k not in declared:
                continue  # ComfyUI passes only declared inputs
            if isinstance(v, list):
                out[k] = concepts(v[0]) if prompt[v[0]]["class_type"] == "ErasePro_ConceptPair" else Linked
            elif declared[k][0] == "ERASEPRO_CONCEPTS":
                out[k] = Linked  # a constant on a socket: ComfyUI 0.3.75 lets it through validation
            else:
                out[k] = v
        return out

    def concepts(nid: str):
        if nid not in built:
            a = args(nid)
            built[nid] = Linked if Linked in a.values() else m["ErasePro_ConceptPair"]().build(**a)[0]
        return built[nid]

    try:
        for nid in sorted(upstream(prompt, outputs)):
            ct = prompt[nid]["class_type"]
            if ct == "ErasePro_ConceptPair":
                concepts(nid)
            elif ct == "ErasePro_ProgressiveSolver":
                a = {k: v for k, v in args(nid).items() if k not in ("model", "clip")}
                if Linked not in a.values():
                    m[ct].request(**a).check()
            elif ct == "ErasePro_Evaluate":
                a = args(nid)
                keys = ("seed", "steps", "cfg", "sampler_name", "scheduler", "width", "height")
                if Linked not in [a.get(k) for k in keys] + [a.get("concepts")]:
                    setup_cls(*(a[k] for k in keys), a.get("negative") or "", a.get("batch_size", 4)).check()
                    try:
                        evaluation_rows(tuple(a.get("concepts") or ()), prompt_lines(a.get("held_out", "")),
                                        prompt_lines(a.get("unrelated", "")))
                    except ValueError as e:  # as the node words it
                        raise EraseProError(f"ErasePro Evaluate: {e}") from e
    except EraseProError as e:
        assert len(str(e)) >= 20, f"unclear refusal: {e!r}"
        return "refused by the pack"
    return "valid"


STRICT_TYPES = {"INT": lambda v: type(v) is int, "FLOAT": lambda v: type(v) in (int, float),
                "BOOLEAN": lambda v: type(v) is bool, "STRING": lambda v: type(v) is str}


def test_shipped_workflows_and_their_history_validate(comfy_env):
    """Every version of every shipped workflow (users' saved files) loads on today's nodes: it converts,
    ComfyUI validates it, the pack's checks pass, and each ErasePro widget value has its input's own
    type (a widget list shifted by a changed input order would pass ComfyUI's lenient checks)."""
    import comfy_server as cs
    n_history = sum("@" in k for k in comfy_env.versions)
    for label, wf in comfy_env.versions.items():
        prompt = cs.ui_to_api(copy.deepcopy(wf), comfy_env.info)
        for nid, node in prompt.items():  # as saved: validation converts the values in place
            if node["class_type"].startswith("ErasePro_"):
                for k, v in node["inputs"].items():
                    typ = comfy_env.specs(node["class_type"])[k][0]
                    ok = isinstance(v, list) or (v in typ if isinstance(typ, list) else STRICT_TYPES.get(typ, bool)(v))
                    assert ok, f"{label}: node {nid} {node['class_type']}.{k} = {v!r} is not a {typ}"
        result = comfy_env.validate(prompt)
        assert validation_outcome(label, result) == "valid" and not result[3], f"{label} no longer validates: {result}"
        assert pack_checks(comfy_env, prompt, result[2]) == "valid", label
    print(f"\n[fuzz] workflows: {len(comfy_env.versions)} distinct versions ({n_history} from git history) validate")
    assert len(comfy_env.versions) >= len(list((REPO / "workflows").glob("*.json")))


# --- mutations -----------------------------------------------------------------------------------
WORKFLOW_VALUES = [None, True, False, 0, -1, 1, 2 ** 31, 2 ** 70, -2 ** 70, 0.5, -0.0, 1e308, -1e308, float("nan"),
                   float("inf"), float("-inf"), "", " ", "0", "3.5", "true", "abc", "é\u202e日本🙂", "\ud800",
                   "{}", "(((x)))", "\n" * 100, "x" * 100_000, [], [1], [1, 2], [1, 2, 3], ["1", 0], ["99999", 0],
                   {}, {"a": 1}, {"__value__": "x"}, {"__value__": [1, 2]}]


def short(v) -> str:
    return repr(v)[:40]


def new_value(rng: random.Random, old):
    """A wrong, odd or out-of-range replacement for a widget value."""
    if rng.random() < 0.3 and isinstance(old, (int, float)) and not isinstance(old, bool):
        return rng.choice([old * 10 ** 6, -old - 1, old + 0.5, float(old), int(old), str(old), old * 1e300])
    if rng.random() < 0.3 and isinstance(old, str):
        return rng.choice([old * 200, old.upper(), old + "\n" * 80, old + " {}", old.replace(" ", ""), "(" * 600 + old])
    return copy.deepcopy(rng.choice(WORKFLOW_VALUES))


def _pick_node(rng, wf, pred=lambda n: True):
    """A node for which ``pred`` holds, an ErasePro one more often than not."""
    nodes = [n for n in wf["nodes"] if pred(n)]
    ours = [n for n in nodes if str(n.get("type")).startswith("ErasePro_")]
    return rng.choice(ours if ours and rng.random() < 0.6 else nodes)


def ui_widget_value(rng, wf, env):
    n = _pick_node(rng, wf, lambda n: isinstance(n.get("widgets_values"), list) and n["widgets_values"])
    i = rng.randrange(len(n["widgets_values"]))
    n["widgets_values"][i] = new_value(rng, n["widgets_values"][i])
    return f"node {n['id']} {n['type']} widget {i} = {short(n['widgets_values'][i])}"


def ui_widget_list(rng, wf, env):
    n = _pick_node(rng, wf, lambda n: n.get("widgets_values"))
    wv = n["widgets_values"]
    kind = rng.choice(["truncate", "empty", "none", "extend", "dict", "string"])
    if kind == "truncate" and isinstance(wv, list):
        del wv[rng.randrange(len(wv)):]
    elif kind == "extend" and isinstance(wv, list):
        wv.extend(new_value(rng, None) for _ in range(rng.randrange(1, 4)))
    elif kind == "dict":
        names = list(env.specs(n["type"])) if n["type"] in env.info else ["x"]
        n["widgets_values"] = {rng.choice(names): new_value(rng, None) for _ in range(2)}
    else:
        n["widgets_values"] = {"empty": [], "none": None, "string": "abc"}.get(kind, [])
    return f"node {n['id']} {n['type']} widgets {kind}"


def ui_remove_link(rng, wf, env):
    link = wf["links"].pop(rng.randrange(len(wf["links"])))
    return f"link {link[0] if isinstance(link, list) else link['id']} removed"


def ui_unlink_input(rng, wf, env):
    n = _pick_node(rng, wf, lambda n: n.get("inputs"))
    i = rng.choice(n["inputs"])
    i["link"] = rng.choice([None, 10 ** 6])
    return f"node {n['id']} input {i.get('name')} link = {i['link']}"


def ui_unknown_input(rng, wf, env):
    n = _pick_node(rng, wf)
    links = [link[0] for link in wf["links"] if isinstance(link, list)]
    n.setdefault("inputs", []).append({"name": rng.choice(["fuzz_unknown", "model", "concepts", "strength"]),
                                       "type": rng.choice(["INT", "MODEL", "*", "ERASEPRO_EDIT"]),
                                       "link": rng.choice(links + [None])})
    return f"node {n['id']} unknown input {n['inputs'][-1]['name']}"


def ui_mode(rng, wf, env):
    n = _pick_node(rng, wf)
    n["mode"] = rng.choice([1, 2, 4])
    return f"node {n['id']} mode {n['mode']}"


def ui_remove_node(rng, wf, env):
    n = wf["nodes"].pop(rng.randrange(len(wf["nodes"])))
    return f"node {n['id']} {n['type']} removed"


def ui_rewire(rng, wf, env):
    link = rng.choice(wf["links"])
    if rng.random() < 0.5:
        link[2] = rng.choice([0, 1, 2, 3, 99])
    else:
        link[1] = rng.choice(wf["nodes"])["id"]
    return f"link {link[0]} rewired from node {link[1]} slot {link[2]}"


UI_MUTATIONS = [ui_widget_value, ui_widget_value, ui_widget_value, ui_widget_list, ui_remove_link, ui_unlink_input,
                ui_unknown_input, ui_mode, ui_remove_node, ui_rewire]


def _pick_id(rng, prompt):
    ours = sorted(n for n in prompt if prompt[n]["class_type"].startswith("ErasePro_"))
    return rng.choice(ours if ours and rng.random() < 0.6 else sorted(prompt))


def api_value(rng, prompt, env):
    def names_of(n):
        return sorted(set(prompt[n]["inputs"]) | set(env.specs(prompt[n]["class_type"])))
    nid = _pick_id(rng, prompt)
    if not names_of(nid):  # a node without inputs (the toy model loader): another one
        nid = rng.choice([n for n in sorted(prompt) if names_of(n)])
    node = prompt[nid]
    names = names_of(nid)
    k = rng.choice(names)
    node["inputs"][k] = new_value(rng, node["inputs"].get(k))
    if rng.random() < 0.2:
        node["inputs"][k] = rng.choice([[nid, 0], [rng.choice(sorted(prompt)), rng.choice([0, 1, 2, 7])], [nid], [1, 2, 3]])
    return f"{nid}.{k} = {short(node['inputs'][k])}"


def api_range(rng, prompt, env):
    """A number widget at, just past or far past its limits, or of the other number type."""
    choices = [(nid, k, o) for nid, node in prompt.items() for k, (t, o) in env.specs(node["class_type"]).items()
               if t in ("INT", "FLOAT")]
    nid, k, o = rng.choice(choices)
    lo, hi = o.get("min", -2 ** 63), o.get("max", 2 ** 63)
    prompt[nid]["inputs"][k] = rng.choice([lo, hi, lo - 1, hi + 1, lo - 0.5, hi + 0.5, (lo + hi) / 2 + 0.25,
                                           str(hi), hi * 10, -abs(hi) * 10, True])
    return f"{nid}.{k} = {short(prompt[nid]['inputs'][k])} (min {lo}, max {hi})"


def api_combo(rng, prompt, env):
    choices = [(nid, k, t) for nid, node in prompt.items() for k, (t, o) in env.specs(node["class_type"]).items()
               if isinstance(t, list) and t]
    nid, k, t = rng.choice(choices)
    v = rng.choice(t)
    prompt[nid]["inputs"][k] = rng.choice([v.upper(), " " + v, v + " ", "", rng.choice(["erasepro", "uce", "euler", "style"])])
    return f"{nid}.{k} = {short(prompt[nid]['inputs'][k])}"


def api_drop(rng, prompt, env):
    nid = rng.choice([n for n in sorted(prompt) if prompt[n]["inputs"]] or sorted(prompt))
    if prompt[nid]["inputs"]:
        k = rng.choice(sorted(prompt[nid]["inputs"]))
        del prompt[nid]["inputs"][k]
        return f"{nid}.{k} removed"
    return "nothing to remove"


def api_unknown(rng, prompt, env):
    nid = rng.choice(sorted(prompt))
    prompt[nid]["inputs"][rng.choice(["fuzz_unknown", "__value__", "", "class_type"])] = new_value(rng, None)
    return f"{nid}: unknown input"


API_MUTATIONS = [api_value, api_value, api_range, api_range, api_combo, api_drop, api_unknown]
WORKFLOW_CASES = 2400


def test_mutated_workflows_are_validated_not_crashed(comfy_env):
    """Each case: a version, one to three mutations of the UI file and/or of the API prompt it converts
    to, then ComfyUI's validation and, for what it accepts, the pack's own checks."""
    import comfy_server as cs
    tally = Tally("mutated workflows")
    rng = random.Random(SEED)
    versions = sorted(comfy_env.versions.items())
    with quiet_logs():
        for i in range(WORKFLOW_CASES):
            name, wf = versions[i % len(versions)]
            wf = copy.deepcopy(wf)
            n_ui, n_api = rng.choice([(1, 0), (2, 0), (3, 0), (0, 1), (0, 2), (1, 1), (2, 1)])
            labels = [m(rng, wf, comfy_env) for m in rng.sample(UI_MUTATIONS, n_ui)]
            label = f"case {i} ({name}): " + "; ".join(labels)
            try:
                prompt = cs.ui_to_api(wf, comfy_env.info)
            except Exception as e:  # noqa: BLE001
                raise AssertionError(f"{label}: ui_to_api raised {type(e).__name__}: {e}") from None
            if prompt:
                labels += [m(rng, prompt, comfy_env) for m in rng.sample(API_MUTATIONS, n_api)]
            label = f"case {i} ({name}): " + "; ".join(labels)
            try:
                result = comfy_env.validate(prompt)
                outcome = validation_outcome(label, result)
                if result[0] is True and pack_checks(comfy_env, prompt, result[2]) != "valid":
                    outcome += ", refused by the pack"
            except AssertionError:
                raise
            except Exception as e:  # noqa: BLE001
                raise AssertionError(f"{label}: {type(e).__name__} escaped: {e}\n"
                                     + "".join(traceback.format_exception(e)[-4:])) from None
            tally.add(outcome)
    print(f"\n{tally.report()}")
    assert tally.total >= WORKFLOW_FLOOR
    assert tally.outcomes.get("valid", 0) >= 100 and tally.total - tally.outcomes.get("valid", 0) >= 800
