"""DDIM Invert on a rectified-flow model (Flux layout) vs a stock sampling pass over the same sigmas.

Ours: ``ICDDIMInvert`` on the Flux-layout bench model (bench/_flux.py), cfg 1 with FluxGuidance, ``simple``
schedule; once with ``refine_iters 0`` (one model call per step: the node's overhead over ComfyUI's loop, target
<= 1.10 as on the UNets) and once with the node's default (a fixed point per step, several calls: compared per model
call, the same target). Stock: ``comfy.sample.sample_custom`` with sampler ``euler`` (ComfyUI's Euler and ddim step
are the same on flow models), the node's sigmas, cfg 1, starting from the inverted latent -- what Inverted Noise ->
SamplerCustomAdvanced runs to sample back, i.e. the round trip. ``unet_calls`` counts every model forward.
"""
from __future__ import annotations

import torch

from bench import _flux, common, register

IMAGE_PX, STEPS, SCHEDULER = 256, 10, "simple"
PROMPT = "a photo of an astronaut"
TARGET_RATIO = 1.10


def inverted_noise(model, inversion):
    """The noise tensor the stock SamplerCustomAdvanced gets from Inverted Noise (the inverted latent in the model's
    sampling space), made once outside the timing; the stock side then runs ComfyUI's sampler only."""
    from inversion_chain.nodes.inverted_noise import ICInvertedNoise
    with torch.inference_mode():
        shape = torch.zeros(inversion.latent_shape)
        return ICInvertedNoise().noise(model, inversion)["result"][0].generate_noise({"samples": shape})


@register("flow_invert", "ICDDIMInvert on a Flux-layout model vs a stock euler pass, 10 steps, per model call")
def run() -> dict:
    reason = _flux.missing()
    if reason:
        return {"benchmark": "flow_invert", "skipped": reason}
    import comfy.sample
    import comfy.samplers
    from inversion_chain.nodes.invert import DEFAULT_REFINE_ITERS, ICDDIMInvert

    model, clip, vae = _flux.load()
    positive = _flux.encode(clip, PROMPT)
    latent = common.photo_latent(vae, "astronaut", IMAGE_PX)

    def ours(m=model, iters=0):
        return ICDDIMInvert().invert(m, latent, positive, STEPS, 1.0, iters, scheduler=SCHEDULER)

    calls = {}
    calls["ours_refine0"], (_, sigmas, inv0) = common.count_calls(model, lambda m: ours(m, 0), STEPS)
    refine = f"ours_refine{DEFAULT_REFINE_ITERS}"
    calls[refine], (_, _, inv_d) = common.count_calls(model, lambda m: ours(m, DEFAULT_REFINE_ITERS), STEPS)
    start = inverted_noise(model, inv_d)

    def stock(m=model, from_noise=None):
        from_noise = start if from_noise is None else from_noise
        sampler = comfy.samplers.sampler_object("euler")
        return comfy.sample.sample_custom(m, from_noise, 1.0, sampler, sigmas, positive, positive,
                                          torch.zeros_like(from_noise), disable_pbar=True, seed=0)

    calls["stock"], back = common.count_calls(model, lambda m: stock(m), STEPS)
    with torch.inference_mode():
        err0 = float((stock(from_noise=inverted_noise(model, inv0)) - latent["samples"]).abs().max())
    err_d = float((back - latent["samples"]).abs().max())

    timing = common.interleaved_timing({"ours_refine0": lambda: ours(iters=0), "stock": stock,
                                        refine: lambda: ours(iters=DEFAULT_REFINE_ITERS)},
                                       reps=4, warmup=1, min_reps=2, budget_s=90)
    r0 = common.ratio(timing, "ours_refine0", "stock")
    per_call = {name: round(common.ratio(timing, name, "stock") * calls["stock"]["unet_calls"]
                            / calls[name]["unet_calls"], 4) for name in ("ours_refine0", refine)}
    per_call_cpu = {name: round(common.min_ratio(timing, name, "stock", "median_cpu_s") * calls["stock"]["unet_calls"]
                                / calls[name]["unet_calls"], 4) for name in ("ours_refine0", refine)}
    return {
        "benchmark": "flow_invert",
        "setup": {"model": _flux.size(), "latent_shape": list(latent["samples"].shape), "image_px": IMAGE_PX,
                  "steps": STEPS, "scheduler": SCHEDULER, "cfg": 1.0, "guidance": _flux.GUIDANCE,
                  "ours": "ICDDIMInvert.invert", "stock": "comfy.sample.sample_custom(euler, the node's sigmas, cfg 1) "
                                                          "from the inverted latent"},
        "ratio": r0,
        "target_ratio": TARGET_RATIO,
        "pass": r0 <= TARGET_RATIO and per_call[refine] <= TARGET_RATIO,
        "ratio_per_model_call": per_call,
        "ratio_per_model_call_median_cpu": per_call_cpu,
        "ratios": {name: common.ratios(timing, name, "stock") for name in ("ours_refine0", refine)},
        "paired_ratio_median": common.paired_ratio(timing, "ours_refine0", "stock"),
        "timing": timing,
        "unet_calls": calls,
        "extra": {"default_refine_iters": DEFAULT_REFINE_ITERS, "node_reported_model_calls": inv_d.unet_calls,
                  "round_trip_max_abs_latent_error": {"refine0": err0, "default": err_d}},
    }
