"""P2Plus edit vs the stock KSampler, both at batch 2 (source row + target row), cfg 7.5, same steps and sigmas.

Ours: P2Plus Controller (replace mode, tau_c 0.6, tau_s 0.6, tau_u 0.5, local blend, per-step null-text
unconditional embeddings) sampled by the stock KSamplerAdvanced (add_noise off, ddim). Stock: KSampler on the
unpatched model with the same 2-row conditioning and latent. Both do STEPS UNet calls of 4 rows, so the ratio is
the editing overhead (attention exchange, explicit local-blend maps, per-step context swap). Target: <= 1.15.
Also reported: Null-Text Inversion seconds per timestep (inner_steps forward+backward passes each at most).
"""
from __future__ import annotations

import logging
import time

import torch

from bench import common, register

log = logging.getLogger("bench.p2plus")

IMAGE_PX = 256          # -> 32x32 latent
STEPS = 10
SCHEDULER = "ddim_uniform"
CFG = 7.5
SOURCE = "a photo of an astronaut"
TARGET = "a photo of a robot"
INNER_STEPS = 10
TARGET_RATIO = 1.15
REPS = 5
BUDGET_S = 90.0


@register("p2plus", "P2Plus edit (null-text, local blend, tau_u 0.5) vs stock KSampler at batch 2, cfg 7.5; "
                    "null-text s/step")
def run() -> dict:
    common.setup()
    import nodes
    from inversion_chain.nodes.invert import ICDDIMInvert
    from inversion_chain.nodes.p2plus import ICNullTextInversion, ICP2PlusController

    model, clip, vae = common.load_models()
    latent = common.photo_latent(vae, "astronaut", IMAGE_PX)
    source, empty = common.encode(clip, SOURCE), common.encode(clip, "")

    with torch.inference_mode():
        _, _, inv = ICDDIMInvert().invert(model, latent, source, STEPS, 1.0, 1, scheduler=SCHEDULER)
        t0 = time.perf_counter()
        null_text = ICNullTextInversion().run(model, inv, source, empty, CFG, INNER_STEPS, "null-text")[0]
        nt_seconds = time.perf_counter() - t0
        patched, pos, neg, start, _ = ICP2PlusController().build(
            model, clip, SOURCE, TARGET, "replace", 0.6, 0.6, 0.5, blend_words="astronaut, robot",
            inversion=inv, null_text=null_text)
        p2p_only = ICP2PlusController().build(model, clip, SOURCE, TARGET, "replace", 0.6, 0.6, 0.0,
                                              inversion=inv)[0]

    def ours(m=None):
        return nodes.KSamplerAdvanced().sample(m or patched, "disable", 0, STEPS, CFG, "ddim", SCHEDULER, pos, neg,
                                               start, 0, 10000, "disable")[0]["samples"]

    def ours_p2p_only(m=None):
        return ours(m or p2p_only)

    def stock(m=None):
        return nodes.KSampler().sample(m or model, 0, STEPS, CFG, "ddim", SCHEDULER, pos, neg, start, 1.0)[0]["samples"]

    calls_ours, edit = common.count_calls(patched, lambda m: ours(m), STEPS)
    calls_stock, _ = common.count_calls(model, lambda m: stock(m), STEPS)
    calls = {"ours": calls_ours, "stock": calls_stock}
    row0_error = float((edit[:1] - latent["samples"]).abs().max())
    timing = common.interleaved_timing({"ours": ours, "stock": stock, "ours_p2p_only": ours_p2p_only},
                                       reps=REPS, warmup=1, min_reps=3, budget_s=BUDGET_S)
    r = common.ratio(timing, "ours", "stock")
    return {
        "benchmark": "p2plus",
        "setup": {"model": common.model_size(),
                  "latent_shape": list(latent["samples"].shape), "image_px": IMAGE_PX, "rows": 2,
                  "steps": STEPS, "scheduler": SCHEDULER, "cfg": CFG, "source": SOURCE, "target": TARGET,
                  "ours": "ICP2PlusController(replace, tau 0.6/0.6/0.5, local blend, null-text) + KSamplerAdvanced "
                          "(add_noise disable, ddim)",
                  "stock": "KSampler (ddim) on the unpatched model, same 2-row conditioning and latent"},
        "ratio": r,
        "ratio_min": common.min_ratio(timing, "ours", "stock"),
        "target_ratio": TARGET_RATIO,
        "pass": r <= TARGET_RATIO,
        "ratios": {name: common.ratios(timing, name, "stock") for name in ("ours", "ours_p2p_only")},
        "timing": timing,
        "unet_calls": calls,
        "extra": {
            "ratio_p2p_only_vs_stock": common.ratio(timing, "ours_p2p_only", "stock"),
            "null_text_seconds": round(nt_seconds, 2),
            "null_text_seconds_per_timestep": round(nt_seconds / STEPS, 3),
            "null_text_inner_steps": INNER_STEPS,
            "null_text_iterations_per_step": null_text.inner_iters.tolist(),
            "null_text_final_reconstruction_error": null_text.final_error,
            "row0_max_abs_latent_error_vs_source": row0_error,
            "source_latent_std": float(latent["samples"].std()),
        },
    }
