"""The shipped workflow files, read without ComfyUI: every API copy (workflows/api/*.json) is well formed and has a
UI copy (workflows/*.json) that is what the converter makes from it and the node snapshot, every technique ships for
SD1.5 and SDXL with the same graph, names only real model files with the papers' settings, and is laid out readably.
That each UI copy rebuilds its API copy against a live server, and that every graph runs, is tests/test_workflows.py.
"""
import json

import pytest

from tests.harness.server import (SHIPPED_CHECKPOINTS, SHIPPED_CLIP_VISION, SHIPPED_IMAGE, api_workflow_names,
                                  load_api_workflow, nodes_of, workflow_family)
from tests.harness.workflow_files import UI_DIR, load_converter, load_ui_workflow

pytestmark = pytest.mark.fast

NAMES = api_workflow_names()
VIEWPORT = (1920, 1080)
TITLE_H = 30  # LiteGraph.NODE_TITLE_HEIGHT, drawn above a node's pos


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
def test_ui_copy_is_up_to_date_with_the_converter(name):
    """The UI copy is what the converter makes from the API copy and the node definitions it was made with (the
    snapshot); whether those definitions still hold on the running tree is the next test's question."""
    converter = load_converter()
    snapshot = json.loads(converter.SNAPSHOT.read_text())["nodes"]
    expected = converter.dumps(converter.api_to_ui(load_api_workflow(name), snapshot, name))
    assert (UI_DIR / f"{name}.json").read_text() == expected, \
        f"workflows/{name}.json is stale: run .venv/bin/python scripts/make_ui_workflow.py"


# -- what a user gets ------------------------------------------------------------------------------------------
FAMILY_SETTINGS = {"sd15": 512, "sdxl": 1024, "flux": 1024, "qwen": 1024}
# the papers' 50 steps; Flux-dev's usual 28 (ComfyUI's Flux templates use 20-28; the round trip is tested at 28)
FAMILY_STEPS = {"flux": 28}


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
    generated = not nodes_of(graph, "VAEEncode")   # a graph that edits a generated image (P2Plus on Flux) has no photo
    assert (loads or generated) and all(graph[n]["inputs"]["image"] == SHIPPED_IMAGE for n in loads)
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
            assert node["inputs"]["steps"] == FAMILY_STEPS.get(family, 50), (nid, node["class_type"])
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
    photo = bool(nodes_of(load_api_workflow(name), "LoadImage"))   # no photo: nothing to invert (generated image)
    assert "Invert" in titles or name.startswith("attention_maps") or not photo, titles
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
