"""Convert every API-format workflow in workflows/api/*.json into the UI (LiteGraph) format that the ComfyUI
frontend loads by drag-and-drop or "Load": workflows/<name>.json.

    .venv/bin/python scripts/make_ui_workflow.py                   # starts a headless ComfyUI for /object_info
    .venv/bin/python scripts/make_ui_workflow.py --url http://127.0.0.1:8188   # ask a running ComfyUI
    .venv/bin/python scripts/make_ui_workflow.py --check           # exit 1 if a UI copy is missing or stale

The API copy is the source of truth (tests run it); the UI copy is generated from it. Widget conventions follow
the ComfyUI frontend (checked against the 2024-03 web/ code, unchanged in later frontends):
- a node's inputs are its ``required`` then ``optional`` inputs in /object_info order; an input whose type is a
  list (COMBO), INT, FLOAT, STRING or BOOLEAN is a widget, any other type is a link slot;
- ``widgets_values`` lists every widget's value in that order, including frontend-only widgets that are not sent
  to the server: after an INT named ``seed``/``noise_seed`` (or any input with ``control_after_generate``) comes
  its "control after generate" value (we write "fixed" so that a loaded workflow reproduces the API copy); after
  a COMBO with ``control_after_generate`` also its filter-list value ""; an ``image`` input with
  ``image_upload: true`` (LoadImage) is followed by the upload button's value "image";
- a widget input that the API graph feeds from a link becomes a "converted widget": an input slot carrying
  ``widget: {name}`` (appended after the regular slots), its widget value kept in ``widgets_values``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
API_DIR = REPO_ROOT / "workflows" / "api"
UI_DIR = REPO_ROOT / "workflows"

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
SEED_NAMES = ("seed", "noise_seed")
COLUMN_GAP = 60
ROW_GAP = 40


# -- node definitions ------------------------------------------------------------------------------------------
def node_inputs(defn: dict) -> list[tuple[str, object, dict]]:
    """(name, type, options) of a node's inputs in frontend order: required, then optional (hidden ones skipped)."""
    out = []
    for section in ("required", "optional"):
        for name, spec in (defn.get("input", {}).get(section) or {}).items():
            kind = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            out.append((name, kind, options))
    return out


def is_widget(kind, options: dict) -> bool:
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput")


def widget_slots(name: str, kind, options: dict) -> list[tuple[str, str]]:
    """The widgets_values entries one widget input occupies: [(role, name)], role 'value' or 'control'."""
    slots = [("value", name)]
    control = options.get("control_after_generate")
    if kind == "INT" and (name in SEED_NAMES or control):
        slots.append(("control", "control_after_generate"))
    elif isinstance(kind, list) and control:
        slots += [("control", "control_after_generate"), ("control", "control_filter_list")]
    if name == "image" and options.get("image_upload") is True:
        slots.append(("control", "upload"))
    return slots


CONTROL_VALUES = {"control_after_generate": "fixed", "control_filter_list": "", "upload": "image"}


def widget_default(kind, options: dict):
    if "default" in options:
        return options["default"]
    if isinstance(kind, list):
        return kind[0] if kind else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(kind)


def output_type(defn: dict, slot: int) -> str:
    kind = defn["output"][slot]
    return "COMBO" if isinstance(kind, list) else kind


def output_names(defn: dict) -> list[str]:
    names = defn.get("output_name") or []
    return [names[i] if i < len(names) and names[i] else output_type(defn, i) for i in range(len(defn["output"]))]


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


# -- layout ----------------------------------------------------------------------------------------------------
def depths(graph: dict) -> dict[str, int]:
    """Longest distance from a source node, for left-to-right columns."""
    memo: dict[str, int] = {}

    def depth(nid, stack=()):
        if nid in memo:
            return memo[nid]
        if nid in stack:
            raise ValueError(f"the graph has a cycle through node {nid}")
        parents = [v[0] for v in graph[nid]["inputs"].values() if is_link(v)]
        memo[nid] = 1 + max((depth(p, stack + (nid,)) for p in parents), default=-1)
        return memo[nid]

    for nid in graph:
        depth(nid)
    return memo


