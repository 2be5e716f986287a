"""Test-only custom node: registers the small/bench test model configs and the demo model's so that the stock
CheckpointLoaderSimple recognises the test checkpoints, and Load CLIP Vision the small test encoder. Never installed
for users."""
import importlib.util
import os
import sys

# Loaded by file path: ComfyUI's own tree has a regular `tests` package that would shadow ours.
_harness_dir = os.path.join(os.environ["IC_REPO_ROOT"], "tests", "harness")
_spec = importlib.util.spec_from_file_location("ic_test_harness", os.path.join(_harness_dir, "__init__.py"),
                                               submodule_search_locations=[_harness_dir])
_harness = importlib.util.module_from_spec(_spec)
sys.modules["ic_test_harness"] = _harness
_spec.loader.exec_module(_harness)
from ic_test_harness.demo_model import register_demo_model_config  # noqa: E402
from ic_test_harness.models import register_test_clip_vision, register_test_model_configs  # noqa: E402

register_test_model_configs()
register_demo_model_config()
register_test_clip_vision()
NODE_CLASS_MAPPINGS = {}

from ic_test_harness.soak_probe import register_routes  # noqa: E402

register_routes()   # GET /ic_test/cache_bytes (read-only; tests/test_soak.py)
