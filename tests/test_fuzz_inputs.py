"""Bad inputs for every input of every pack node, posted through the HTTP API of one headless ComfyUI.

The table is generated from the server's /object_info (required and optional inputs alike, whatever they are
named): non-finite, huge, out-of-range and text numbers, empty / unicode / 10,000-character text, unknown choices,
literal values where a link belongs and links of the wrong type. Each case must end in a clear message (HTTP 400
or node_errors naming the input, or an execution error from the pack naming it, with no raw Python exception);
cases that may be valid (empty or unicode text) may also succeed. Afterwards the server must still give a stock
generation bit-identical to the one it gave before."""
import collections
import json
import math

import pytest
import torch

from tests.contract_graphs import RAW_EXCEPTIONS, full_graph, outcome, with_input
from tests.harness import models
from tests.harness.measure import measured

pytestmark = pytest.mark.server

# Wrong-type sources in full_graph: the photo (IMAGE) and its latent (LATENT).
IMAGE_OUT, LATENT_OUT = ["2", 0], ["3", 0]


def bad_values(kind, opts):
    """(label, value, must_fail) for one declared input."""
    wrong_link = LATENT_OUT if kind == "IMAGE" else IMAGE_OUT
    if kind in ("INT", "FLOAT"):
        out = [("NaN", float("nan"), True), ("inf", float("inf"), True),
               ("huge", 10 ** 30 if kind == "INT" else 1e300, True), ("text", "abc", True)]
        if "min" in opts:
            out.append(("below min", opts["min"] - 1, True))
        if "max" in opts:
            out.append(("above max", opts["max"] + 1, True))
        return out + [("wired " + ("LATENT" if kind == "IMAGE" else "IMAGE"), wrong_link, True)]
    if kind == "STRING":
        limit = 10000
        return [(f"{limit} chars", "x" * limit, True), ("empty", "", False),
                ("unicode", "猫 🐱 naïve ünïcödé", False), ("wired IMAGE", IMAGE_OUT, True)]
    if kind == "BOOLEAN":   # ComfyUI itself turns any literal into a bool (bool(val)): only a link can be wrong
        return [("wired IMAGE", IMAGE_OUT, True)]
    if isinstance(kind, list) or kind == "COMBO":
        return [("unknown choice", "no-such-choice", True), ("number", 7, True), ("wired IMAGE", IMAGE_OUT, True)]
    # a wired type (MODEL, LATENT, INVERSION, ...)
    return [("literal number", 5, True), ("wired " + ("LATENT" if kind == "IMAGE" else "IMAGE"), wrong_link, True)]


def fuzz_cases(object_info, graph):
    pack = {name for name, info in object_info.items() if str(info.get("category", "")).startswith("Inversion Chain")}
    cases = []
    for nid, node in graph.items():
        if node["class_type"] not in pack:
            continue
        info = object_info[node["class_type"]]["input"]
        for section in ("required", "optional"):
            for name, spec in (info.get(section) or {}).items():
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                for label, value, must in bad_values(spec[0], opts):
                    cases.append((nid, node["class_type"], section, name, label, value, must))
    return pack, cases


def stock_graph(prefix: str) -> dict:
    return {
        "s1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": models.CHECKPOINT_NAMES["small"]}},
        "s2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "s3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cube", "clip": ["s1", 1]}},
        "s4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["s1", 1]}},
        "s5": {"class_type": "KSampler", "inputs": {"model": ["s1", 0], "seed": 11, "steps": 3, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["s3", 0], "negative": ["s4", 0],
                                                   "latent_image": ["s2", 0], "denoise": 1.0}},
        "s6": {"class_type": "SaveLatent", "inputs": {"samples": ["s5", 0], "filename_prefix": prefix}},
    }


def stock_latent(server, prefix: str) -> torch.Tensor:
    import safetensors.torch
    server.run(stock_graph(prefix))
    files = sorted(server.output_dir.rglob(f"{prefix}*.latent"))
    assert len(files) == 1, files
    return safetensors.torch.load_file(str(files[0]))["latent_tensor"]


def check(case, out):
    """None if the outcome is acceptable, else why not."""
    nid, _, _, name, _, _, must = case
    if out["kind"] == "success":
        return "accepted" if must else None
    text = out["text"]
    if out["kind"] == "rejected":
        errors = out["body"].get("node_errors", {})
        if must and not (nid in errors and name in json.dumps(errors[nid])):
            return f"rejected without naming the input: {text[:300]}"
        return None
    if out["node"] != nid and must:  # a valid but unusual value may fail later, in a node that uses it
        return f"failed in node {out['node']}, not {nid}: {text[:300]}"
    if not out["type"].endswith("InversionChainError"):
        return f"raw {out['type']}: {text[:300]}"
    if any(raw in text for raw in RAW_EXCEPTIONS):
        return f"raw exception text: {text[:300]}"
    if len(text) > 2000:
        return f"message of {len(text)} characters"
    if must and name not in text:
        return f"message does not name `{name}`: {text[:300]}"
    return None


def test_every_input_of_every_node(comfy_server):
    server = comfy_server
    before = stock_latent(server, "fuzz_stock_before")
    graph = full_graph(server.object_info)
    server.run(graph)
    pack, cases = fuzz_cases(server.object_info, graph)
    covered = {(graph[c[0]]["class_type"], c[3]) for c in cases}
    declared = {(ct, n) for ct in pack for s in ("required", "optional")
                for n in (server.object_info[ct]["input"].get(s) or {})}
    assert covered == declared, declared - covered           # every input of every pack node

    submitted = [server.submit(with_input(graph, c[0], **{c[3]: c[5]})) for c in cases]
    failures, table = [], collections.defaultdict(collections.Counter)
    for case, sub in zip(cases, submitted):
        out = outcome(server, sub)
        why = check(case, out)
        if why:
            failures.append(f"{case[1]}.{case[3]} = {case[4]}: {why}")
        kind = {"rejected": "400/node_errors", "error": "pack error", "success": "accepted"}[out["kind"]]
        table[f"{case[1]}.{case[3]} ({case[2]})"][f"{case[4]}: {kind}"] += 1
    measured(f"\n{len(cases)} bad-input graphs over {len(covered)} inputs of {len(pack)} nodes")
    for key in sorted(table):
        measured(f"  {key}: " + "; ".join(sorted(table[key])))
    assert not failures, "\n".join(failures)

    assert server.alive()
    after = stock_latent(server, "fuzz_stock_after")
    assert torch.equal(before, after) and math.isfinite(float(after.abs().sum()))
