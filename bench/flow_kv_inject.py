"""KV Inject on a Flux-layout model (warm cache, and recompute) vs stock sampling with the same prompt and noise.

Both sides run the stock graph's sampling (``comfy.sample.sample_custom``, euler, DDIM Invert's sigmas, cfg 1 with
FluxGuidance) from the inverted latent with the target prompt; ours on the MODEL KV Inject returns (mutual,
``start_layer`` -1 = Stable Flow's vital blocks at this layout's relative depths, ``start_percent`` 0 = every step
injected, as Stable Flow), the source's image-token K/V cached once before timing (a second run finds them), so the
ratio is the per-step cost of the injection. Target: <= 1.15, as on the UNet families. Also: recompute mode (the
source's forward next to each step: about 2x by construction) and the cache's bytes against its estimate.
"""
from __future__ import annotations

import torch

from bench import _flux, common, register
from bench.flow_invert import inverted_noise

IMAGE_PX, STEPS, SCHEDULER = 256, 10, "simple"
TARGET_RATIO = 1.15
START_PERCENT, START_LAYER = 0.0, -1


@register("flow_kv_inject", "KV Inject on a Flux-layout model (warm cache, recompute) vs stock sampling, 10 steps")
def run() -> dict:
    reason = _flux.missing()
    if reason:
        return {"benchmark": "flow_kv_inject", "skipped": reason}
    import comfy.sample
    import comfy.samplers
    from inversion_chain.attention.core import dit_layers
    from inversion_chain.attention.store import reference
    from inversion_chain.nodes.invert import ICDDIMInvert
    from inversion_chain.nodes.kv_inject import ICKVInject

    model, clip, vae = _flux.load()
    src = _flux.encode(clip, "a photo of an astronaut")
    tgt = _flux.encode(clip, "a photo of an astronaut dancing")
    latent = common.photo_latent(vae, "astronaut", IMAGE_PX)
    with torch.inference_mode():
        _, sigmas, inv = ICDDIMInvert().invert(model, latent, src, STEPS, 1.0, 0, scheduler=SCHEDULER)
        cached = ICKVInject().patch(model, inv, START_PERCENT, START_LAYER, "mutual", cache="cpu")[0]
        recompute = ICKVInject().patch(model, inv, START_PERCENT, START_LAYER, "mutual", cache="recompute")[0]
    entries = [e for e in reference.STORE.entries.values() if type(e).__name__ == "DiTReferenceKV"]
    blocks = dit_layers.select_blocks(dit_layers.enumerate_blocks(model), START_LAYER)
    start = inverted_noise(model, inv)   # what Inverted Noise hands SamplerCustomAdvanced

    def sample(m):
        sampler = comfy.samplers.sampler_object("euler")
        return comfy.sample.sample_custom(m, start, 1.0, sampler, sigmas, tgt, tgt, torch.zeros_like(start),
                                          disable_pbar=True, seed=0)

    calls = {name: common.count_calls(m, sample, STEPS)[0]
             for name, m in (("stock", model), ("kv_cached", cached), ("kv_recompute", recompute))}
    timing = common.interleaved_timing({"kv_cached": lambda: sample(cached), "stock": lambda: sample(model),
                                        "kv_recompute": lambda: sample(recompute)},
                                       reps=5, warmup=1, min_reps=3, budget_s=90)
    r = common.ratio(timing, "kv_cached", "stock")
    with torch.inference_mode():
        moved = float((sample(cached) - sample(model)).abs().max())
    return {
        "benchmark": "flow_kv_inject",
        "setup": {"model": _flux.size(), "latent_shape": list(start.shape), "steps": STEPS, "cfg": 1.0,
                  "guidance": _flux.GUIDANCE, "start_percent": START_PERCENT, "start_layer": START_LAYER,
                  "blocks": [b.position for b in blocks], "mode": "mutual"},
        "ratio": r,
        "ratio_min": common.min_ratio(timing, "kv_cached", "stock"),
        "paired_ratio_median": common.paired_ratio(timing, "kv_cached", "stock"),
        "target_ratio": TARGET_RATIO,
        "pass": r <= TARGET_RATIO,
        "ratio_recompute": common.ratio(timing, "kv_recompute", "stock"),
        "ratios": {name: common.ratios(timing, name, "stock") for name in ("kv_cached", "kv_recompute")},
        "cache_bytes": entries[0].nbytes() if entries else None,
        "cache_estimate_bytes": entries[0].estimate_bytes() if entries else None,
        "edit_differs_from_stock_max_abs": moved,
        "timing": timing,
        "unet_calls": calls,
    }
