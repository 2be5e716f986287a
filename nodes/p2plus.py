"""P2Plus Controller (Prompt-to-Prompt / P2Plus editing, real or generated images) and Null-Text Inversion."""
from __future__ import annotations

from .. import compat
from ..artifacts import INVERSION, NULL_TEXT, STYLE
from ..attention.core.layers import MAP_SIZE_AUTO, MAP_SIZES
from ..attention.editors.edit_plan import MODES
from ..attention.editors.p2p import DEFAULT_SELF_MAX_RES
from ..logs import log
from ..optimize.null_text import LEARNING_RATE, METHODS
from ..pipelines.null_text import null_text_conditioning, null_text_inversion
from ..pipelines.p2plus import build_edit
from .common import CATEGORY, tip
from .contract import checked


class ICP2PlusController:
    DESCRIPTION = (
        "Prompt-to-Prompt editing with P2Plus unconditional-branch control. Outputs a patched MODEL, 2-row "
        "positive/negative CONDITIONING (row 0 source, row 1 target) and a 2-row LATENT holding the same starting "
        "noise twice. Sample them with a stock sampler: KSamplerAdvanced (add_noise disable, sampler ddim, the "
        "inversion's steps and scheduler) or SamplerCustom (add_noise off, ddim, this node's sigmas). Row 0 "
        "reconstructs the source image (exactly under guidance with a NULL_TEXT), row 1 is the edit. On Flux and "
        "Chroma it edits the joint attention's image-to-text probabilities of a generated image: sample with "
        "add_noise ON (the LATENT gives both rows the sampler seed's noise).")
    CATEGORY = CATEGORY + "/attention"
    FUNCTION = "build"
    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING", "LATENT", "SIGMAS")
    RETURN_NAMES = ("model", "positive", "negative", "latent", "sigmas")
    OUTPUT_TOOLTIPS = (
        "The model with the attention exchange (and null-text / local blend); the input MODEL is unchanged.",
        "Row 0: source prompt, row 1: target prompt.",
        "Unconditional prompt for both rows (empty prompt; the source prompt for negative-prompt inversion; "
        "null-text embeddings are swapped in per step by the patched model).",
        "2 rows of the same x_T: the inversion's noise, or seeded noise for a generated image. Sample with "
        "add_noise disabled.",
        "The schedule the edit is defined on (for SamplerCustom).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": tip("MODEL", "The model to edit with (the one the inversion was made with)."),
                "clip": tip("CLIP", "Encodes both prompts and finds their tokens (word alignment, reweight and "
                            "blend words)."),
                "source_prompt": tip("STRING", "Describes the source image (the prompt given to DDIM Invert and "
                                     "Null-Text Inversion).", multiline=True, default="a photo of a cat"),
                "target_prompt": tip("STRING", "The edited description, e.g. the source prompt with a word swapped "
                                     "(replace) or words added (refine).", multiline=True, default="a photo of a dog"),
                "mode": tip(list(MODES), "replace: swap words token for token (equal token counts); refine: "
                            "target tokens aligned to the source's, new tokens keep their own maps; reweight: "
                            "scale chosen words' attention (see `reweight`), on top of replace when the token "
                            "counts match, else of refine.", default="replace"),
                "cross_replace_end_percent": tip(
                    "FLOAT", "Prompt-to-Prompt's tau_c: while step i of N has i/N < this, the target's "
                    "cross-attention maps are the source's. Larger keeps more layout.",
                    default=0.6, min=0.0, max=1.0, step=0.01),
                "self_replace_end_percent": tip(
                    "FLOAT", "Prompt-to-Prompt's tau_s: while i/N < this, the target's self-attention maps (cond "
                    "branch, small resolutions) are the source's.", default=0.6, min=0.0, max=1.0, step=0.01),
                "uncond_self_replace_end_percent": tip(
                    "FLOAT", "P2Plus's tau_u: while i/N < this, the unconditional branch's self-attention maps are "
                    "the source's too. 0 = plain Prompt-to-Prompt; 0.5 for large structural changes.",
                    default=0.0, min=0.0, max=1.0, step=0.01),
            },
            "optional": {
                "reweight": tip("STRING", "Scale target words' cross-attention, 'word:c' comma-separated, c in "
                                "[-2, 2] (e.g. 'flowers:2.0'). Works in every mode; required for mode reweight.",
                                default=""),
                "blend_words": tip("STRING", "Local blend: comma-separated words (of the source and/or target "
                                   "prompt) marking the region to edit; outside it the target keeps the source's "
                                   "latent. Empty = no local blend.", default=""),
                "blend_threshold": tip("FLOAT", "Local blend: threshold on the words' normalised cross-attention "
                                       "(16x16-level maps at 512 px).", default=0.3, min=0.0, max=1.0, step=0.01),
                "blend_start_percent": tip("FLOAT", "Local blend acts on step i of N when i/N >= this (the "
                                           "authors' null-text code: 0.2).", default=0.2, min=0.0, max=1.0,
                                           step=0.01),
                "inversion": tip(INVERSION, "Real image: the source's DDIM inversion (one image, cfg 1). Its x_T "
                                 "starts both rows and its schedule defines the steps. Flux/Chroma: sample with "
                                 "SamplerCustomAdvanced, noise from Inverted Noise (same inversion), this node's "
                                 "sigmas and LATENT, sampler euler."),
                "null_text": tip(NULL_TEXT, "From Null-Text Inversion on the same inversion: per-step "
                                 "unconditional embeddings that make row 0 reconstruct the image under guidance. SD "
                                 "models and Chroma; not Flux (guidance-distilled: no unconditional branch)."),
                "latent": tip("LATENT", "Generated image (no inversion): gives the size; the noise comes from "
                              "`seed`."),
                "seed": tip("INT", "Generated image (no inversion): seed of the shared starting noise (SD models; on "
                            "Flux/Chroma the sampler's seed gives it, add_noise on).",
                            default=0, min=0, max=0xffffffffffffffff),
                "steps": tip("INT", "Generated image (no inversion): sampling steps; sample with the same number.",
                             default=50, min=1, max=1000),
                "scheduler": tip(compat.scheduler_names(), "Generated image (no inversion): the scheduler you "
                                 "sample with.", default="ddim_uniform"),
                "self_replace_max_res": tip("INT", "Self-attention maps are exchanged only in layers whose token "
                                            "grid is at most this many tokens per side (32: P2Plus/StyleDiffusion "
                                            "code; 16: the first Prompt-to-Prompt code).",
                                            default=DEFAULT_SELF_MAX_RES, min=1, max=256),
                "style": tip(STYLE, "StyleDiffusion: from StyleDiffusion Mapper on the same inversion. While "
                             "`style_end_percent` lasts, the value input of both rows' cross-attention (cond branch) "
                             "comes from the trained mappers: row 0 retraces the photo, row 1 keeps its "
                             "appearance (refine: aligned tokens only); keys keep each row's prompt."),
                "style_end_percent": tip("FLOAT", "StyleDiffusion's tau_v: while step i of N has i/N < this, the "
                                         "value input comes from the STYLE; afterwards each row uses its own "
                                         "prompt. 0 = no style (plain P2Plus); paper default 0.5, 0.2-0.5 for "
                                         "large structural changes.", default=0.5, min=0.0, max=1.0, step=0.01),
                "blend_map_size": tip(list(MAP_SIZES), "Local blend: which cross-attention maps the mask is drawn "
                                      "from, by their size relative to the latent. auto = latent/4, as "
                                      "Prompt-to-Prompt (16x16 maps for SD1.5 at 512 px, 32x32 for SDXL at 1024 px; "
                                      "on a smaller UNet its coarsest level). Pick a finer size (latent/2, latent/1) "
                                      "when the mask misses the object or spills over the picture: finer maps follow "
                                      "outlines more closely but can be noisier. SD1.x/SD2.x have latent/1 to "
                                      "latent/8, SDXL latent/2 and latent/4.", default=MAP_SIZE_AUTO),
            },
        }

    @checked
    def build(self, model, clip, source_prompt, target_prompt, mode, cross_replace_end_percent,
              self_replace_end_percent, uncond_self_replace_end_percent, reweight="", blend_words="",
              blend_threshold=0.3, blend_start_percent=0.2, inversion=None, null_text=None, latent=None, seed=0,
              steps=50, scheduler="ddim_uniform", self_replace_max_res=DEFAULT_SELF_MAX_RES, style=None,
              style_end_percent=0.5, blend_map_size=MAP_SIZE_AUTO):
        edit = build_edit(model, clip, source_prompt, target_prompt, mode, cross_replace_end_percent,
                          self_replace_end_percent, uncond_self_replace_end_percent, reweight, blend_words,
                          blend_threshold, blend_start_percent, inversion, null_text, latent, seed, steps, scheduler,
                          self_replace_max_res, style, style_end_percent, blend_map_size)
        log.info("[Inversion Chain] %s", edit.description)
        return (edit.model, edit.positive, edit.negative, edit.latent, edit.sigmas)


