"""One cheap API graph that runs every pack node on the small test model (64 px photo, 3 steps), and helpers to
post graphs that must fail and read the error a user would see."""
from __future__ import annotations

import copy
import json

from tests.harness import models

STEPS = 3
SOURCE = "a photo of an astronaut"
# Python exception names that must never reach a user message (the pack's own errors say what to change).
RAW_EXCEPTIONS = ("TypeError", "AttributeError", "ZeroDivisionError", "RuntimeError", "KeyError", "IndexError",
                  "OverflowError", "Traceback", "object has no attribute", "unsupported operand", "NoneType")


def full_graph(object_info: dict) -> dict:
    """Every pack node once, each feeding an output node (~20 s cold on 2 CPU cores, then cached by the server)."""
    ckpt, photo = models.CHECKPOINT_NAMES["small"], "astronaut_64.png"
    sampler = dict(add_noise="disable", noise_seed=0, steps=STEPS, sampler_name="ddim", scheduler="ddim_uniform",
                   start_at_step=0, end_at_step=10000, return_with_leftover_noise="disable")
    g = {
        "1": ("CheckpointLoaderSimple", {"ckpt_name": ckpt}),
        "2": ("LoadImage", {"image": photo}),
        "3": ("VAEEncode", {"pixels": ["2", 0], "vae": ["1", 2]}),
        "4": ("CLIPTextEncode", {"text": SOURCE, "clip": ["1", 1]}),
        "5": ("CLIPTextEncode", {"text": "", "clip": ["1", 1]}),
        "6": ("ICDDIMInvert", {"model": ["1", 0], "latent": ["3", 0], "positive": ["4", 0], "steps": STEPS,
                               "inversion_cfg": 1.0, "refine_iters": 1, "scheduler": "ddim_uniform"}),
        "7": ("ICNullTextInversion", {"model": ["1", 0], "inversion": ["6", 2], "positive": ["4", 0],
                                      "negative": ["5", 0], "cfg": 7.5, "inner_steps": 1, "method": "null-text",
                                      "learning_rate": 0.01}),
        "8": ("ICP2PlusController", {"model": ["1", 0], "clip": ["1", 1], "source_prompt": SOURCE,
                                     "target_prompt": "a photo of a robot", "mode": "replace", "reweight": "",
                                     "blend_words": "astronaut, robot", "blend_threshold": 0.3,
                                     "inversion": ["6", 2], "null_text": ["7", 0], "seed": 0, "steps": STEPS,
                                     "scheduler": "ddim_uniform", "self_replace_max_res": 32}),
        "9": ("KSamplerAdvanced", dict(sampler, model=["8", 0], cfg=7.5, positive=["8", 1], negative=["8", 2],
                                       latent_image=["8", 3])),
        "10": ("LatentFromBatch", {"samples": ["9", 0], "batch_index": 0, "length": 1}),
        "11": ("ICLatentDifference", {"latent_a": ["10", 0], "latent_b": ["3", 0]}),
        "12": ("ICKVInject", {"model": ["1", 0], "inversion": ["6", 2], "start_layer": 10,
                              "mode": "mutual", "mask_words": "", "clip": ["1", 1], "source_prompt": SOURCE,
                              "cache": "auto"}),
        "13": ("KSamplerAdvanced", dict(sampler, model=["12", 0], cfg=1.0, positive=["4", 0], negative=["5", 0],
                                        latent_image=["6", 0])),
        "14": ("ICLatentDifference", {"latent_a": ["13", 0], "latent_b": ["3", 0]}),
        "15": ("ICRIVALAlignSampler", {"model": ["1", 0], "positive": ["4", 0], "negative": ["5", 0],
                                       "inversion": ["6", 2], "seed": 0, "batch_size": 1, "cfg": 5.0,
                                       "init": "permute", "normalize": "eps", "reference_kv": "cache"}),
        "16": ("ICLatentDifference", {"latent_a": ["15", 0], "latent_b": ["15", 1]}),
        "17": ("ICAttentionCapture", {"model": ["1", 0], "kinds": "cross + self", "resolution": "latent/4",
                                      "detail": "per layer", "query_grid": 2, "clip": ["1", 1], "prompt": SOURCE,
                                      "negative_prompt": ""}),
        "18": ("KSampler", {"model": ["17", 0], "seed": 0, "steps": STEPS, "cfg": 5.0, "sampler_name": "ddim",
                            "scheduler": "ddim_uniform", "positive": ["4", 0], "negative": ["5", 0],
                            "latent_image": ["3", 0], "denoise": 0.8}),
        "19": ("VAEDecode", {"samples": ["18", 0], "vae": ["1", 2]}),
        "20": ("ICAttentionMapViewer", {"attn_maps": ["17", 1], "latent": ["18", 0], "kind": "cross", "tokens": "",
                                        "layers": "all", "resolution": "all captured",
                                        "branch": "cond", "row": 0, "normalize": "per tile", "columns": 0,
                                        "image": ["19", 0]}),
        "21": ("PreviewImage", {"images": ["20", 0]}),
        "22": ("CLIPVisionLoader", {"clip_name": models.CLIP_VISION_NAME}),
        "23": ("ICStyleDiffusionMapper", {"model": ["1", 0], "clip_vision": ["22", 0], "image": ["2", 0],
                                          "inversion": ["6", 2], "positive": ["4", 0], "negative": ["5", 0],
                                          "cfg": 7.5, "inner_steps": 1, "learning_rate": 0.01,
                                          "attention_loss_weight": 1.0}),
        "24": ("PreviewImage", {"images": ["23", 1]}),
        "25": ("ICStyleDiffusionApply", {"model": ["1", 0], "style": ["23", 0]}),
        "26": ("KSamplerAdvanced", dict(sampler, model=["25", 0], cfg=7.5, positive=["4", 0], negative=["5", 0],
                                        latent_image=["6", 0])),
        "27": ("ICLatentDifference", {"latent_a": ["26", 0], "latent_b": ["3", 0]}),
        "28": ("ICStyleDiffusionStyleTransfer", {"model": ["1", 0], "style": ["23", 0], "content_inversion": ["6", 2],
                                                 "cache": "auto"}),
        "29": ("SamplerCustom", {"model": ["28", 0], "add_noise": False, "noise_seed": 0, "cfg": 7.5,
                                 "positive": ["28", 1], "negative": ["28", 2], "sampler": ["30", 0],
                                 "sigmas": ["28", 4], "latent_image": ["28", 3]}),
        "30": ("KSamplerSelect", {"sampler_name": "ddim"}),
        "31": ("ICLatentDifference", {"latent_a": ["29", 0], "latent_b": ["3", 0]}),
        "32": ("ICInvertedNoise", {"model": ["1", 0], "inversion": ["6", 2]}),
        "33": ("ICFreeCaches", {"disk_cache": False}),
        "34": ("ICNullTextConditioning", {"model": ["1", 0], "null_text": ["7", 0]}),
        "35": ("KSamplerAdvanced", dict(sampler, model=["1", 0], cfg=7.5, positive=["4", 0], negative=["34", 0],
                                        latent_image=["6", 0])),
        "36": ("ICLatentDifference", {"latent_a": ["35", 0], "latent_b": ["3", 0]}),
    }
    graph = {nid: {"class_type": ct, "inputs": dict(inputs)} for nid, (ct, inputs) in g.items()}
    kv = object_info["ICKVInject"]["input"]["required"]
    start = [n for n in kv if n.startswith("start_") and n != "start_layer"]  # start_step, or its renamed fraction
    graph["12"]["inputs"][start[0]] = kv[start[0]][1]["min"]  # injecting from the first step on
    return complete(graph, object_info)