def node_size(class_type: str, n_slots: int, n_widgets: int, options_by_name: dict) -> list[int]:
    multiline = any(o.get("multiline") for o in options_by_name.values())
    height = 30 + 22 * n_slots + 26 * n_widgets
    if multiline:
        height += 80
    if class_type in ("LoadImage",):
        height += 250
    if class_type in ("SaveImage", "PreviewImage"):
        height = max(height, 270)
    return [400 if multiline else 320, height]


# -- conversion ------------------------------------------------------------------------------------------------
def api_to_ui(graph: dict, object_info: dict) -> dict:
    missing = sorted({n["class_type"] for n in graph.values()} - set(object_info))
    if missing:
        raise KeyError(f"node types unknown to this ComfyUI: {missing}")
    if not all(str(nid).isdigit() for nid in graph):
        raise ValueError("API node ids must be strings of integers (the UI uses integer ids)")
    order_ids = sorted(graph, key=int)
    depth = depths(graph)
    topo = sorted(order_ids, key=lambda n: (depth[n], int(n)))

    nodes, links = {}, []
    for nid in order_ids:
        api = graph[nid]
        defn = object_info[api["class_type"]]
        inputs_def = node_inputs(defn)
        known = {name for name, _, _ in inputs_def}
        unknown = sorted(set(api["inputs"]) - known)
        if unknown:
            raise KeyError(f"node {nid} ({api['class_type']}): inputs {unknown} are not in its definition")
        slots, converted, widgets_values = [], [], []
        for name, kind, options in inputs_def:
            value = api["inputs"].get(name)
            if is_widget(kind, options):
                linked = is_link(value)
                if linked:
                    converted.append({"name": name, "type": "COMBO" if isinstance(kind, list) else kind,
                                      "link": value, "widget": {"name": name}})
                    value = widget_default(kind, options)
                elif name not in api["inputs"]:
                    raise KeyError(f"node {nid} ({api['class_type']}): widget input {name!r} has no value; write "
                                   f"every widget value into the API copy (the frontend always sends them)")
                for role, slot_name in widget_slots(name, kind, options):
                    widgets_values.append(value if role == "value" else CONTROL_VALUES[slot_name])
            else:
                if value is None:
                    if name in (defn["input"].get("required") or {}):
                        raise KeyError(f"node {nid} ({api['class_type']}): required input {name!r} is not linked")
                    slots.append({"name": name, "type": kind, "link": None})
                    continue
                if not is_link(value):
                    raise ValueError(f"node {nid} ({api['class_type']}): input {name!r} must be a link, got {value!r}")
                slots.append({"name": name, "type": kind, "link": value})
        node_inputs_ui = slots + converted
        names = output_names(defn)
        outputs = [{"name": names[i], "type": output_type(defn, i), "links": [], "slot_index": i}
                   for i in range(len(defn["output"]))]
        if defn.get("output_is_list"):
            for i, is_list in enumerate(defn["output_is_list"]):
                if is_list:
                    outputs[i]["shape"] = 6  # LiteGraph.GRID_SHAPE, as the frontend draws list outputs
        ui = {"id": int(nid), "type": api["class_type"], "pos": [0, 0],
              "size": node_size(api["class_type"], max(len(node_inputs_ui), len(outputs)),
                                len(widgets_values), {n: o for n, _, o in inputs_def}),
              "flags": {}, "order": topo.index(nid), "mode": 0}
        if node_inputs_ui:
            ui["inputs"] = node_inputs_ui
        ui["outputs"] = outputs
        title = (api.get("_meta") or {}).get("title")
        if title and title != (defn.get("display_name") or api["class_type"]):
            ui["title"] = title
        ui["properties"] = {"Node name for S&R": api["class_type"]}
        if widgets_values:
            ui["widgets_values"] = widgets_values
        nodes[nid] = ui

    # links, numbered in target node order then input order
    for nid in order_ids:
        for slot_index, inp in enumerate(nodes[nid].get("inputs", [])):
            if inp["link"] is None:
                continue
            src, src_slot = inp["link"]
            if src not in graph:
                raise KeyError(f"node {nid} input {inp['name']!r} links to missing node {src}")
            src_def = object_info[graph[src]["class_type"]]
            if src_slot >= len(src_def["output"]):
                raise IndexError(f"node {nid} input {inp['name']!r} links to output {src_slot} of node {src}, "
                                 f"which has {len(src_def['output'])} outputs")
            link_id = len(links) + 1
            links.append([link_id, int(src), src_slot, int(nid), slot_index, output_type(src_def, src_slot)])
            inp["link"] = link_id
            nodes[src]["outputs"][src_slot]["links"].append(link_id)

    # left-to-right by depth, stacked top-down within a column
    n_columns = max(depth.values(), default=-1) + 1
    column_x = [50]
    for d in range(n_columns):
        width = max(nodes[n]["size"][0] for n in graph if depth[n] == d)
        column_x.append(column_x[-1] + width + COLUMN_GAP)
    column_y: dict[int, float] = {}
    for nid in topo:
        d = depth[nid]
        y = column_y.get(d, 50)
        nodes[nid]["pos"] = [column_x[d], y]
        column_y[d] = y + nodes[nid]["size"][1] + ROW_GAP

    return {
        "last_node_id": max((int(n) for n in graph), default=0),
        "last_link_id": len(links),
        "nodes": [nodes[nid] for nid in order_ids],
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}},
        "version": 0.4,
    }


