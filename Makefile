# Two commands matter: `make demo` (the CPU demo pipeline) and `make test` (the test suite).
# Both create and fill .venv on first use (scripts/setup_venv.sh).
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo demo-base test test-gpu lint bench strip-notebooks

venv:
	@bash scripts/setup_venv.sh

demo: venv
	@PATH="$(abspath $(BIN)):$$PATH" bash scripts/demo.sh

# Remake the committed base model models/tiny-qwen2-vl-base (about 10 minutes; docs/demo.md).
demo-base: venv
	$(BIN)/bvip demo base

# scripts/setup_browser.sh installs Debian's chromium for the browser test of `bvip report` (or says why not).
test: venv lint
	@bash scripts/setup_browser.sh
	$(BIN)/python -m pytest tests notebooks --nbmake --nbmake-timeout=600 -q

# The real-GPU path on tiny twins (tests/gpu; skipped without CUDA). scripts/gpu_check.sh also installs
# bitsandbytes and writes the figures to $$OUT.
test-gpu: venv
	$(BIN)/python -m pytest tests/gpu -m gpu -q

lint: venv
	$(BIN)/ruff check bvip_helpers tests benchmarks notebooks

bench: venv
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

strip-notebooks: venv
	$(BIN)/nbstripout --keep-id notebooks/*.ipynb 2>/dev/null || $(BIN)/nbstripout notebooks/*.ipynb
