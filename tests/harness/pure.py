"""The pack's pure modules without ComfyUI: the fast tier's unit tests (tests/unit) import ``inversion_chain.samplers
.ddim``, ``inversion_chain.attention.core.tokens`` and the like, and must not pay for booting ComfyUI.

The pack's ``__init__`` imports the node layer, hence ComfyUI, so the package is registered under the name ComfyUI's
loader gives it (``comfy_env.PACK_MODULE``) with its ``__init__`` not yet run; its submodules import on their own.
When a test outside tests/unit then needs ComfyUI, ``complete_pack`` runs that ``__init__`` on the same module
object (after ``comfy_env.setup_comfy``), so every module imported so far is the one the rest of the suite uses.
"""
from __future__ import annotations

import importlib.util
import sys

from .comfy_env import PACK_MODULE, REPO_ROOT

_PENDING = "_ic_init_pending"   # set on the package while its __init__ has not run
COMFY_MODULES = ("comfy", "comfy_extras", "comfy_execution", "nodes", "folder_paths", "execution", "server")


def register_pack() -> object:
    """The pack's package, registered without running its ``__init__`` (no-op when it is already imported)."""
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    spec = importlib.util.spec_from_file_location(PACK_MODULE, REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    setattr(module, _PENDING, True)
    sys.modules[PACK_MODULE] = module
    return module


def complete_pack():
    """Run the pack's ``__init__`` on a package ``register_pack`` left pending (ComfyUI must be on the path)."""
    module = sys.modules.get(PACK_MODULE)
    if module is not None and getattr(module, _PENDING, False):
        delattr(module, _PENDING)
        module.__spec__.loader.exec_module(module)


def comfy_modules_loaded() -> list:
    """The ComfyUI modules this process has imported (empty while only pure code ran)."""
    return sorted(name for name in sys.modules if name.split(".")[0] in COMFY_MODULES)
