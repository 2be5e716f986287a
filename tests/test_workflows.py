"""The shipped workflows: every UI copy (workflows/*.json) describes exactly its API copy (workflows/api/*.json),
names only real model files with the papers' settings, is laid out readably, and runs on a headless ComfyUI with
the test checkpoints of its family (names, steps and size substituted in tests/harness/server.py only)."""
import importlib.util
import json
import math

import pytest

from tests.harness.comfy_env import REPO_ROOT
from tests.harness.server import (SHIPPED_CHECKPOINTS, SHIPPED_CLIP_VISION, SHIPPED_IMAGE,
                                  api_workflow_names, for_test_model, load_api_workflow, nodes_of, workflow_test_models,
                                  workflow_family)

pytestmark = pytest.mark.server

UI_DIR = REPO_ROOT / "workflows"
NAMES = api_workflow_names()
SEED_NAMES = ("seed", "noise_seed")
VIRTUAL = ("Note",)  # frontend-only nodes: never sent to the server
VIEWPORT = (1920, 1080)
TITLE_H = 30  # LiteGraph.NODE_TITLE_HEIGHT, drawn above a node's pos


def load_ui_workflow(name):
    return json.loads((UI_DIR / f"{name}.json").read_text())


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """What the ComfyUI frontend sends for a UI workflow, rebuilt independently of scripts/make_ui_workflow.py:
    links -> link inputs, widgets_values -> widget inputs in /object_info order (required, then optional), skipping
    the frontend-only values (seed "control after generate", combo filter list, LoadImage's upload button)."""
    links = {link[0]: link for link in ui["links"]}
    graph = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) in (2, 4) or node["type"] in VIRTUAL:  # muted / bypassed / virtual: not sent
            continue
        defn = object_info[node["type"]]
        specs = [(name, spec) for section in ("required", "optional")
                 for name, spec in (defn["input"].get(section) or {}).items()]
        converted = {i["widget"]["name"] for i in node.get("inputs", []) if i.get("widget")}
        values = list(node.get("widgets_values") or [])
        inputs, pos = {}, 0
        for name, spec in specs:
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            combo = isinstance(kind, list) or kind == "COMBO"  # V3 nodes (0.3x) declare combos as "COMBO"
            if not (combo or kind in ("INT", "FLOAT", "STRING", "BOOLEAN")) or opts.get("forceInput"):
                continue
            assert pos < len(values), f"node {node['id']} ({node['type']}): no widget value for {name!r}"
            if name not in converted:
                inputs[name] = values[pos]
            pos += 1
            if kind == "INT" and (name in SEED_NAMES or opts.get("control_after_generate")):
                assert values[pos] in ("fixed", "increment", "decrement", "randomize"), values[pos]
                pos += 1
            elif combo and opts.get("control_after_generate"):
                pos += 2
            if name == "image" and opts.get("image_upload") is True:
                assert values[pos] == "image"
                pos += 1
        assert pos == len(values), f"node {node['id']} ({node['type']}): {len(values) - pos} extra widget values"
        for slot, inp in enumerate(node.get("inputs", [])):
            if inp.get("link") is None:
                continue
            link_id, src, src_slot, dst, dst_slot, _type = links[inp["link"]]
            assert (dst, dst_slot) == (node["id"], slot), f"link {link_id} does not end at node {node['id']}:{slot}"
            inputs[inp["name"]] = [str(src), src_slot]
        graph[str(node["id"])] = {"class_type": node["type"],
                                  "_meta": {"title": node.get("title") or defn.get("display_name") or node["type"]},
                                  "inputs": inputs}
    # inputs fed by removed nodes are dropped, as the frontend does
    for node in graph.values():
        node["inputs"] = {k: v for k, v in node["inputs"].items() if not (isinstance(v, list) and v[0] not in graph)}
    return graph


def check_ui_consistency(ui: dict, object_info: dict):
    """LiteGraph invariants the frontend relies on when it loads the file."""
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert len(nodes) == len(ui["nodes"]), "duplicate node ids"
    assert ui["last_node_id"] >= max(nodes)
    assert ui["last_link_id"] >= max((link[0] for link in ui["links"]), default=0)
    assert ui["version"] == 0.4
    for key in ("groups", "config", "extra"):
        assert key in ui
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert link_id in out["links"] and inp["link"] == link_id
        assert out["type"] == kind == inp["type"], (link_id, out["type"], kind, inp["type"])
        out_def = object_info[nodes[src]["type"]]["output"][src_slot]
        assert kind == ("COMBO" if isinstance(out_def, list) else out_def)
    for node in ui["nodes"]:
        for name in ("pos", "size", "flags", "order", "mode"):
            assert name in node, (node["id"], name)
        if node["type"] in VIRTUAL:
            continue
        assert node["type"] in object_info
        assert node["properties"]["Node name for S&R"] == node["type"]
        for i, out in enumerate(node.get("outputs", [])):
            assert out.get("slot_index", i) == i
            for link_id in out["links"] or []:
                assert ui["links"][[link[0] for link in ui["links"]].index(link_id)][1:3] == [node["id"], i]


