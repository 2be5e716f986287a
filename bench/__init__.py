"""Benchmarks for the pack: ``python -m bench <name>`` (or ``all``) prints one JSON object on stdout.

Plugging in a benchmark is one module ``bench/<name>.py`` that defines::

    from bench import register

    @register("<name>", "one-line description")
    def run() -> dict:
        ...

The module name must equal the benchmark name: ``python -m bench <name>`` imports ``bench.<name>`` only (so a
broken benchmark cannot stop the others), and ``all`` discovers every module in this folder that is not
infrastructure (``_*``, ``common``). Shared utilities (models, interleaved timing, UNet call counting) live in
``bench.common``.
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Callable, Dict

_NOT_BENCHMARKS = {"common"}
_REGISTRY: Dict[str, Callable[[], dict]] = {}
_DESCRIPTIONS: Dict[str, str] = {}


def register(name: str, description: str = ""):
    """Decorator: ``name`` -> a zero-argument function returning a JSON-serialisable dict."""
    def deco(fn):
        _REGISTRY[name] = fn
        _DESCRIPTIONS[name] = description or (fn.__doc__ or "").strip().split("\n")[0]
        return fn
    return deco


def names() -> list:
    """Every benchmark module in this folder, in alphabetical order."""
    here = str(Path(__file__).resolve().parent)
    return sorted(m.name for m in pkgutil.iter_modules([here])
                  if not m.name.startswith("_") and m.name not in _NOT_BENCHMARKS)


def get(name: str) -> Callable[[], dict]:
    if name not in _REGISTRY:
        if name not in names():
            raise KeyError(f"unknown benchmark '{name}'; available: {', '.join(names()) or '(none)'}")
        importlib.import_module(f"{__name__}.{name}")
    if name not in _REGISTRY:
        raise KeyError(f"bench/{name}.py does not register a benchmark named '{name}' (use @register('{name}'))")
    return _REGISTRY[name]


def description(name: str) -> str:
    get(name)
    return _DESCRIPTIONS.get(name, "")
