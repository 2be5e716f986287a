"""DDIM Invert end to end through a headless ComfyUI server (main.py --cpu), as a user's queue would run it.

A NaN latent cannot be built through the API with stock nodes; that case is covered in-process
(tests/test_ddim_invert.py)."""
import json
import math

import pytest
from PIL import Image

from tests.harness.server import ComfyServer, for_test_model, load_api_workflow, nodes_of, ui_output
from tests.harness.measure import measured

pytestmark = pytest.mark.server

WORKFLOW = "ddim_invert_reconstruct"
# Measured through the server (max |reconstruction - source| in latent space): small model, 10 steps,
# refine_iters 3: 3.1e-4 (latent std 2.8); full-size SD1.5 random fp16 checkpoint at its CPU settings
# (tests/harness/server.py TEST_MODELS: 3 steps, refine_iters 2, 64 px photo): 2.0e-4 (latent std 1.2);
# at 10 steps / refine_iters 3 it was 3.4e-5.
MAX_ABS_BOUND = {"small": 1e-3, "sd15": 1e-3}


def node_id(graph, class_type):
    ids = nodes_of(graph, class_type)
    assert len(ids) == 1, (class_type, ids)
    return ids[0]


@pytest.fixture(scope="module")
def base():
    return load_api_workflow(WORKFLOW)


def cheap_graph(base, tag: str):
    """The reconstruct workflow on the small model at 2 steps with a distinct prompt: few model calls, and the
    server really recomputes the inversion (its cache holds the last prompt per node)."""
    graph = for_test_model(base, "small")
    inv = node_id(graph, "ICDDIMInvert")
    graph[inv]["inputs"].update(steps=2, refine_iters=1)
    positive = graph[inv]["inputs"]["positive"][0]
    graph[positive]["inputs"]["text"] = f"a photo of an astronaut ({tag})"
    return graph


def assert_still_serves(server, base, tag):
    graph = cheap_graph(base, tag)
    entry = server.run(graph)
    max_abs = ui_output(entry, "ICLatentDifference", graph)["max_abs"][0]
    assert math.isfinite(max_abs) and max_abs < 0.1, max_abs


@pytest.mark.parametrize("size", ["small", "sd15"])
def test_reconstruct_workflow_round_trips(comfy_server, base, size):
    graph = for_test_model(base, size)
    entry = comfy_server.run_once(graph)
    ui = ui_output(entry, "ICLatentDifference", graph)
    max_abs, mean_abs = ui["max_abs"][0], ui["mean_abs"][0]
    inv = graph[node_id(graph, "ICDDIMInvert")]["inputs"]
    measured(f"{size}: {inv['steps']} steps, refine_iters {inv['refine_iters']}: {ui['text'][0]}")
    assert math.isfinite(max_abs) and math.isfinite(mean_abs)
    assert 0 <= mean_abs <= max_abs < MAX_ABS_BOUND[size]
    if size == "small":
        assert (inv["steps"], inv["refine_iters"]) == (10, 6)  # the committed workflow (steps capped at 10)
    # the reconstruction was decoded and saved at the photo's size
    recon = comfy_server.output_images(entry, node_id(graph, "SaveImage"))
    assert len(recon) == 1
    photo = graph[node_id(graph, "LoadImage")]["inputs"]["image"]
    size_px = int(photo.rsplit(".", 1)[0].rsplit("_", 1)[1])
    assert Image.open(recon[0]).size == (size_px, size_px)


def test_wrong_input_type_is_rejected_with_node_errors(comfy_server, base):
    graph = cheap_graph(base, "type mismatch")
    inv = node_id(graph, "ICDDIMInvert")
    loader = node_id(graph, "CheckpointLoaderSimple")
    graph[inv]["inputs"]["model"] = [loader, 1]  # CLIP into MODEL
    status, body = comfy_server.submit(graph)
    assert status == 400, body
    assert inv in body["node_errors"], body
    text = json.dumps(body["node_errors"][inv])
    assert "model" in text and "CLIP" in text and "MODEL" in text, text
    assert_still_serves(comfy_server, base, "after type mismatch")


