"""StyleDiffusion Mapper (train per-step value mappers on one real image), StyleDiffusion Apply, and StyleDiffusion
Style Transfer (the STYLE plus a content image's decoder features, Plug-and-Play style)."""
from __future__ import annotations


from ..artifacts import INVERSION, STYLE
from ..attention.store.reference import POLICIES
from ..pipelines.style_diffusion import apply_style, build_style_transfer, train_style
from .common import CATEGORY, tip
from .contract import checked


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
        return train_style(model, clip_vision, image, inversion, positive, negative, cfg, inner_steps,
                           learning_rate, attention_loss_weight)


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
        return apply_style(model, style, style_end_percent)


class ICStyleDiffusionStyleTransfer:
    DESCRIPTION = (
        "StyleDiffusion style transfer (paper section 5.2.7, features as Plug-and-Play injects them): samples the "
        "content image's inversion with the STYLE learned on a style image, while the content's decoder features, "
        "taken along its DDIM chain, replace the sample's own: one decoder ResNet block's features while "
        "i/N < feature_end_percent, and the self-attention maps (queries and keys) of the decoder layers from "
        "attention_start_layer on while i/N < attention_end_percent. Run the outputs with SamplerCustom (add_noise "
        "off, sampler ddim, cfg = the STYLE's cfg). The input MODEL is unchanged.")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING", "LATENT", "SIGMAS")
    RETURN_NAMES = ("model", "positive", "negative", "latent", "sigmas")
    OUTPUT_TOOLTIPS = ("The model with the STYLE's value input and the content's feature injection.",
                       "The STYLE's prompt: the keys its mapped values pair with, token by token.",
                       "The STYLE's unconditional prompt.",
                       "The content's inverted noise x_T: sample from it with add_noise off.",
                       "The shared schedule of the content inversion and the STYLE.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": tip("MODEL", "The model the content was inverted with and the STYLE trained on."),
                "style": tip(STYLE, "StyleDiffusion Mapper's STYLE, trained on the style image."),
                "content_inversion": tip(INVERSION, "DDIM Invert of the content image (one image; the same steps and "
                                         "scheduler as the style image's inversion). Its chain gives the features."),
                "feature_end_percent": tip("FLOAT", "While step i of N has i/N < this, the decoder ResNet block's "
                                           "features are the content's (Plug-and-Play's pnp_f_t 0.8). 0 = never.",
                                           default=0.8, min=0.0, max=1.0, step=0.01),
                "attention_end_percent": tip("FLOAT", "While step i of N has i/N < this, the self-attention maps "
                                             "(queries and keys) of the chosen decoder layers are the content's "
                                             "(Plug-and-Play's pnp_attn_t 0.5). 0 = never.",
                                             default=0.5, min=0.0, max=1.0, step=0.01),
                "style_end_percent": tip("FLOAT", "StyleDiffusion's tau_v: while i/N < this the cross-attention "
                                         "value input comes from the STYLE's mappers, afterwards from the prompt. "
                                         "1 = the whole run.", default=1.0, min=0.0, max=1.0, step=0.01),
                "feature_block": tip("INT", "Decoder (output) block whose ResNet features are injected, 0 = the "
                                     "coarsest (SD1.x/SD2: 12 blocks, 0-11; SDXL: 9, 0-8). -1 = the second "
                                     "decoder block at latent/4, which means the same on every family: 4 on "
                                     "SD1.x/SD2 (Plug-and-Play's up_blocks[1].resnets[1]), 1 on SDXL.",
                                     default=-1, min=-1, max=63),
                "attention_start_layer": tip("INT", "First self-attention layer (execution order; SD1.x/SD2: 16 "
                                             "layers, up 7-15; SDXL: 70, up 34-69) whose maps are injected; every "
                                             "later layer too. -1 = the first layer of `feature_block` (Plug-and-"
                                             "Play's decoder layers 4-11: 8 on SD1.x/SD2; 44 on SDXL).",
                                             default=-1, min=-1, max=255),
            },
            "optional": {
                "cache": tip(list(POLICIES), "Content features: auto records them once per content inversion (on "
                             "the GPU if there is room within the reference cache's budget, else CPU) and reuses "
                             "them; recompute runs the content forward next to every step instead (no storage).",
                             default="auto"),
            },
        }

    @checked
    def build(self, model, style, content_inversion, feature_end_percent=0.8, attention_end_percent=0.5,
              style_end_percent=1.0, feature_block=-1, attention_start_layer=-1, cache="auto"):
        return build_style_transfer(model, style, content_inversion, feature_end_percent, attention_end_percent,
                                    style_end_percent, feature_block, attention_start_layer, cache)


NODE_CLASS_MAPPINGS = {"ICStyleDiffusionMapper": ICStyleDiffusionMapper,
                       "ICStyleDiffusionApply": ICStyleDiffusionApply,
                       "ICStyleDiffusionStyleTransfer": ICStyleDiffusionStyleTransfer}
NODE_DISPLAY_NAME_MAPPINGS = {"ICStyleDiffusionMapper": "StyleDiffusion Mapper",
                              "ICStyleDiffusionApply": "StyleDiffusion Apply",
                              "ICStyleDiffusionStyleTransfer": "StyleDiffusion Style Transfer"}
