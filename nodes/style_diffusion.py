"""StyleDiffusion Mapper (train per-step value mappers on one real image) and StyleDiffusion Apply."""
from __future__ import annotations

from ..artifacts import INVERSION, STYLE, InversionChainError, Style
from ..attention import patching
from ..attention.schedule import Schedule, check_percents
from ..attention.style import value_injection
from ..plots import loss_curve
from ..optimize import style_diffusion
from ..model_info import check_supported, model_key
from ..logs import log
from .common import CATEGORY, tip
from .contract import checked

WHAT = "StyleDiffusion Mapper"
WHAT_APPLY = "StyleDiffusion Apply"


class ICStyleDiffusionMapper:
    DESCRIPTION = (
        "StyleDiffusion: trains, for one real image, one small mapper per sampling step from the image's CLIP "
        "vision tokens to the value input of cross-attention (keys keep the source prompt, so the layout stays "
        "editable). Sampling with the STYLE (StyleDiffusion Apply, or P2Plus Controller's `style`) at this cfg "
        "retraces the image's inversion. Trained once per image, model, prompt and settings; later runs load it "
        "from the cache: memory, and files in ComfyUI's user folder, user/__inversion_chain/style_cache (kept across "
        "restarts, named by a hash of the inputs, oldest evicted beyond 2 GB; delete the folder to clear it).")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    RETURN_TYPES = (STYLE, "IMAGE")
    RETURN_NAMES = ("style", "loss_plot")
    OUTPUT_TOOLTIPS = ("Per-step value embeddings of the trained mappers (evaluated in eval mode), tied to this "
                       "inversion and model.",
                       "The training loss (latent + attention-map MSE) of every iteration, log scale; ticks mark "
                       "the sampling steps.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": tip("MODEL", "The model the inversion was made with and you will sample with."),
                "clip_vision": tip("CLIP_VISION", "A CLIP vision encoder from Load CLIP Vision (ViT-B/16 as the "
                                   "paper; ViT-L/14 or ViT-H/14 work too: the mapper adapts to the token count and "
                                   "width)."),
                "image": tip("IMAGE", "The real image that was encoded and inverted (one image, same size)."),
                "inversion": tip(INVERSION, "DDIM Invert's inversion of that image, made at inversion_cfg 1 with the "
                                 "source prompt."),
                "positive": tip("CONDITIONING", "The source prompt (its embedding stays the keys of "
                                "cross-attention; the mapper modulates it into the values)."),
                "negative": tip("CONDITIONING", "The unconditional prompt used for guidance (usually empty)."),
                "cfg": tip("FLOAT", "The guidance you will sample with; the mappers are trained for it.",
                           default=7.5, min=1.0, max=30.0, step=0.1, round=0.01),
                "inner_steps": tip("INT", "Optimiser iterations at the first (noisiest) step; step i gets "
                                   "ceil(inner_steps * e^(-0.1 i)), with early stop as null-text inversion.",
                                   default=100, min=1, max=1000),
                "learning_rate": tip("FLOAT", "Adam's base rate, decayed as lr * (1 - step/100).",
                                     default=1e-2, min=1e-5, max=10.0, step=0.001, round=0.00001),
                "attention_loss_weight": tip("FLOAT", "Weight of the cross-attention-map loss (latent/4 maps "
                                             "against the inversion's): keeps the layout while the values learn "
                                             "the appearance. 0 = latent loss only.",
                                             default=1.0, min=0.0, max=100.0, step=0.1),
            },
        }

    @checked
    def train(self, model, clip_vision, image, inversion, positive, negative, cfg=7.5, inner_steps=100,
              learning_rate=1e-2, attention_loss_weight=1.0):
        check_supported(model, WHAT)
        style = style_diffusion.train(model, clip_vision, image, inversion, positive, negative, cfg, inner_steps,
                                      learning_rate, attention_loss_weight, what=WHAT)
        log.info("[Inversion Chain] %s", style.summary())
        title = (f"StyleDiffusion loss: {style.steps} steps, {int(style.inner_iters.sum())} iterations"
                 f"{' (cached)' if style.from_cache else ''}")
        return (style, loss_curve(style.losses, title))


class ICStyleDiffusionApply:
    DESCRIPTION = (
        "Samples with a STYLE: in the conditional branch the value input of every cross-attention comes from the "
        "trained mappers (keys keep the prompt) while step i of N has i/N < `style_end_percent`. Sample with the "
        "STYLE's cfg, the inversion's noise (add_noise off) and schedule to reconstruct the image; combine with "
        "other edits on the MODEL. Returns a patched clone; the input MODEL is unchanged.")
    CATEGORY = CATEGORY + "/attention"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL", "SIGMAS")
    RETURN_NAMES = ("model", "sigmas")
    OUTPUT_TOOLTIPS = ("The model with the value injection.", "The STYLE's schedule (for SamplerCustom).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": tip("MODEL", "The model the STYLE was trained on."),
                "style": tip(STYLE, "From StyleDiffusion Mapper."),
                "style_end_percent": tip("FLOAT", "StyleDiffusion's tau_v: while step i of N has i/N < this, the "
                                         "value input comes from the mappers; afterwards from the prompt. 1 = the "
                                         "whole run (reconstruction).", default=1.0, min=0.0, max=1.0, step=0.01),
            },
        }

    @checked
    def apply(self, model, style, style_end_percent=1.0):
        check_supported(model, WHAT_APPLY)
        if not isinstance(style, Style):
            raise InversionChainError(f"{WHAT_APPLY}: `style` must come from StyleDiffusion Mapper.")
        check_percents(WHAT_APPLY, style_end_percent=style_end_percent)
        style.check(model_key(model), None, WHAT_APPLY)
        schedule = Schedule(style.sigmas, style.scheduler, WHAT_APPLY)
        patched = patching.add_attn2_patch(model.clone(), value_injection(style.values, schedule, style_end_percent))
        return (patched, style.sigmas.clone())


NODE_CLASS_MAPPINGS = {"ICStyleDiffusionMapper": ICStyleDiffusionMapper,
                       "ICStyleDiffusionApply": ICStyleDiffusionApply}
NODE_DISPLAY_NAME_MAPPINGS = {"ICStyleDiffusionMapper": "StyleDiffusion Mapper",
                              "ICStyleDiffusionApply": "StyleDiffusion Apply"}
