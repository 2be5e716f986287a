"""The suite ran on the ComfyUI tree it was asked for: scripts/run_tests.sh sets IC_EXPECT_COMFYUI_VERSION (empty for
a user's COMFYUI_PATH tree), and the ComfyUI modules in this process come from that tree, not from a stray copy."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.harness.comfy_env import comfy_tree, comfy_version, setup_comfy

pytestmark = pytest.mark.fast
SUPPORTED = {"0.33.0", "2024-03 (a28a9dc8)"}


def test_the_tree_is_the_one_asked_for():
    expected = os.environ.get("IC_EXPECT_COMFYUI_VERSION")
    version = comfy_version()
    if expected:
        assert version == expected, f"asked for ComfyUI {expected}, ran on {version} at {comfy_tree()}"
    elif expected is None:   # a plain pytest: the tree must still be one the pack supports and tests
        assert version in SUPPORTED, f"ComfyUI {version} at {comfy_tree()} is none of {sorted(SUPPORTED)}"


def test_comfy_modules_come_from_that_tree():
    setup_comfy()
    import comfy.model_management
    import nodes
    tree = comfy_tree()
    for module in (comfy.model_management, nodes):
        assert Path(module.__file__).resolve().is_relative_to(tree), f"{module.__name__} from {module.__file__}"
    # `comfy` is a namespace package in some trees (no __init__.py): every folder it spans is in the tree
    assert all(Path(p).resolve().is_relative_to(tree) for p in sys.modules["comfy"].__path__)


def test_version_floors_match_the_tree():
    """Each feature's probe agrees with its floor: the current tree has every feature, the 2024-03 tree has only
    what the 2024-03 tree has, and a missing one is explained with its floor."""
    from inversion_chain import compat
    version = comfy_version()
    for name, (floor, _what, _probe) in compat.FEATURES.items():
        expected = version != compat.OLDEST_SUPPORTED or floor == compat.OLDEST_SUPPORTED
        assert compat.has_feature(name) == expected, (name, floor, version)
        message = compat.missing_feature_message(name, "Test node")
        assert (message is None) == expected
        if message:
            assert floor in message and "Test node" in message
