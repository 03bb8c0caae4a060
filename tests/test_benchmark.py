"""The benchmark command runs end to end (tiny models, one concept) and writes its outputs."""

import json

from benchmarks import run


def test_benchmark_smoke(tmp_path, capsys):
    assert run.main(["--size", "tiny", "--concepts", "1", "--runs", "1", "--eps-size", "8", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "sd15_fp16.json").read_text())["rows"]
    print(capsys.readouterr().out)
    assert [r["config"] for r in rows] == [label for label, _ in run.CONFIGS]
    by = {r["config"]: r for r in rows}
    # exact on its own constrained columns; over every template position (the first 8 padding
    # positions are constrained by default, the rest are not) still far closer than UCE
    assert by["ErasePro S=0"]["own_columns_residual"] <= 1e-5
    assert by["UCE"]["train_residual"] > by["ErasePro S=0"]["train_residual"]
    assert (tmp_path / "sd15_fp16_sites.png").stat().st_size > 0
    assert all(r["again_seconds"] > 0 and r["peak_extra_mib"] >= 0 for r in rows)


def test_benchmark_runs_flux_beside_uce(tmp_path):
    """The reduced Flux: UCE and the gateway edit in one run; ErasePro erases the template's velocity
    closer to the anchor's than UCE's last-token edit does."""
    assert run.main(["--models", "flux", "--size", "tiny", "--concepts", "1", "--runs", "1", "--eps-size", "8",
                     "--out", str(tmp_path), "--configs", "UCE,ErasePro S=0"]) == 0
    rows = {r["config"]: r for r in json.loads((tmp_path / "flux_fp16.json").read_text())["rows"]}
    uce, ours = rows["UCE"], rows["ErasePro S=0"]
    # over every T5 position of the templates (the solve holds prefix, concept, suffix, end and 8 padding
    # positions exactly; UCE only the last concept token): measured 1.2e-2 against 1.06
    assert ours["train_residual"] < 0.1 * uce["train_residual"]
    assert ours["own_columns_residual"] <= 1e-3  # 4.3e-4: fp16, 8 preserve prompts of 256 positions each
    assert ours["eps_erasure"] < uce["eps_erasure"]  # 1.8e-3 against 4.7e-2
    assert ours["width"] == 512 and ours["empty_prompt_drift"] <= 1e-4


def test_benchmark_runs_chroma_at_the_positions_it_reads(tmp_path):
    """The reduced Chroma (T5 read from an fp16 file): no padding position is constrained or measured,
    so the gateway edit is exact over every template position the transformer reads."""
    assert run.main(["--models", "chroma", "--size", "tiny", "--concepts", "1", "--runs", "1", "--eps-size", "8",
                     "--out", str(tmp_path), "--configs", "UCE,ErasePro S=0"]) == 0
    rows = {r["config"]: r for r in json.loads((tmp_path / "chroma_fp16.json").read_text())["rows"]}
    uce, ours = rows["UCE"], rows["ErasePro S=0"]
    assert ours["train_residual"] <= 1e-5 < uce["train_residual"]  # measured 3.0e-8 against 0.89
    assert ours["eps_erasure"] < 0.5 * uce["eps_erasure"]  # 9.6e-2 against 0.78
    assert ours["width"] == 512 and ours["empty_prompt_drift"] <= 1e-5  # 1.5e-7


def test_benchmark_sweep_writes_the_trade_off_chart(tmp_path):
    configs = "UCE,S=3 ctx 10"
    assert run.main(["--size", "tiny", "--concepts", "1", "--runs", "1", "--eps-size", "8", "--out", str(tmp_path),
                     "--sweep", "--configs", configs]) == 0
    rows = json.loads((tmp_path / "sd15_fp16_sweep.json").read_text())["rows"]
    assert [r["config"] for r in rows] == configs.split(",")
    assert all(0 < r["held_out"]["concept_end"] and 0 < r["drift_unrelated"] for r in rows)
    assert (tmp_path / "sd15_fp16_sweep_trade_off.png").stat().st_size > 0


def test_benchmark_command_starts_from_a_shell():
    """`python -m benchmarks.run` imports ComfyUI itself (the tests already have it imported)."""
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(run.__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--help"], cwd=repo, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--sweep" in done.stdout


def test_the_gpu_benchmark_asks_for_what_the_benchmark_has():
    """``make bench-gpu`` runs unattended on a lent GPU: its arguments must parse and name real configurations."""
    import shlex
    from pathlib import Path
    makefile = (Path(run.__file__).resolve().parents[1] / "Makefile").read_text()
    line = next(line for line in makefile.splitlines() if line.startswith("GPU_BENCH_ARGS"))
    args = shlex.split(line.split("?=", 1)[1])
    assert set(args[args.index("--configs") + 1].split(",")) <= {label for label, _ in run.CONFIGS}
    assert set(args[args.index("--models") + 1].split(",")) == {"sd15", "sdxl"}
    assert args[args.index("--dtypes") + 1] == "fp16"