class ICNullTextInversion:
    DESCRIPTION = (
        "Makes CFG sampling retrace a real image's inversion: null-text inversion optimises one unconditional "
        "embedding per step (Adam, early stop as the paper); negative-prompt inversion uses the source prompt as "
        "the unconditional prompt (no cost). Feed the NULL_TEXT to P2Plus Controller with the same inversion (SD "
        "models, Chroma), or to Null-Text Conditioning for a stock sampler's negative (every family it runs on, "
        "including Chroma, Qwen-Image and SD3.5).")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = (NULL_TEXT,)
    RETURN_NAMES = ("null_text",)
    OUTPUT_TOOLTIPS = ("Per-step unconditional embeddings (or the negative-prompt choice) tied to this inversion.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": tip("MODEL", "The model the inversion was made with and you will sample with."),
                "inversion": tip(INVERSION, "DDIM Invert's inversion of one image, made at inversion_cfg 1."),
                "positive": tip("CONDITIONING", "The source prompt (the same text as in DDIM Invert and P2Plus "
                                "Controller)."),
                "negative": tip("CONDITIONING", "The unconditional prompt to start from (usually empty)."),
                "cfg": tip("FLOAT", "The guidance you will sample with; the embeddings are optimised for it.",
                           default=7.5, min=1.0, max=30.0, step=0.1, round=0.01),
                "inner_steps": tip("INT", "Adam iterations per step at most (early stop at loss < 1e-5 + i*2e-5).",
                                   default=10, min=1, max=100),
                "method": tip(list(METHODS), "null-text: optimise one embedding per step (up to "
                              "inner_steps forward+backward passes each); negative-prompt: the source prompt is the "
                              "unconditional prompt (no cost; row 0 then samples exactly as at cfg 1, edits are "
                              "guided away from the source prompt).", default="null-text"),
            },
            "optional": {
                "learning_rate": tip("FLOAT", "Adam's base rate, decayed as lr * (1 - step/100). 0.01 is the "
                                     "paper's (Stable Diffusion); raise it if the reconstruction stays poor.",
                                     default=LEARNING_RATE, min=1e-5, max=10.0, step=0.001,
                                     round=0.00001),
            },
        }

    @checked
    def run(self, model, inversion, positive, negative, cfg=7.5, inner_steps=10, method="null-text",
            learning_rate=LEARNING_RATE):
        return (null_text_inversion(model, inversion, positive, negative, cfg, inner_steps, method, learning_rate),)


