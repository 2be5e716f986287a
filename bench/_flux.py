"""The Flux-layout bench model: ComfyUI's own Flux class (FLUX.1-dev's layout: guidance embedding, double then single
stream blocks, RoPE axes 16 + 56 + 56), scaled down, seeded random weights, saved once under the harness cache and
loaded through the stock UNETLoader's ``comfy.sd.load_diffusion_model``; the text encoders (shrunk CLIP-L + T5 with the
real tokenizers) and the 16-channel TAESD are the test harness' (tests/harness/flow_models.py).

Larger than the test layout (1 + 1 blocks, hidden 128) so that a step is model work, not Python: hidden 384 (3 heads
of 128, what Flux's detection infers from the widths), 2 double + 4 single blocks (FLUX.1-dev: 19 + 38).
"""
from __future__ import annotations

import functools
import logging
import time

import torch

from bench import common

log = logging.getLogger("bench.flux")

NAME = "ic_bench_flux_dev_layout.safetensors"
HIDDEN, DOUBLE, SINGLE = 384, 2, 4
GUIDANCE = 3.5        # FluxGuidance's default


def config() -> dict:
    from tests.harness import flow_models
    return {**flow_models.DIT_CONFIGS["flux"], "hidden_size": HIDDEN, "num_heads": HIDDEN // 128, "depth": DOUBLE,
            "depth_single_blocks": SINGLE}


def missing() -> str | None:
    """None on a tree with Flux and its attention patch; else why the flow benchmarks cannot run."""
    common.setup()
    from inversion_chain import compat
    for feature in ("flux-models", "dit-attention-patches"):
        reason = compat.missing_feature_message(feature, "each flow benchmark")
        if reason:
            return reason
    return None


@torch.no_grad()
def _build(path):
    import comfy.supported_models as sm
    from tests.harness import flow_models
    with torch.inference_mode(False):
        cfg = sm.Flux(config())
        cfg.set_inference_dtype(torch.float32, None)
        base = cfg.get_model({}, "", device=torch.device("cpu"))
        flow_models.fill_flow_seeded_(base.diffusion_model, flow_models.SEEDS["flux"] + 100)
        flow_models._save({k: v.clone() for k, v in base.diffusion_model.state_dict().items()}, path)


@functools.lru_cache(maxsize=None)
def load():
    """(MODEL, CLIP, VAE) of the Flux-layout bench model."""
    common.setup()
    import comfy.sd
    from tests.harness import flow_models
    from tests.harness.comfy_env import CACHE_DIR
    path = CACHE_DIR / "diffusion_models" / NAME
    t0 = time.perf_counter()
    if not path.is_file():
        _build(path)
    with torch.inference_mode():
        model = comfy.sd.load_diffusion_model(str(path))
    log.info("loaded the Flux-layout bench model in %.1fs", time.perf_counter() - t0)
    return model, flow_models.load_clip("flux"), flow_models.load_vae()


def encode(clip, text: str):
    """CLIPTextEncode then FluxGuidance, as a Flux-dev graph builds its conditioning."""
    import node_helpers
    with torch.inference_mode():
        out = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True, return_dict=True)
        cond = out.pop("cond")
        return node_helpers.conditioning_set_values([[cond, out]], {"guidance": GUIDANCE})


def size() -> dict:
    model = load()[0]
    dm = model.model.diffusion_model
    return {"model": "Flux layout (ComfyUI comfy.ldm.flux.model.Flux)", "hidden": HIDDEN, "double_blocks": DOUBLE,
            "single_blocks": SINGLE, "params": sum(p.numel() for p in dm.parameters())}
