"""The pack's import graph, read with ``ast`` (no import runs): imports point down the layers, never up, with no
cycle; ComfyUI's modules are imported only where the layout allows; no attention module outgrows ~400 lines."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[2]
NOT_THE_PACK = {"tests", "bench", "scripts", "workflows", "web", "out"}
# lower rank = lower layer; a module may import its own layer (no cycle) or any lower one
LAYERS = {"compat": 0, "base": 1, "attention": 2, "samplers": 3, "optimize": 4, "pipelines": 5, "nodes": 6, "root": 7}
# inside attention/, by role: the core knows no editor, the store knows only the core, editors and the viewer sit on
# both and never import each other's role
ATTENTION_ROLES = {"core": 0, "store": 1, "editors": 2, "viewer": 2}
BASE = {"artifacts", "conditioning", "model_info", "plots", "logs"}
COMFY = {"comfy", "comfy_extras", "comfy_execution", "nodes", "folder_paths", "latent_preview", "server",
         "execution", "node_helpers", "comfy_api"}
COMFY_ALLOWED = {"compat", "attention.core.patching"}          # and the node layer (nodes.*)
MAX_ATTENTION_LINES = 400


def pack_modules() -> Dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in NOT_THE_PACK or rel.parts[0].startswith("."):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts) or "__init__"] = path
    return out


MODULES = pack_modules()


def layer_of(module: str) -> str:
    top = module.split(".")[0]
    if module == "__init__":
        return "root"
    if top == "compat":
        return "compat"
    if top in BASE:
        return "base"
    if top in LAYERS:
        return top
    raise AssertionError(f"{module}: not in any layer of the layout (add it to LAYERS or BASE)")


def imports_of(module: str, path: Path) -> Tuple[Set[str], Set[str]]:
    """(pack modules imported, external top-level names imported), lazy imports included."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    if module == "__init__":
        package = []
    inside, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            outside.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                outside.add(node.module.split(".")[0])
                continue
            base = package[:len(package) - (node.level - 1)] if node.level > 1 else list(package)
            target = base + (node.module.split(".") if node.module else [])
            for alias in node.names:
                sub = ".".join(target + [alias.name])
                name = sub if sub in MODULES else ".".join(target)
                inside.add(name or "__init__")
    inside.discard(module)
    return inside, outside


GRAPH = {m: imports_of(m, p) for m, p in MODULES.items()}


def test_every_import_points_down_the_layers():
    upward = [f"{m} ({layer_of(m)}) -> {t} ({layer_of(t)})" for m, (inside, _) in GRAPH.items() for t in inside
              if LAYERS[layer_of(t)] > LAYERS[layer_of(m)]]
    assert not upward, "imports pointing up the layers:\n" + "\n".join(sorted(upward))
    assert "samplers.model_info" not in MODULES and "model_info" in MODULES


def test_the_import_graph_has_no_cycle():
    state: Dict[str, int] = {}
    cycles: List[str] = []

    def visit(m, trail):
        state[m] = 1
        for t in sorted(GRAPH[m][0]):
            if t not in GRAPH:
                continue
            if state.get(t) == 1:
                cycles.append(" -> ".join(trail[trail.index(t):] + [t]))
            elif t not in state:
                visit(t, trail + [t])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_comfyui_is_imported_only_by_compat_patching_and_the_node_layer():
    found = [f"{m}: {', '.join(sorted(outside & COMFY))}" for m, (_, outside) in GRAPH.items()
             if outside & COMFY and m not in COMFY_ALLOWED and layer_of(m) != "nodes"]
    assert not found, "ComfyUI imported outside compat.py, attention/core/patching.py and nodes/:\n" + "\n".join(found)


def role_of(module: str) -> str:
    parts = module.split(".")
    assert len(parts) == 3 and parts[1] in ATTENTION_ROLES, (
        f"{module}: attention modules live in a role folder ({', '.join(ATTENTION_ROLES)})")
    return parts[1]


def test_attention_modules_sit_in_a_role_folder_and_import_down_the_roles():
    role_packages = {f"attention.{role}" for role in ATTENTION_ROLES}
    inside_attention = [m for m in MODULES if m.startswith("attention.") and m not in role_packages]
    assert len(inside_attention) > 15
    crossing = []
    for m in inside_attention:
        mine = role_of(m)
        for t in GRAPH[m][0]:
            if t.startswith("attention.") and t.count(".") == 2:
                theirs = role_of(t)
                if theirs != mine and ATTENTION_ROLES[theirs] >= ATTENTION_ROLES[mine]:
                    crossing.append(f"{m} ({mine}) -> {t} ({theirs})")
    assert not crossing, "attention imports across roles (core < store < editors, viewer):\n" + "\n".join(crossing)


def test_no_attention_module_over_400_lines():
    long = {m: n for m, p in MODULES.items() if m.startswith("attention.")
            for n in [len(p.read_text().splitlines())] if n > MAX_ATTENTION_LINES}
    assert not long, f"attention modules over {MAX_ATTENTION_LINES} lines: {long}"


def names_imported_from(module: str, path: Path) -> Dict[str, Set[str]]:
    """Pack module imported from -> the names ``module`` takes from it (``*`` for the module itself)."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out: Dict[str, Set[str]] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package[:len(package) - (node.level - 1)] if node.level > 1 else list(package)
            target = base + (node.module.split(".") if node.module else [])
            for alias in node.names:
                sub = ".".join(target + [alias.name])
                if sub in MODULES:
                    out.setdefault(sub, set()).add("*")
                else:
                    out.setdefault(".".join(target), set()).add(alias.name)
    return out


def test_nodes_call_only_the_pipelines():
    """A node declares its inputs, calls one function of pipelines/ and returns: from the layers under pipelines/
    (attention, samplers, optimize) it takes only vocabulary for its INPUT_TYPES (UPPER_CASE choices and defaults),
    never a module, function or class. The input contract (nodes.contract) may name the artefact types it checks."""
    below = {"attention", "samplers", "optimize"}
    found = []
    for m, path in MODULES.items():
        if layer_of(m) != "nodes" or m == "nodes.contract":
            continue
        for source, names in names_imported_from(m, path).items():
            if layer_of(source) in below:
                bad = sorted(n for n in names if n == "*" or not n.isupper())
                if bad:
                    found.append(f"{m} takes {', '.join(bad)} from {source}")
    assert not found, "nodes reaching past pipelines/:\n" + "\n".join(found)
    calls = {m for m, (inside, _) in GRAPH.items() if layer_of(m) == "nodes"
             for t in inside if layer_of(t) == "pipelines"}
    assert len(calls) >= 7   # every technique's node module: the check above saw the real imports


def test_the_graph_is_read_from_the_real_files():
    """The walk sees the layout it checks (a renamed folder must not make the other tests vacuous)."""
    assert {"compat", "attention.core.controller", "attention.core.patching", "attention.core.schedule",
            "attention.store.reference", "attention.editors.p2p", "attention.viewer.capture", "samplers.ddim",
            "pipelines.p2plus", "nodes.p2plus"} <= set(MODULES)
    assert "attention.core.controller" in GRAPH["attention.core.patching"][0]
    assert "comfy" in GRAPH["compat"][1]