def test_there_are_workflows_and_each_has_a_ui_copy():
    assert "ddim_invert_reconstruct" in NAMES
    missing = [n for n in NAMES if not (UI_DIR / f"{n}.json").is_file()]
    assert not missing, f"run scripts/make_ui_workflow.py: no UI copy for {missing}"


@pytest.mark.parametrize("name", NAMES)
def test_api_copy_is_well_formed(name):
    graph = load_api_workflow(name)
    for nid, node in graph.items():
        assert nid.isdigit(), f"node id {nid!r} is not a string of an int"
        assert set(node) <= {"class_type", "inputs", "_meta"}, (nid, sorted(node))
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert len(value) == 2 and value[0] in graph and isinstance(value[1], int), (nid, value)


@pytest.mark.parametrize("name", NAMES)
def test_ui_copy_rebuilds_the_api_copy(comfy_server, name):
    info = comfy_server.object_info
    ui = load_ui_workflow(name)
    check_ui_consistency(ui, info)
    rebuilt = ui_to_api(ui, info)
    committed = load_api_workflow(name)
    for nid, node in committed.items():
        if "_meta" not in node:
            rebuilt.get(nid, {}).pop("_meta", None)
    assert rebuilt == committed


def load_converter():
    spec = importlib.util.spec_from_file_location("make_ui_workflow", REPO_ROOT / "scripts" / "make_ui_workflow.py")
    converter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(converter)
    return converter


@pytest.mark.parametrize("name", NAMES)
def test_ui_copy_is_up_to_date_with_the_converter(name):
    """The UI copy is what the converter makes from the API copy and the node definitions it was made with (the
    snapshot); whether those definitions still hold on the running tree is the next test's question."""
    converter = load_converter()
    snapshot = json.loads(converter.SNAPSHOT.read_text())["nodes"]
    expected = converter.dumps(converter.api_to_ui(load_api_workflow(name), snapshot, name))
    assert (UI_DIR / f"{name}.json").read_text() == expected, \
        f"workflows/{name}.json is stale: run .venv/bin/python scripts/make_ui_workflow.py"


def widget_layout(defn: dict) -> list:
    """(section, name, type) of every input; combos as COMBO whatever their options (sampler lists grow)."""
    return [(section, name, "COMBO" if isinstance(spec[0], list) else spec[0])
            for section in ("required", "optional") for name, spec in (defn["input"].get(section) or {}).items()]


def test_node_definition_snapshot_holds_on_this_tree(comfy_server):
    """On the tree the snapshot was taken from, it is exact (so a stale snapshot fails in CI); on any other tree
    every saved UI copy must still load the same way: each node type exists, its inputs keep their names, types
    and order (the widgets_values positions), inputs the tree adds come after them, and the outputs the
    workflows link to keep their slots."""
    converter = load_converter()
    snapshot = json.loads(converter.SNAPSHOT.read_text())
    live = comfy_server.object_info
    tree = comfy_server.tree_version()
    assert set(snapshot["nodes"]) == set(converter.snapshot_of(live, tree)["nodes"]), \
        "the snapshot does not cover exactly the node types the workflows use: run scripts/make_ui_workflow.py"
    for node_type, saved in snapshot["nodes"].items():
        assert node_type in live, f"{node_type} (used by the workflows) is not a node on ComfyUI {tree}"
        if tree == snapshot["_tree"]:
            assert converter.without_choices(live[node_type]) == saved, \
                f"{node_type}: snapshot is stale: run scripts/make_ui_workflow.py"
            continue
        ours, theirs = widget_layout(saved), widget_layout(live[node_type])
        assert [e for e in theirs if e in ours] == ours, \
            f"{node_type} on ComfyUI {tree}: inputs {theirs} no longer contain {ours} in order"
        last_ours = max((theirs.index(e) for e in ours), default=-1)
        shifting = [e for i, e in enumerate(theirs) if e not in ours and i < last_ours
                    and e[2] in ("COMBO", "INT", "FLOAT", "STRING", "BOOLEAN")]
        assert not shifting, f"{node_type} on ComfyUI {tree}: new widgets {shifting} shift the saved widget values"
        assert live[node_type]["output"][:len(saved["output"])] == saved["output"], \
            f"{node_type} on ComfyUI {tree}: outputs {live[node_type]['output']} vs {saved['output']}"


RUNS = [(name, size) for name in NAMES for size in workflow_test_models(load_api_workflow(name))]


@pytest.mark.parametrize("name,size", RUNS)
def test_api_workflow_validates_and_runs(comfy_server, name, size):
    graph = for_test_model(load_api_workflow(name), size)
    entry = comfy_server.run_once(graph)  # raises unless POST /prompt answered 200 and the run succeeded
    assert entry["status"]["status_str"] == "success"
    images = comfy_server.output_images(entry)
    assert images and all(p.is_file() and p.stat().st_size > 0 for p in images)
    for out in entry["outputs"].values():
        for key in ("max_abs", "mean_abs"):
            for value in out.get(key, []):
                assert math.isfinite(value)


