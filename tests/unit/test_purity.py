"""The pure tier stays pure: importing tests/unit (its conftest and every test module) in a fresh interpreter
imports no ComfyUI module, so `pytest tests/unit` runs without booting ComfyUI."""
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.harness.comfy_env import REPO_ROOT

# not in the fast tier: a fresh interpreter importing torch takes seconds (make test-unit and make test run it)

PROBE = """
import importlib, json, sys
import tests.unit.conftest
from tests.harness import pure
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(pure.comfy_modules_loaded()))
"""


def test_importing_the_unit_tests_imports_no_comfyui():
    modules = sorted(f"tests.unit.{p.stem}" for p in Path(__file__).parent.glob("test_*.py"))
    assert "tests.unit.test_ddim_math" in modules
    out = subprocess.run([sys.executable, "-c", PROBE, *modules], cwd=REPO_ROOT, capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
