# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make test   - builds the environment (cached), obtains ComfyUI, links the pack, runs ruff and the test suite
#   make test-fast - ruff and the fast tier (in-process tests marked `fast`, under 2 minutes)
#   make demo   - runs the main job headless on a real photo and writes the results to out/
# COMFYUI_PATH=/path/to/ComfyUI selects another ComfyUI tree (default: the upstream 2024-03-22 tree).
# CKPT=/path/model.safetensors makes the demo use your checkpoint (default: a small random-weight test model).
PY := .venv/bin/python

.PHONY: setup lint test test-fast demo bench clean

setup:
	@bash scripts/setup_env.sh

lint: setup
	$(PY) -m ruff check .

# The whole suite (what CI runs), after the linter. The browser test needs Debian's chromium: setup installs it.
test: export IC_BROWSER := 1
test: lint
	$(PY) -m pytest tests

# The edit loop: in-process tests marked `fast` (under 2 minutes on 2 cores), after the linter.
test-fast: lint
	$(PY) -m pytest -m fast tests

demo: setup
	$(PY) scripts/demo.py $(if $(CKPT),--ckpt "$(CKPT)")

bench: setup
	$(PY) -m bench all

clean:
	rm -rf out .pytest_cache
