"""Seeded fuzz of edit files (one of three fuzz families; the shared parts: fuzz_support.py).

A small synthetic ErasureEdit on the tiny SD1.5 model, saved by Save ErasePro
Edit as float32, float16 and bfloat16 (header keys sorted: safetensors writes them in another
order in every process), then damaged: bit flips in the header and in the tensor data,
truncations, appended bytes, header edits (metadata removed, changed, of the wrong JSON type;
site entries and their numbers; tensor dtype, shape and offsets, huge shapes such as 2**40),
tensors rewritten (other dtypes, one ulp, swapped, reshaped, missing, extra), files that are no
edit at all (pickles, zip archives, text). Each is read by ``export.load`` and Load ErasePro Edit
(every file that loads, every third refused one); a sample of the loaded ones goes on through
Apply Erased UNet, with and without ``ignore_fingerprint``.
Contract: refused with the pack's own error (``EditFileError``; ``EraseProError`` from the nodes)
whose message says what is wrong, or loaded as exactly the original edit (every site's ``up`` and
``down`` bit for bit, its checksummed figures, and the patches Apply puts on MODEL and CLIP). A
flip in the tensor data is refused by the per-site checksum (by the NaN/Inf or alpha check when
the value became non-finite or is an alpha). Never a raw ``TypeError``/``RecursionError``/
``SafetensorError``/..., never an unpickled file, never a huge allocation.

The cases (fuzz_edit_cases.py) are drawn from ``SEED``, the same on every run; the test prints its
count and outcome tally and asserts it ran at least its floor.
"""
from __future__ import annotations

import pickle
import random
import resource
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import comfy_host as H
from fuzz_edit_cases import MUTATIONS, Base, EditCase, canonical, not_an_edit_files, split_file
from fuzz_support import SEED, Tally, quiet_logs
from test_export import apply_node, load_node, loras, pack, save_node  # noqa: F401  (fixtures: loras, pack)

# Floor: the family must try at least this many cases (the count is printed).
EDIT_FLOOR = 2500

# (part, weight key, rank) of the synthetic edit on H.build("sd15", clip_layers=2): text-encoder
# sites whose LoRA names differ in one bit (layers_0 / layers_1), two UNet sites of one shape and rank
# (their tensors can be swapped) and a rank-0 site (metadata only).
EDIT_SITES = [
    ("clip", "clip_l.transformer.text_model.encoder.layers.0.mlp.fc2.weight", 2),
    ("clip", "clip_l.transformer.text_model.encoder.layers.1.mlp.fc2.weight", 2),
    ("model", "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", 2),
    ("model", "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight", 2),
    ("model", "diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_k.weight", 0),
]
STORAGE = ("float32", "float16", "bfloat16")


def synthetic_edit(model, clip):
    """A seeded ErasureEdit on EDIT_SITES, fingerprinted on ``model``/``clip`` like a solve's."""
    from erasepro_comfy.weights import fingerprint_of
    from erasepro_ops.edit import ErasureEdit, SiteEdit
    g = torch.Generator().manual_seed(SEED)
    states = {"model": model.model_state_dict(), "clip": clip.patcher.model_state_dict()}
    sites = []
    for part, key, rank in EDIT_SITES:
        out_dim, in_dim = states[part][key].shape
        up = torch.randn(out_dim, rank, generator=g) * 0.01
        down = torch.randn(rank, in_dim, generator=g)
        figures = torch.rand(2, generator=g, dtype=torch.float64).tolist()
        sites.append(SiteEdit(key, part, "shallow" if part == "clip" else "deep", up, down, *figures))
    fp = fingerprint_of([(model, [s.key for s in sites if s.part == "model"]),
                         (clip.patcher, [s.key for s in sites if s.part == "clip"])])
    concepts = [{"target": "van gogh", "anchor": "a painting", "concept_type": "style", "prompts": []}]
    settings = {"family": "sd15", "method": "erasepro", "progressive_layers": 2, "concepts": concepts,
                "preserve": ["a photo of a dog"], "preserve_strength": 0.0, "rule": "residual_schedule"}
    summary = {"family": "sd15", "train_residual": 3.5e-07, "deep_burden": 0.0625, "solve_seconds": 1.5}
    return ErasureEdit(tuple(sites), settings, summary, fp)