# -- what a user gets ------------------------------------------------------------------------------------------
FAMILY_SETTINGS = {"sd15": 512, "sdxl": 1024}


def test_every_technique_ships_for_sd15_and_sdxl_with_the_same_graph():
    sd15 = [n for n in NAMES if workflow_family(load_api_workflow(n)) == "sd15"]
    assert len(sd15) >= 7
    for name in sd15:
        twin = f"{name}_sdxl"
        assert twin in NAMES, f"no SDXL version of {name}"
        a, b = load_api_workflow(name), load_api_workflow(twin)
        assert workflow_family(b) == "sdxl"
        shape = lambda g: {nid: (n["class_type"], sorted((k, v) for k, v in n["inputs"].items() if isinstance(v, list)))
                           for nid, n in g.items()}
        assert shape(a) == shape(b), f"{twin} is not wired as {name}"


@pytest.mark.parametrize("name", NAMES)
def test_shipped_workflow_names_real_files_and_the_papers_settings(name):
    graph = load_api_workflow(name)
    text = json.dumps(graph) + (UI_DIR / f"{name}.json").read_text()
    for test_name in ("ic_test", "astronaut_", "_128.png"):
        assert test_name not in text, f"{name} names a test file ({test_name}...)"
    family = workflow_family(graph)
    for nid in nodes_of(graph, "CheckpointLoaderSimple"):
        assert SHIPPED_CHECKPOINTS[graph[nid]["inputs"]["ckpt_name"]] == family
    for nid in nodes_of(graph, "CLIPVisionLoader"):
        assert graph[nid]["inputs"]["clip_name"] == SHIPPED_CLIP_VISION
    loads = nodes_of(graph, "LoadImage")
    assert loads and all(graph[n]["inputs"]["image"] == SHIPPED_IMAGE for n in loads)
    # every photo goes through one resize to the family's size before anything reads it
    scales = nodes_of(graph, "ImageScale")
    assert len(scales) == len(loads)
    for load in loads:
        readers = [nid for nid, node in graph.items() if [load, 0] in node["inputs"].values()]
        assert len(readers) == 1 and readers[0] in scales, f"{readers} read photo {load}; only its resize may"
        size = (graph[readers[0]]["inputs"]["width"], graph[readers[0]]["inputs"]["height"])
        assert size == (FAMILY_SETTINGS[family],) * 2
    for nid, node in graph.items():
        if isinstance(node["inputs"].get("steps"), int) and node["class_type"] != "ICAttentionCapture":
            assert node["inputs"]["steps"] == 50, (nid, node["class_type"])
        title = (node.get("_meta") or {}).get("title", "")
        assert len(title) <= 24, f"node {nid}: title {title!r} is long; explanations go in a Note"


def node_box(node):
    x, y = node["pos"]
    w, h = node["size"]
    return (x, y - TITLE_H, x + w, y + h)


def overlap(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize("name", NAMES)
def test_layout_is_readable(name):
    """No two nodes overlap (title bar included), every node sits in one stage group, the groups do not overlap,
    a Note explains the graph, and the saved view shows the whole graph in a 1920x1080 window at scale >= 0.6."""
    ui = load_ui_workflow(name)
    boxes = {n["id"]: node_box(n) for n in ui["nodes"]}
    ids = sorted(boxes)
    clashes = [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:] if overlap(boxes[a], boxes[b])]
    assert not clashes, f"overlapping nodes: {clashes}"
    groups = [tuple(g["bounding"][:2]) + (g["bounding"][0] + g["bounding"][2], g["bounding"][1] + g["bounding"][3])
              for g in ui["groups"]]
    titles = [g["title"] for g in ui["groups"]]
    assert "Invert" in titles or name.startswith("attention_maps"), titles
    assert "Decode" in titles and len(titles) >= 3, titles
    for i, a in enumerate(groups):
        assert not any(overlap(a, b) for b in groups[i + 1:]), f"groups overlap: {titles}"
    for nid, box in boxes.items():
        inside = [t for t, g in zip(titles, groups) if g[0] <= box[0] and g[1] <= box[1] and box[2] <= g[2]
                  and box[3] <= g[3]]
        assert len(inside) == 1, f"node {nid} is in groups {inside}"
    notes = [n for n in ui["nodes"] if n["type"] == "Note"]
    assert notes and all(len(n["widgets_values"][0]) > 100 for n in notes)
    ds = ui["extra"]["ds"]
    assert ds["scale"] >= 0.6
    everything = list(boxes.values()) + groups
    x0, y0 = min(b[0] for b in everything), min(b[1] for b in everything)
    x1, y1 = max(b[2] for b in everything), max(b[3] for b in everything)
    screen = lambda x, y: ((x + ds["offset"][0]) * ds["scale"], (y + ds["offset"][1]) * ds["scale"])
    (sx0, sy0), (sx1, sy1) = screen(x0, y0), screen(x1, y1)
    assert 0 <= sx0 and 0 <= sy0 and sx1 <= VIEWPORT[0] and sy1 <= VIEWPORT[1], (sx0, sy0, sx1, sy1)
