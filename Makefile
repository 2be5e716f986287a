# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make test   - builds the environment (cached), obtains ComfyUI, links the pack, runs ruff and the test suite on
#                 each supported tree: current ComfyUI (v0.33.0) first, then the oldest supported (2024-03)
#   make test-fast - ruff and the fast tier on the current tree (pure tests and quick in-process tests)
#   make demo   - runs the main job headless on a real photo and writes the results to out/
# COMFYUI_PATH=/path/to/ComfyUI tests that tree alone, in place; TREES="2024-03" (or "current") picks trees.
# CKPT=/path/model.safetensors makes the demo use your checkpoint (default: the two committed demo models).
PY := .venv/bin/python

.PHONY: setup lint test test-fast test-unit demo bench clean

setup:
	@bash scripts/setup_env.sh

TREES ?= $(if $(COMFYUI_PATH),current,current 2024-03)

lint: setup
	$(PY) -m ruff check .

# The whole suite on every tree in TREES (what CI runs), after the linter. The browser test needs Debian's
# chromium: setup installs it.
test: export IC_BROWSER := 1
test: lint
	@for tree in $(TREES); do bash scripts/run_tests.sh $$tree tests || exit 1; done

# The edit loop: the fast tier (tests marked `fast`) on the current tree, after the linter.
test-fast: lint
	bash scripts/run_tests.sh current -m fast tests

# The pure tests alone (tests/unit): no ComfyUI tree is imported, seconds.
test-unit: setup
	$(PY) -m pytest tests/unit

demo: setup
	$(PY) scripts/demo.py $(if $(CKPT),--ckpt "$(CKPT)")

bench: setup
	$(PY) -m bench all

clean:
	rm -rf out .pytest_cache