# Every loaded case and every third refused one also goes through Load ErasePro Edit; every 15th loaded
# one through Apply Erased UNet too (every 120th without ignore_fingerprint: the model hashed, slow).
APPLY_EVERY = 15


# --- loading one case ---------------------------------------------------------------------------
def applied(edit) -> dict:
    """What Apply adds: weight key -> (part, up, down) of every rank > 0 site (rank 0 adds nothing)."""
    return {s.key: (s.part, s.up, s.down) for s in edit.sites if s.rank}


def same_applied(got, want) -> bool:
    """The same update on the same weights, bit for bit; and the per-site figures, which the checksums
    cover too, unchanged."""
    a, b = applied(got), applied(want)
    figures = [{s.key: (s.relative_change, s.residual) for s in e.sites} for e in (got, want)]
    return (a.keys() == b.keys() and all(a[k][0] == b[k][0] and torch.equal(a[k][1], b[k][1])
                                         and torch.equal(a[k][2], b[k][2]) for k in a)
            and all(figures[0][k] == figures[1][k] for k in figures[0].keys() & figures[1].keys()))


def never_unpickle(*args, **kwargs):
    raise AssertionError("an edit file was unpickled")


def assert_clear(err: Exception, case: EditCase, where: str) -> None:
    """A refusal: the pack's own error type, with a message that says what is wrong."""
    msg = str(err)
    assert len(msg) >= 20 and "Traceback" not in msg, f"{case.label}: unclear message from {where}: {msg!r}"
    if case.must_refuse and case.expect:
        assert any(x in msg for x in case.expect), f"{case.label}: {where} says {msg!r}, expected one of {case.expect}"


@dataclass
class EditEnv:
    """The pack, the MODEL and CLIP the edit was made for, and the loras folder the nodes read."""

    pack: object
    model: object
    clip: object
    folder: Path
    name: str = "fuzz/case.safetensors"

    @property
    def path(self) -> Path:
        return self.folder / self.name


def run_edit_case(env: EditEnv, base: Base, case: EditCase, tally: Tally, node_if_refused: bool) -> object | None:
    """Load ``case`` through export.load and Load ErasePro Edit (a file export.load refused: only with
    ``node_if_refused``); check the contract. The edit the node loaded, or None when it was refused."""
    from erasepro_ops import export
    from erasepro_ops.errors import EraseProError
    env.path.write_bytes(case.data)
    try:
        got = export.load(env.path)
    except export.EditFileError as e:
        assert_clear(e, case, "export.load")
        assert env.path.name in str(e) or "LoRA name" in str(e), f"{case.label}: message does not name the file: {e}"
        refused = str(e)
    except Exception as e:  # noqa: BLE001  (the contract: nothing else escapes)
        raise AssertionError(f"{case.label}: {type(e).__name__} escaped export.load: {e}\n"
                             + "".join(traceback.format_exception(e)[-4:])) from None
    else:
        refused = None
        assert not case.must_refuse, f"{case.label}: loaded, but this damage must be refused"
        assert same_applied(got, base.edit), f"{case.label}: loaded as a DIFFERENT edit"
    if refused is not None and not node_if_refused:
        tally.add("refused")
        return None
    # the node, with ignore_fingerprint: every check of the file, no hashing of the model
    try:
        edit, info = load_node(env.pack, env.name, env.model, env.clip, ignore=True)
    except EraseProError as e:
        # a file export.load accepts can still not fit the MODEL (a rank-0 site's shape is not checksummed)
        assert refused is not None or "another model" in str(e), f"{case.label}: export.load accepted, the node refused: {e}"
        if refused is not None:
            assert str(e) == f"cannot load this ErasePro edit: {refused}", f"{case.label}: {e}"
        assert_clear(e, case, "Load ErasePro Edit")
        tally.add("refused")
        return None
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"{case.label}: {type(e).__name__} escaped Load ErasePro Edit: {e}\n"
                             + "".join(traceback.format_exception(e)[-4:])) from None
    assert refused is None, f"{case.label}: export.load refused ({refused}) but the node loaded it"
    assert isinstance(info, str) and same_applied(edit, base.edit), f"{case.label}: the node loaded a DIFFERENT edit"
    tally.add("loaded, same edit")
    return edit


