"""Import a real ComfyUI tree in this process (CPU) and load the pack the way ComfyUI does.

The tree is ``$COMFYUI_PATH`` if set, else ``.comfyui-tree`` (made by ``scripts/setup_env.sh``).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_MODULE = "inversion_chain"
CACHE_DIR = Path(os.environ.get("IC_CACHE", Path.home() / ".cache" / "comfyui-inversion-chain"))


def comfy_tree() -> Path:
    path = os.environ.get("COMFYUI_PATH") or str(REPO_ROOT / ".comfyui-tree")
    tree = Path(path).resolve()
    if not (tree / "main.py").is_file() or not (tree / "comfy").is_dir():
        raise RuntimeError(f"no ComfyUI tree at {tree}: run `make test` (scripts/setup_env.sh) or set COMFYUI_PATH")
    return tree


_ready = False


def setup_comfy():
    """Put the ComfyUI tree on sys.path and force CPU before model_management is imported."""
    global _ready
    if _ready:
        return
    tree = str(comfy_tree())
    if tree not in sys.path:
        sys.path.insert(0, tree)
    import comfy.options
    comfy.options.enable_args_parsing(False) if hasattr(comfy.options, "enable_args_parsing") else None
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401  (reads args.cpu once, here)
    _ready = True


def load_pack():
    """Import the pack as a package (what ComfyUI's custom-node loader does), under a stable name."""
    setup_comfy()
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    spec = importlib.util.spec_from_file_location(PACK_MODULE, REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    spec.loader.exec_module(module)
    return module


def comfy_version() -> str:
    tree = comfy_tree()
    version_file = tree / "comfyui_version.py"
    if version_file.is_file():
        for line in version_file.read_text().splitlines():
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip('"')
    return "2024-03 (a28a9dc8)" if (tree / "comfy").is_dir() else "unknown"
