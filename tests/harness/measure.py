"""Figures a test measures, kept out of its output: ``measured(...)`` (print's arguments) attaches the line to the
running test as a pytest user property, which ``--junitxml`` writes out; ``scripts/test_figures.py`` runs tests and
prints them. Tests assert; the docs' figures come from that script."""
from __future__ import annotations

_running = []   # the running test item, pushed and popped by tests/conftest.py


def measured(*parts, sep: str = " "):
    line = sep.join(str(p) for p in parts).strip("\n")
    if _running:
        _running[-1].user_properties.append(("measured", line))