def complete(graph: dict, object_info: dict) -> dict:
    """Widgets the graph leaves out take their declared defaults (the time widgets: their names may change)."""
    for node in graph.values():
        info = object_info[node["class_type"]]["input"]
        for section in ("required", "optional"):
            for name, spec in (info.get(section) or {}).items():
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if name not in node["inputs"] and "default" in opts:
                    node["inputs"][name] = opts["default"]
    return graph


def node_of(graph: dict, class_type: str) -> str:
    ids = [nid for nid, n in graph.items() if n["class_type"] == class_type]
    assert len(ids) == 1, (class_type, ids)
    return ids[0]


def with_input(graph: dict, nid: str, **values) -> dict:
    """A copy of the whole graph (so the server's cache keeps every other node) with inputs of ``nid`` set."""
    g = copy.deepcopy(graph)
    g[nid]["inputs"].update(values)
    return g


def submit_all(server, graphs: list) -> list:
    """POST every graph (the queue runs them one after another); returns [(status, body)]."""
    return [server.submit(g) for g in graphs]


def outcome(server, submitted, timeout: float = 600) -> dict:
    """{"kind": "rejected" | "error" | "success", "text": user-visible message, "node": failing node id, ...}."""
    status, body = submitted
    if status != 200 or body.get("node_errors"):  # 200 with node_errors: ComfyUI runs only the valid outputs
        return {"kind": "rejected", "text": json.dumps(body), "body": body}
    entry = server.wait(body["prompt_id"], timeout)
    if entry["status"].get("status_str") == "success":
        return {"kind": "success", "text": "", "entry": entry}
    for kind, data in entry["status"].get("messages", []):
        if kind == "execution_error":
            return {"kind": "error", "text": data.get("exception_message", ""), "node": str(data.get("node_id")),
                    "type": data.get("exception_type", "")}
    return {"kind": "error", "text": json.dumps(entry["status"]), "node": None, "type": ""}


def expect_error(server, graph: dict, nid: str, name: str) -> str:
    """The graph fails with a clear message about input ``name`` of node ``nid``; returns the message."""
    out = outcome(server, server.submit(graph))
    assert out["kind"] != "success", f"{nid}.{name}: accepted"
    if out["kind"] == "rejected":
        errors = out["body"].get("node_errors", {})
        assert nid in errors and name in json.dumps(errors[nid]), out["text"][:1000]
    else:
        assert out["node"] == nid and name in out["text"], out
        assert out["type"].endswith("InversionChainError"), out
        assert not any(raw in out["text"] for raw in RAW_EXCEPTIONS), out
        assert len(out["text"]) < 2000, out["text"][:300]
    return out["text"]
