"""The shipped workflow files (workflows/*.json, the UI copies) and the converter that makes them
(scripts/make_ui_workflow.py): read without ComfyUI, for the file checks (tests/unit) and the server tests."""
from __future__ import annotations

import importlib.util
import json

from .comfy_env import REPO_ROOT

UI_DIR = REPO_ROOT / "workflows"


def load_ui_workflow(name):
    return json.loads((UI_DIR / f"{name}.json").read_text())


def load_converter():
    spec = importlib.util.spec_from_file_location("make_ui_workflow", REPO_ROOT / "scripts" / "make_ui_workflow.py")
    converter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(converter)
    return converter
