"""The known bad-input defects, each posted through the HTTP API of a headless ComfyUI as a client would send it
(one graph with every pack node on the small model; the server caches what a mutation does not touch)."""
import json

import pytest

from tests.contract_graphs import RAW_EXCEPTIONS, expect_error, full_graph, node_of, outcome, with_input
from tests.harness.measure import measured

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def graph(comfy_server):
    g = full_graph(comfy_server.object_info)
    comfy_server.run(g)
    return g


def time_input(object_info, class_type: str, prefix: str) -> str:
    """The node's step-timing widget, found by name prefix (the widget vocabulary is being renamed)."""
    info = object_info[class_type]["input"]
    names = [n for s in ("required", "optional") for n in (info.get(s) or {}) if n.startswith(prefix)
             and n != "start_layer"]
    assert len(names) == 1, names
    return names[0]


def test_rival_largest_seed_wraps_like_comfyui_seeds(comfy_server, graph):
    """seed 2^64-1 with 2 variations: the second uses seed 2^64 = 0 (mod 2^64), so it equals seed 0's first."""
    rid = node_of(graph, "ICRIVALAlignSampler")
    g = with_input(graph, rid, seed=2 ** 64 - 1, batch_size=2)
    del g["16"]  # compared one variation with the reference row
    g["90"] = {"class_type": "LatentFromBatch", "inputs": {"samples": [rid, 0], "batch_index": 1, "length": 1}}
    g["91"] = {"class_type": "ICRIVALAlignSampler", "inputs": dict(graph[rid]["inputs"], seed=0, batch_size=1)}
    g["92"] = {"class_type": "ICLatentDifference", "inputs": {"latent_a": ["90", 0], "latent_b": ["91", 0]}}
    entry = comfy_server.run(g)
    max_abs = entry["outputs"]["92"]["max_abs"][0]
    measured(f"RIVAL seed 2^64-1 row 1 vs seed 0 row 0: max {max_abs:.2e}")
    assert max_abs < 1e-4


def test_kv_inject_start_beyond_the_inversion_says_so(comfy_server, graph):
    nid = node_of(graph, "ICKVInject")
    name = time_input(comfy_server.object_info, "ICKVInject", "start_")
    latest = comfy_server.object_info["ICKVInject"]["input"]["required"][name][1]["max"]
    text = expect_error(comfy_server, with_input(graph, nid, **{name: latest}), nid, name)
    assert "nothing would be injected" in text


def test_mask_word_after_the_first_77_tokens_says_so(comfy_server, graph):
    nid = node_of(graph, "ICKVInject")
    prompt = "a photo of an astronaut, " + ", ".join(["red"] * 60) + ", cat"
    text = expect_error(comfy_server, with_input(graph, nid, mode="masked", mask_words="cat", source_prompt=prompt,
                                                 target_prompt="a photo of a cat"), nid, "mask_words")
    assert "first 77-token window" in text and "not in the prompt" not in text


def test_rival_cfg_nan(comfy_server, graph):
    nid = node_of(graph, "ICRIVALAlignSampler")
    assert "accepted: a finite number" in expect_error(comfy_server, with_input(graph, nid, cfg=float("nan")), nid,
                                                       "cfg")


@pytest.mark.parametrize("steps", [0, -3, 10000, float("nan")])
def test_p2plus_optional_steps(comfy_server, graph, steps):
    nid = node_of(graph, "ICP2PlusController")
    expect_error(comfy_server, with_input(graph, nid, steps=steps), nid, "steps")


@pytest.mark.parametrize("name,value", [("blend_threshold", 5.0), ("self_replace_max_res", 0)])
def test_p2plus_out_of_range_options(comfy_server, graph, name, value):
    nid = node_of(graph, "ICP2PlusController")
    expect_error(comfy_server, with_input(graph, nid, **{name: value}), nid, name)


@pytest.mark.parametrize("class_type,name,source", [
    ("ICP2PlusController", "latent", ["2", 0]),        # an IMAGE into the optional LATENT
    ("ICP2PlusController", "clip", ["1", 0]),          # a MODEL into CLIP
    ("ICAttentionMapViewer", "image", ["3", 0]),       # a LATENT into the optional IMAGE
])
def test_wrong_types_wired(comfy_server, graph, class_type, name, source):
    nid = node_of(graph, class_type)
    expect_error(comfy_server, with_input(graph, nid, **{name: source}), nid, name)


@pytest.mark.parametrize("name,value", [("cfg", "strong"), ("learning_rate", "fast"), ("inner_steps", 101)])
def test_null_text_inputs_reached_through_an_optional_link(comfy_server, graph, name, value):
    nid = node_of(graph, "ICNullTextInversion")
    expect_error(comfy_server, with_input(graph, nid, **{name: value}), nid, name)


def test_null_text_numbers_as_text_are_converted_as_comfyui_does(comfy_server, graph):
    nid = node_of(graph, "ICNullTextInversion")
    out = outcome(comfy_server, comfy_server.submit(with_input(graph, nid, cfg="7.5", learning_rate="0.01")))
    assert out["kind"] == "success", out["text"][:500]


def test_viewer_specs_are_bounded(comfy_server, graph):
    nid = node_of(graph, "ICAttentionMapViewer")
    ok = outcome(comfy_server, comfy_server.submit(with_input(graph, nid, layers="0-5000000")))
    assert ok["kind"] == "success", ok["text"][:500]        # clamped to the model's layers, not a 5M-element set
    text = expect_error(comfy_server, with_input(graph, nid, tokens=",".join(["#1"] * 300)), nid, "tokens")
    assert "at most 256 tiles" in text
    assert not any(raw in text for raw in RAW_EXCEPTIONS) and len(json.dumps(text)) < 400


def test_style_cache_survives_a_restart(comfy_server, graph):
    """The StyleDiffusion Mapper trained in this session loads from disk after the server restarts (the temp folder
    is emptied at start, the cache folder is not)."""
    comfy_server.stop()
    comfy_server.start()
    nid = node_of(graph, "ICStyleDiffusionMapper")
    entry = comfy_server.run(graph)
    assert entry["status"]["status_str"] == "success"
    log = comfy_server.log_path.read_text(errors="replace")
    assert "StyleDiffusion Mapper: loaded the trained mappers' values from the disk cache" in log, \
        comfy_server.log_tail(40)
    assert nid
