"""pytest plugin (pytest.ini loads it): the ComfyUI tree the suite runs on, in the header and the summary, so a CI
log always says which tree passed or failed."""
from __future__ import annotations


def _describe() -> str:
    from .comfy_env import comfy_tree, comfy_version
    try:
        return f"ComfyUI {comfy_version()} at {comfy_tree()}"
    except RuntimeError as exc:          # no tree: say so; tests/test_tree.py fails the run
        return f"no ComfyUI tree ({exc})"


def pytest_report_header(config):
    return _describe()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    terminalreporter.write_line(f"ran on {_describe()}")