def test_sigmas_into_latent_is_rejected(comfy_server, base):
    graph = cheap_graph(base, "sigmas mismatch")
    inv, sampler = node_id(graph, "ICDDIMInvert"), node_id(graph, "SamplerCustom")
    graph[sampler]["inputs"]["latent_image"] = [inv, 1]  # SIGMAS into LATENT
    status, body = comfy_server.submit(graph)
    assert status == 400 and sampler in body["node_errors"], body
    assert "SIGMAS" in json.dumps(body["node_errors"][sampler])
    assert_still_serves(comfy_server, base, "after sigmas mismatch")


@pytest.mark.parametrize("change, expect", [
    ({"steps": 0}, "steps"),
    ({"refine_iters": -1}, "refine_iters"),
    ({"scheduler": "no_such_scheduler"}, "scheduler"),
])
def test_out_of_range_widget_is_a_validation_error(comfy_server, base, change, expect):
    graph = cheap_graph(base, "range")
    inv = node_id(graph, "ICDDIMInvert")
    graph[inv]["inputs"].update(change)
    status, body = comfy_server.submit(graph)
    assert status == 400, body
    assert inv in body["node_errors"], body
    assert expect in json.dumps(body["node_errors"][inv])
    assert_still_serves(comfy_server, base, f"after {change}")


def test_missing_required_input_is_a_validation_error(comfy_server, base):
    graph = cheap_graph(base, "missing input")
    inv = node_id(graph, "ICDDIMInvert")
    del graph[inv]["inputs"]["latent"]
    status, body = comfy_server.submit(graph)
    assert status == 400 and inv in body["node_errors"], body
    assert "latent" in json.dumps(body["node_errors"][inv])
    assert_still_serves(comfy_server, base, "after missing input")


def test_execution_error_reports_the_pack_message(comfy_server, base):
    """inversion_cfg != 1 without `negative` passes validation and fails in the node with the pack's own text."""
    graph = cheap_graph(base, "cfg without negative")
    inv = node_id(graph, "ICDDIMInvert")
    graph[inv]["inputs"]["inversion_cfg"] = 2.0
    error = comfy_server.error_of(graph)
    assert "negative" in error and "execution_error" in error, error
    assert_still_serves(comfy_server, base, "after execution error")


def test_latent_shape_mismatch_is_an_execution_error(comfy_server, base):
    """Latent Difference on latents of different sizes (no sampling needed: VAEEncode vs an empty latent)."""
    full = for_test_model(base, "small")
    keep = {node_id(full, c) for c in ("CheckpointLoaderSimple", "LoadImage", "ImageScale", "VAEEncode",
                                       "ICLatentDifference")}
    graph = {nid: node for nid, node in full.items() if nid in keep}
    diff = node_id(graph, "ICLatentDifference")
    graph["900"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    graph[diff]["inputs"]["latent_a"] = graph[diff]["inputs"]["latent_b"]
    graph[diff]["inputs"]["latent_b"] = ["900", 0]
    error = comfy_server.error_of(graph)
    assert "shapes differ" in error, error
    assert_still_serves(comfy_server, base, "after shape mismatch")


def test_harness_refuses_a_server_without_the_pack_nodes(tmp_path, monkeypatch):
    """An import error of the pack is only logged by ComfyUI; the harness must fail on it (via /object_info)."""
    import tests.harness.server as server_mod
    monkeypatch.setattr(server_mod, "PACK_NODES", ("ICDDIMInvert", "ICNodeThatFailedToImport"))
    server = ComfyServer(tmp_path, checkpoints=())
    with pytest.raises(RuntimeError, match="without the pack's nodes"):
        server.start()
    assert not server.alive()