def dumps(workflow: dict) -> str:
    """Indented JSON with short lists of scalars (pos, size, links, widgets_values) kept on one line."""
    def flat(obj, indent=0):
        pad = "  " * indent
        if isinstance(obj, dict):
            if not obj:
                return "{}"
            items = [f'{pad}  {json.dumps(k)}: {flat(v, indent + 1)}' for k, v in obj.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(obj, list):
            def scalars(v):
                return isinstance(v, list) and not any(isinstance(x, (dict, list)) for x in v)
            if scalars(obj):
                return json.dumps(obj)
            if all(scalars(v) for v in obj):
                return "[\n" + ",\n".join(f"{pad}  {json.dumps(v)}" for v in obj) + "\n" + pad + "]"
            return "[\n" + ",\n".join(f"{pad}  {flat(v, indent + 1)}" for v in obj) + "\n" + pad + "]"
        return json.dumps(obj)
    text = flat(workflow) + "\n"
    assert json.loads(text) == workflow
    return text


# -- object_info -----------------------------------------------------------------------------------------------
def fetch_object_info(url: str) -> dict:
    with urllib.request.urlopen(url.rstrip("/") + "/object_info", timeout=60) as r:
        return json.loads(r.read())


def object_info_from_headless_server() -> dict:
    sys.path.insert(0, str(REPO_ROOT))
    from tests.harness.server import ComfyServer
    with tempfile.TemporaryDirectory(prefix="ic_ui_workflow_") as tmp:
        server = ComfyServer(Path(tmp), checkpoints=())
        with server:
            return server.object_info


def convert_all(object_info: dict, names=None) -> dict[str, str | Exception]:
    """{name: UI JSON text, or the error that stopped its conversion} for every API workflow (or just ``names``)."""
    paths = sorted(API_DIR.glob("*.json"))
    if names:
        paths = [p for p in paths if p.stem in names]
    result = {}
    for p in paths:
        try:
            result[p.stem] = dumps(api_to_ui(json.loads(p.read_text()), object_info))
        except (KeyError, ValueError, IndexError) as exc:
            result[p.stem] = exc
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="workflow names (default: every workflows/api/*.json)")
    ap.add_argument("--url", help="a running ComfyUI to read /object_info from (default: start a headless one)")
    ap.add_argument("--object-info", type=Path, help="a saved /object_info JSON file")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a UI copy is missing or stale")
    args = ap.parse_args(argv)
    if args.object_info:
        info = json.loads(args.object_info.read_text())
    elif args.url:
        info = fetch_object_info(args.url)
    else:
        info = object_info_from_headless_server()
    stale = []
    for name, text in convert_all(info, args.names).items():
        target = UI_DIR / f"{name}.json"
        if isinstance(text, Exception):
            stale.append(name)
            print(f"ERROR: workflows/api/{name}.json: {text}", file=sys.stderr)
            continue
        current = target.read_text() if target.is_file() else None
        if current == text:
            print(f"up to date: {target.relative_to(REPO_ROOT)}")
            continue
        if args.check:
            stale.append(name)
            print(f"stale: {target.relative_to(REPO_ROOT)}")
        else:
            target.write_text(text)
            print(f"wrote {target.relative_to(REPO_ROOT)}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
