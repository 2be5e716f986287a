"""DDIM Invert (refine_iters 0) vs the stock SamplerCustom path, same steps, same sigmas, same model.

Both sides do ``STEPS`` UNet evaluations on a 1-row latent, so the ratio measures the node's own overhead
(schedule, chain bookkeeping, artefact) over ComfyUI's sampling loop. Target: ratio <= 1.10.
"""
from __future__ import annotations

import logging

import torch

from bench import common, register

log = logging.getLogger("bench.invert")

IMAGE_PX = 256          # -> 32x32 latent
STEPS = 10
SCHEDULER = "ddim_uniform"
PROMPT = "a photo of an astronaut"
TARGET_RATIO = 1.10
REPS = 5                # interleaved rounds of (ours, stock); fewer if the budget runs out
BUDGET_S = 45.0
REFINE_REPS = 1         # refine_iters 3 runs 4x the UNet calls: one (refine3, stock) round


def _stock_sigmas(model):
    """The stock BasicScheduler node's sigmas for SCHEDULER / STEPS (denoise 1)."""
    from comfy_extras.nodes_custom_sampler import BasicScheduler
    return BasicScheduler().get_sigmas(model, SCHEDULER, STEPS, 1.0)[0]


@register("invert", "ICDDIMInvert (refine_iters 0) vs stock SamplerCustom ddim, 10 steps, 32x32 latent")
def run() -> dict:
    common.setup()
    import comfy.sample
    import comfy.samplers
    from inversion_chain.nodes.invert import DEFAULT_REFINE_ITERS, ICDDIMInvert

    model, clip, vae = common.load_models()
    positive = common.encode(clip, PROMPT)
    latent = common.photo_latent(vae, "astronaut", IMAGE_PX)
    sigmas = _stock_sigmas(model)

    def ours(m=model, iters=0):
        return ICDDIMInvert().invert(m, latent, positive, STEPS, 1.0, iters, scheduler=SCHEDULER)

    def stock(m=model, latent_image=None):
        # What SamplerCustom runs with add_noise off: zero noise, sampler 'ddim', the given sigmas, cfg 1.
        latent_image = start if latent_image is None else latent_image
        sampler = comfy.samplers.sampler_object("ddim")
        return comfy.sample.sample_custom(m, torch.zeros_like(latent_image), 1.0, sampler, sigmas, positive,
                                          positive, latent_image, disable_pbar=True, seed=0)

    # One counted run of each: UNet calls per step, and the outputs for the checks below.
    refine_name = f"ours_refine{DEFAULT_REFINE_ITERS}"
    calls = {}
    calls["ours_refine0"], (noise0, node_sigmas, _) = common.count_calls(model, lambda m: ours(m, 0), STEPS)
    calls[refine_name], (noise3, _, inv3) = common.count_calls(model, lambda m: ours(m, DEFAULT_REFINE_ITERS), STEPS)
    if not torch.allclose(node_sigmas.float().cpu(), sigmas.float().cpu(), rtol=1e-5, atol=1e-6):
        raise RuntimeError(f"the node's sigmas {node_sigmas.tolist()} differ from BasicScheduler's {sigmas.tolist()}")
    start = noise3["samples"]  # the stock side samples back from the inverted noise: the real round trip
    calls["stock"], back3 = common.count_calls(model, lambda m: stock(m), STEPS)

    # Round-trip quality (extra info): invert, then sample back through the stock path.
    with torch.inference_mode():
        source = latent["samples"]
        err0 = float((stock(latent_image=noise0["samples"]) - source).abs().max())
        err3 = float((back3 - source).abs().max())

    timing = common.interleaved_timing({"ours_refine0": lambda: ours(iters=0), "stock": stock},
                                       reps=REPS, warmup=1, min_reps=3, budget_s=BUDGET_S)
    r = common.ratio(timing, "ours_refine0", "stock")
    timing_refine = common.interleaved_timing({refine_name: lambda: ours(iters=DEFAULT_REFINE_ITERS), "stock": stock},
                                              reps=REFINE_REPS, warmup=0, min_reps=1)
    r_refine = common.ratio(timing_refine, refine_name, "stock")

    return {
        "benchmark": "invert",
        "setup": {"model": common.model_size(),
                  "latent_shape": list(latent["samples"].shape), "image_px": IMAGE_PX,
                  "steps": STEPS, "scheduler": SCHEDULER, "cfg": 1.0, "sigmas": [round(float(s), 5) for s in sigmas],
                  "ours": "ICDDIMInvert.invert(refine_iters=0)",
                  "stock": "comfy.sample.sample_custom(sampler_object('ddim'), zero noise, cfg 1) = SamplerCustom "
                           "add_noise off"},
        "ratio": r,
        "ratio_min": common.min_ratio(timing, "ours_refine0", "stock"),
        "paired_ratio_median": common.paired_ratio(timing, "ours_refine0", "stock"),
        "target_ratio": TARGET_RATIO,
        "pass": r <= TARGET_RATIO,
        "ratios": {"ours_refine0": common.ratios(timing, "ours_refine0", "stock")},
        "timing": timing,
        "unet_calls": calls,
        "extra": {
            "default_refine_iters": DEFAULT_REFINE_ITERS,
            f"ratio_{refine_name}_vs_stock": r_refine,
            f"ratio_{refine_name}_vs_stock_per_unet_call": round(
                r_refine * calls["stock"]["unet_calls"] / calls[refine_name]["unet_calls"], 4),
            "timing_refine": timing_refine,
            "round_trip_max_abs_latent_error": {"refine0": err0, f"refine{DEFAULT_REFINE_ITERS}": err3,
                                                "source_latent_std": float(latent["samples"].std())},
            "node_reported_unet_calls": {f"refine{DEFAULT_REFINE_ITERS}": inv3.unet_calls},
        },
    }
