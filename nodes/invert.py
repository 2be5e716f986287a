"""DDIM Invert and a small latent comparison node."""
from __future__ import annotations

from .. import compat
from ..artifacts import INVERSION
from ..pipelines.inversion import free_caches, invert_image, latent_difference
from ..samplers.inversion import DEFAULT_MAX_ITERS, DEFAULT_TOLERANCE
from .common import CATEGORY, tip
from .contract import checked

DEFAULT_REFINE_ITERS = DEFAULT_MAX_ITERS  # a cap: steps stop at `tolerance` (samplers/inversion.py)


class ICDDIMInvert:
    DESCRIPTION = ("Inverts a real image's latent with deterministic DDIM and keeps every intermediate latent. "
                   "Sample the `noise` output back with SamplerCustom (add_noise off, sampler ddim, this node's "
                   "`sigmas`) to reconstruct the image; other Inversion Chain nodes take the `inversion`. Flow models "
                   "(Flux, Chroma; so far DDIM Invert is the pack's only node for them): invert at inversion_cfg 1 "
                   "(Flux-dev with the FluxGuidance value in `positive`); a full inversion samples back with "
                   "SamplerCustomAdvanced fed by Inverted Noise, sampler euler or ddim and this node's `sigmas` (a "
                   "partial one also as above).")
    CATEGORY = CATEGORY
    FUNCTION = "invert"
    RETURN_TYPES = ("LATENT", "SIGMAS", INVERSION)
    RETURN_NAMES = ("noise", "sigmas", "inversion")
    OUTPUT_TOOLTIPS = ("The inverted latent: x_T, or with end_percent < 1 the latent at the level the inversion "
                       "stopped at. Feed to SamplerCustom (add_noise off) with `sigmas`. Flow models: in ComfyUI's "
                       "mid-schedule form (x / (1 - sigma)); a full inversion (sigma 1) samples back through "
                       "Inverted Noise instead.",
                       "The forward (denoising) schedule that reconstructs the image from `noise`: all `steps`, or "
                       "with end_percent < 1 only the steps the inversion ran.",
                       "The inversion chain (whole or partial), its schedule, conditioning and model identity.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": tip("MODEL", "The model to invert with; sample with the same model afterwards."),
                "latent": tip("LATENT", "The image's latent (VAEEncode of the real photo). A batch inverts row by "
                              "row."),
                "positive": tip("CONDITIONING", "The source prompt describing the photo. An empty prompt is valid."),
                "steps": tip("INT", "DDIM steps; sample with the same number of steps.", default=50, min=1, max=1000),
                "inversion_cfg": tip("FLOAT", "Guidance while inverting. 1.0 (default) inverts the conditional model "
                                     "exactly; > 1 needs `negative` and reconstructs worse.",
                                     default=1.0, min=0.1, max=30.0, step=0.1, round=0.01),
                "refine_iters": tip("INT", "At most this many fixed-point iterations per step (one model call each) "
                                    "making each step the exact inverse of a DDIM sampling step; a step stops "
                                    "earlier once its residual is below `tolerance`. 0 = naive inversion.",
                                    default=DEFAULT_REFINE_ITERS, min=0, max=20),
                "scheduler": tip(compat.scheduler_names(), "Sigma schedule. ddim_uniform is SD's DDIM schedule; "
                                 "sample back with the same scheduler (or this node's `sigmas`).",
                                 default="ddim_uniform"),
            },
            "optional": {
                "negative": tip("CONDITIONING", "Unconditional prompt, used only when inversion_cfg != 1."),
                "tolerance": tip("FLOAT", "A step stops iterating once its round-trip error (max abs, in the model's "
                                 "sampling space) is at most this. 0 = always run `refine_iters` iterations.",
                                 default=DEFAULT_TOLERANCE, min=0.0, max=1.0, step=1e-6, round=1e-7),
                "end_percent": tip("FLOAT", "How far toward noise to invert, as a fraction of the `steps`-step "
                                   "schedule counted from the clean image (DiffEdit's encoding ratio, the Unsampler's "
                                   "end_at_step / steps). 1.0 = full inversion to x_T. 0.5 with 50 steps inverts 25 "
                                   "steps and stops at the sigma of sampling step 25, costing half the model calls. "
                                   "Then `noise`, `sigmas` and `inversion` describe those 25 steps: sample back with "
                                   "SamplerCustom + `sigmas`, or KSampler Advanced (steps 50, start_at_step 25, "
                                   "add_noise disable, ddim); editors' start/end_percent count the steps sampled (25). "
                                   "Inversion step j (j = 0 at the image) runs when j/steps < end_percent.",
                                   default=1.0, min=0.01, max=1.0, step=0.01),
            },
        }

    @checked
    def invert(self, model, latent, positive, steps, inversion_cfg, refine_iters, scheduler="ddim_uniform",
               negative=None, tolerance=DEFAULT_TOLERANCE, end_percent=1.0):
        noise, sigmas, inv = invert_image(model, latent["samples"], positive, negative, inversion_cfg, steps,
                                          scheduler, refine_iters, tolerance, end_percent)
        return ({"samples": noise}, sigmas, inv)


class ICLatentDifference:
    DESCRIPTION = "Measures how far one latent is from another (e.g. a reconstruction from the source latent)."
    CATEGORY = CATEGORY + "/utils"
    FUNCTION = "compare"
    OUTPUT_NODE = True
    RETURN_TYPES = ("FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("max_abs", "mean_abs", "report")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "latent_a": tip("LATENT", "First latent (e.g. the reconstruction)."),
            "latent_b": tip("LATENT", "Second latent (e.g. VAEEncode of the source photo)."),
        }}

    @checked
    def compare(self, latent_a, latent_b):
        max_abs, mean_abs, report, shown = latent_difference(latent_a["samples"], latent_b["samples"])
        return {"ui": {"text": [report], "max_abs": [shown[0]], "mean_abs": [shown[1]]},
                "result": (max_abs, mean_abs, report)}


class ICFreeCaches:
    DESCRIPTION = ("Empties the pack's caches: the reference store (KV Inject, RIVAL and Style Transfer keys/values "
                   "and features, on the GPU or the CPU) and StyleDiffusion's memory cache, and with `disk_cache` "
                   "also StyleDiffusion's files. ComfyUI's own free-memory button (the /free endpoint) empties the "
                   "memory caches too.")
    CATEGORY = CATEGORY + "/utils"
    FUNCTION = "free"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": {
            "disk_cache": tip("BOOLEAN", "Also delete StyleDiffusion's cached files (they survive restarts; "
                              "training again rebuilds them).", default=False),
        }}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")   # never equal to the last run's: the node runs every time it is queued

    @checked
    def free(self, disk_cache=False):
        report = free_caches(disk_cache)
        return {"ui": {"text": [report]}, "result": (report,)}


NODE_CLASS_MAPPINGS = {"ICDDIMInvert": ICDDIMInvert, "ICLatentDifference": ICLatentDifference,
                       "ICFreeCaches": ICFreeCaches}
NODE_DISPLAY_NAME_MAPPINGS = {"ICDDIMInvert": "DDIM Invert", "ICLatentDifference": "Latent Difference",
                              "ICFreeCaches": "Free Inversion Chain Caches"}