class ICNullTextConditioning:
    DESCRIPTION = (
        "A NULL_TEXT as the negative CONDITIONING of a stock sampler (CFGGuider, KSampler): null-text inversion's "
        "per-step unconditional contexts as one entry per step, each active only around its step's sigma "
        "(start/end percent), with the negative prompt's other entries (e.g. SD3.5's pooled vector); negative-prompt "
        "inversion's is the source prompt. Sample from Inverted Noise with the same MODEL, the inversion's sigmas, "
        "euler or ddim, at the NULL_TEXT's cfg.")
    CATEGORY = CATEGORY
    FUNCTION = "convert"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("negative",)
    OUTPUT_TOOLTIPS = ("The negative to sample with at the NULL_TEXT's cfg on the inversion's sigmas.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": tip("MODEL", "The model the NULL_TEXT was made with and you will sample with (its sigma "
                             "schedule places the per-step entries)."),
                "null_text": tip(NULL_TEXT, "From Null-Text Inversion."),
            },
        }

    @checked
    def convert(self, model, null_text):
        return (null_text_conditioning(model, null_text),)


NODE_CLASS_MAPPINGS = {"ICP2PlusController": ICP2PlusController, "ICNullTextInversion": ICNullTextInversion,
                       "ICNullTextConditioning": ICNullTextConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {"ICP2PlusController": "P2Plus Controller", "ICNullTextInversion": "Null-Text Inversion",
                              "ICNullTextConditioning": "Null-Text Conditioning"}
