"""RIVAL Align Sampler node."""
from __future__ import annotations

from ..artifacts import INVERSION
from ..pipelines.rival import rival_sample
from ..samplers.rival import INITS, NORMALIZE, REFERENCE_MODES
from .common import CATEGORY, tip
from .contract import checked


class ICRIVALAlignSampler:
    DESCRIPTION = ("Variations of a real photo (optionally steered by a new prompt) by aligning every generated row "
                   "with the photo's inversion chain: cross-image self-attention and step-wise normalisation (RIVAL). "
                   "All variations share one reference row in one run.")
    CATEGORY = CATEGORY + "/samplers"
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("variations", "reference")
    OUTPUT_TOOLTIPS = ("batch_size variations of the photo.",
                       "The reference row's final latent: the photo's own latent (it follows the chain).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": tip("MODEL", "The model the inversion was made with (with a LoRA: invert with the same "
                         "LoRA'd model, as the official DreamBooth script inverts with the customised model)."),
            "positive": tip("CONDITIONING", "Generation prompt; the inversion's own prompt for plain variations, a "
                            "new prompt for text-driven variations. May carry a ControlNet (Apply ControlNet "
                            "(Advanced) for both CFG branches, as the official pipeline): it steers the variations "
                            "only, never the photo's reference row. unCLIP conditioning works the same way."),
            "negative": tip("CONDITIONING", "Negative prompt for classifier-free guidance."),
            "inversion": tip(INVERSION, "The photo's inversion chain (DDIM Invert at cfg 1; RIVAL uses 50 steps)."),
            "seed": tip("INT", "Seed of the first variation; variation j uses seed + j (reproducible one by one).",
                        default=0, min=0, max=0xffffffffffffffff, control_after_generate=True),
            "batch_size": tip("INT", "Number of variations, generated together with one shared reference row.",
                              default=4, min=1, max=64),
            "cfg": tip("FLOAT", "Classifier-free guidance scale (official configs: 5 for variations; 7 for "
                       "text-driven, inpainting, ControlNet and customised-model (LoRA / DreamBooth) runs).",
                       default=5.0, min=0.0, max=30.0, step=0.1, round=0.01),
            "replace_end_percent": tip("FLOAT", "RIVAL's t_align as a fraction of the sampling steps: while step "
                                       "i of N has i/N < replace_end_percent the variations use the photo's "
                                       "self-attention K/V instead of their own, afterwards both. The paper's "
                                       "t_align 600 on 50 ddim_uniform steps = 0.4. Larger -> closer to the "
                                       "photo's content.", default=0.4, min=0.0, max=1.0, step=0.01),
            "normalize_end_percent": tip("FLOAT", "RIVAL's t_early as a fraction of the sampling steps: while i/N < "
                                         "normalize_end_percent the variations' noise prediction is normalised to "
                                         "the photo's. On 50 ddim_uniform steps: t_early 600 (official variation, "
                                         "text-driven, inpainting configs) = 0.4; t_early 400 (official ControlNet "
                                         "config) = 0.6. Larger -> closer colour statistics.", default=0.4,
                                         min=0.0, max=1.0, step=0.01),
            "init": tip(list(INITS), "permute: a random spatial permutation of x_T per variation (keeps its "
                        "statistics); adain: fresh noise normalised to x_T; inverted: x_T itself (editing mode).",
                        default="permute"),
            "normalize": tip(list(NORMALIZE), "eps: normalise the noise prediction (official code; on the flow "
                             "DiTs, Flux / Chroma / Qwen-Image / SD3.5, the predicted velocity, the sampler's step "
                             "direction there); latent: normalise the latents (paper prose); off.", default="eps"),
        }, "optional": {
            "reference_kv": tip(list(REFERENCE_MODES), "cache: record the photo's keys/values once per "
                                "inversion and negative prompt, then every run (new seeds) costs only the variations; "
                                "when they would not all fit the memory budget (SDXL at 1024 px), the first steps "
                                "that fit are cached and the others recomputed per step. batch: run the photo as an "
                                "extra row every step (the official layout; on Flux / Chroma / Qwen-Image its "
                                "prompt must have as many tokens as the positive's).",
                                default="cache"),
            "mask": tip("MASK", "Example-based inpainting (official inpaint_mask): 1 = regenerate, 0 = keep (the "
                        "official masks are the inverse: white = keep; use Invert Mask). Outside the mask every "
                        "variation is the photo's inversion chain at every step, so it ends as the photo's latent "
                        "exactly; inside it is generated, aligned with the whole photo. Latent size or the image "
                        "size; each latent cell is regenerated where the mask averages >= 0.5."),
        }}

    @checked
    def sample(self, model, positive, negative, inversion, seed, batch_size, cfg, replace_end_percent,
               normalize_end_percent, init, normalize, reference_kv="cache", mask=None):
        variations, reference = rival_sample(model, positive, negative, inversion, seed, batch_size, cfg,
                                             replace_end_percent, normalize_end_percent, init, normalize,
                                             reference_mode=reference_kv, mask=mask)
        return ({"samples": variations}, {"samples": reference})


NODE_CLASS_MAPPINGS = {"ICRIVALAlignSampler": ICRIVALAlignSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"ICRIVALAlignSampler": "RIVAL Align Sampler"}
