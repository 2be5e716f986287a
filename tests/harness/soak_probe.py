"""Test-only, read-only route for the soak test (tests/test_soak.py): GET /ic_test/cache_bytes answers what the
pack's caches hold in the server process, in bytes. Registered by the test-only custom node
(tests/comfy_test_node), never by the pack: the pack itself reports its cache only in MB, in its log and in the
Free Inversion Chain Caches node's report (which also empties the caches).

The pack's modules are found at request time (the test node may load before the pack, which imports its store on
first use), by the type of the object rather than by module path, so that moving modules within the pack does not
break the probe."""
from __future__ import annotations

import os
import sys
import time
import types


def _pack_objects():
    store = style = None
    for name, module in list(sys.modules.items()):
        if not isinstance(module, types.ModuleType) or name.startswith(("torch", "numpy", "comfy.")) or name == "comfy":
            continue
        candidate = module.__dict__.get("STORE")
        if store is None and type(candidate).__name__ == "ReferenceStore" and hasattr(candidate, "held_bytes"):
            store = candidate
        if style is None and name.endswith(".style_diffusion") and callable(module.__dict__.get("memory_bytes")) \
                and isinstance(module.__dict__.get("_memory"), dict):
            style = module
    return store, style


def cache_bytes() -> dict:
    """Read while the prompt worker may be changing the caches (another thread): a dict changed during the count
    raises RuntimeError, and the count is simply taken again."""
    for _ in range(100):
        try:
            return _cache_bytes()
        except RuntimeError:
            time.sleep(0.01)
    return _cache_bytes()


def _cache_bytes() -> dict:
    store, style = _pack_objects()
    out = {"pid": os.getpid(), "reference_loaded": store is not None, "reference_bytes": 0, "reference_entries": 0,
           "reference_budget_cpu": 0}
    if store is not None:   # the pack imports its store on first use: before that it holds nothing
        out.update(reference_bytes=int(store.held_bytes()), reference_entries=len(store.entries),
                   reference_budget_cpu=int(store.budget("cpu")))
    if style is not None:
        out.update(style_memory_bytes=int(style.memory_bytes()), style_memory_entries=len(style._memory),
                   style_memory_budget=int(style.MEMORY_BYTES))
    return out


def register_routes():
    """Add GET /ic_test/cache_bytes to ComfyUI's server (its routes are added to the app after custom nodes load)."""
    try:
        from aiohttp import web
        import server
    except ImportError:   # not inside a ComfyUI server (e.g. the test node imported in-process)
        return
    instance = getattr(server.PromptServer, "instance", None)
    if instance is None:
        return

    @instance.routes.get("/ic_test/cache_bytes")
    async def _cache_bytes(request):
        return web.json_response(cache_bytes())