def check_apply(env: EditEnv, base: Base, case: EditCase, edit, with_fingerprint: bool) -> None:
    """Apply Erased UNet on a loaded case: the patches are the original edit's updates, bit for bit, and
    the input MODEL and CLIP stay untouched; ``with_fingerprint``: Load and Apply without the override."""
    from erasepro_ops.errors import EraseProError
    m, c = apply_node(env.pack, env.model, edit, env.clip)
    for part, patcher in (("model", m), ("clip", c.patcher)):
        for s in edit.part(part):
            ((_, (delta,), *_),) = patcher.patches[s.key]  # one "diff" patch: (strength, (ΔW,), ...)
            want = base.deltas.get(s.key)
            assert torch.equal(delta, want if want is not None else torch.zeros(s.shape)), \
                f"{case.label}: Apply patched {s.key} with another update"
    assert not env.model.patches and not env.clip.patcher.patches, f"{case.label}: the input MODEL/CLIP changed"
    if with_fingerprint:
        try:
            edit, info = load_node(env.pack, env.name, env.model, env.clip)
            assert "fingerprint OK" in info, case.label
            apply_node(env.pack, env.model, edit, env.clip)
        except EraseProError as e:  # the fingerprint itself edited
            assert "another base model" in str(e), f"{case.label}: {e}"


@pytest.fixture(scope="module")
def edit_env(pack, loras):
    torch.manual_seed(SEED)
    model, clip = H.build("sd15", clip_layers=2)
    (loras / "fuzz").mkdir(exist_ok=True)
    return EditEnv(pack, model, clip, loras)


@pytest.fixture(scope="module")
def bases(edit_env) -> list[Base]:
    """The synthetic edit saved by Save ErasePro Edit in each storage dtype, and what each loads to."""
    from erasepro_ops import export
    edit = synthetic_edit(edit_env.model, edit_env.clip)
    out = []
    for dtype in STORAGE:
        name, _ = save_node(edit_env.pack, edit, f"fuzz/base_{dtype}", dtype)
        path = edit_env.folder / name
        path.write_bytes(data := canonical(path.read_bytes()))
        loaded = export.load(path)
        if dtype == "float32":  # the pristine float32 file is the edit, bit for bit
            assert same_applied(loaded, edit) and loaded.fingerprint == edit.fingerprint
        n, header, body = split_file(data)
        out.append(Base(dtype, data, n, header, body, loaded, {s.key: s.delta() for s in loaded.sites if s.rank}))
    return out


def test_edit_files(edit_env, bases):
    """Every damaged file refused with a clear message or loaded as exactly the original edit; data
    flips refused by the checksum; nothing unpickled; no huge allocation."""
    tally = Tally("edit files")
    rng = random.Random(SEED)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    checksum_catches = loaded = applied_cases = 0
    by_kind: dict[str, list[int]] = {}  # mutation -> [loaded, refused]
    with quiet_logs(), pytest.MonkeyPatch.context() as mp:
        for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
            mp.setattr(module, name, never_unpickle)
        for base in bases:
            cases = [(mutate.__name__, mutate(rng, base)) for mutate, count in MUTATIONS for _ in range(count)]
            cases += [("not_an_edit", c) for c in not_an_edit_files(base)] if base.dtype == "float32" else []
            for i, (kind, case) in enumerate(cases):
                case.label = f"[{base.dtype} #{i}] {case.label}"
                edit = run_edit_case(edit_env, base, case, tally, node_if_refused=i % 3 == 0)
                by_kind.setdefault(kind, [0, 0])[edit is None] += 1
                if edit is not None and loaded % APPLY_EVERY == 0:  # Apply is a function of the factors
                    check_apply(edit_env, base, case, edit, with_fingerprint=loaded % (8 * APPLY_EVERY) == 0)
                    applied_cases += 1
                loaded += edit is not None
                checksum_catches += "do not match its checksum" in case.expect
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 2 ** 20  # KiB -> GiB
    print(f"\n{tally.report()}; {checksum_catches} data flips refused by the checksum; {applied_cases} loaded "
          f"cases applied; peak RSS grew {grown:.2f} GiB")
    print("  loaded / refused per mutation: " + ", ".join(f"{k} {a}/{r}" for k, (a, r) in by_kind.items()))
    assert tally.total >= EDIT_FLOOR and checksum_catches >= 500
    assert grown < 1.0  # huge shapes were refused, not allocated
