"""Test-only custom node: registers the small/bench test model configs and the demo model's so that the stock
CheckpointLoaderSimple recognises the test checkpoints, and Load CLIP Vision the small test encoder; on trees with the
flow families (0.3x), registers the small Qwen-Image layout for the stock UNETLoader and adds "IC Test Flow CLIP
Loader", which stands in for DualCLIPLoader / CLIPLoader in the shipped flow graphs (tests/harness/server.py
``for_test_model``). Never installed for users."""
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

from ic_test_harness import flow_models, flow_models_more  # noqa: E402

FLOW_FAMILIES = tuple(f for f in flow_models.FAMILIES if flow_models.missing_family(f) is None)


class ICTestFlowCLIPLoader:
    """The shrunk text encoders of the flow test layouts. The stock CLIPLoader / DualCLIPLoader build the full-size
    T5-XXL / Qwen2.5-7B configs whatever the file holds, so the shrunk encoders are built here, by the same function
    the in-process tests use (``flow_models.load_clip``: ComfyUI's own classes, the tree's real tokenizers)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (list(FLOW_FAMILIES), {
            "tooltip": "Which flow test layout's text encoders to build (tests/harness/flow_models.py)."})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, family):
        return (flow_models.load_clip(family),)


if FLOW_FAMILIES:
    for _family in FLOW_FAMILIES:    # the stock detection needs the test configs of the layouts it cannot size
        if _family == "chroma":
            flow_models.register_test_chroma()
        elif _family == "qwen_image":
            flow_models_more.register_test_qwen_image()
    NODE_CLASS_MAPPINGS["ICTestFlowCLIPLoader"] = ICTestFlowCLIPLoader

from ic_test_harness.soak_probe import register_routes  # noqa: E402

register_routes()   # GET /ic_test/cache_bytes (read-only; tests/test_soak.py)
