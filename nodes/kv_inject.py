"""KV Inject (Mutual Self-Attention) node."""
from __future__ import annotations

from ..artifacts import INVERSION
from ..attention.core.layers import MAP_SIZE_AUTO, MAP_SIZES
from ..attention.editors.kv_inject import MODES
from ..attention.store.reference import POLICIES
from ..pipelines.kv_inject import build_kv_inject
from .common import CATEGORY, tip
from .contract import checked

class ICKVInject:
    DESCRIPTION = ("MasaCtrl mutual self-attention from a real image: from `start_percent` of the steps on, the "
                   "self-attention of layers >= `start_layer` uses the source image's keys/values taken from its "
                   "inversion chain, each CFG half those of the same half (conditional: the source prompt; "
                   "unconditional: `negative`). "
                   "Sample with the stock KSampler (sampler ddim, scheduler and steps of the inversion) or "
                   "SamplerCustom with DDIM Invert's sigmas; start from the inversion's noise to keep the layout. "
                   "Flux, Chroma, Qwen-Image and SD3.5: in the chosen joint-attention blocks the target's "
                   "image-token keys/values are replaced by the source's (Stable Flow's attention injection); text "
                   "tokens keep their own.")
    CATEGORY = CATEGORY + "/attention"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with KV injection; the input MODEL is left unchanged.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": tip("MODEL", "The model to patch (the one the inversion was made with)."),
                "inversion": tip(INVERSION, "The source image's inversion (DDIM Invert)."),
                "start_percent": tip("FLOAT", "Fraction of the sampling steps from which to inject: step i of N "
                                     "injects when i/N >= start_percent. MasaCtrl's START_STEP 4 of 50 = 0.08. "
                                     "Earlier steps let the new prompt set the layout. Flux/Chroma: Stable Flow "
                                     "injects from the first step (0.0); RF-Edit shares the source's attention "
                                     "features only in the first steps.",
                                     default=0.08, min=0.0, max=1.0, step=0.01),
                "start_layer": tip("INT", "First self-attention layer to inject, in execution order (SD1.x/2.x: "
                                   "16 layers, down 0-5, mid 6, up 7-15; SDXL: 70, down 0-23, mid 24-33, up 34-69). "
                                   "-1 (default) = the first decoder layer at the second-finest attention "
                                   "resolution, which means the same on every family: 10 on SD1.x/2.x (MasaCtrl's "
                                   "default), 34 on SDXL. Flux/Chroma: a block position, double blocks first "
                                   "then single blocks (0-18 double, 19-56 single on FLUX.1 and Chroma); n injects "
                                   "every block from n on, -1 Stable Flow's vital layers (positions 0, 1, 2, 17, 18, "
                                   "25, 28, 53, 54, 56). Qwen-Image: 60 joint blocks 0-59; -1 = the middle band "
                                   "15-44 (see docs/nodes.md).", default=-1, min=-1, max=200),
                "mode": tip(list(MODES), "mutual: queries attend to the source's K/V (MasaCtrl); union: to the "
                            "source's and their own K/V concatenated; masked (MasaCtrl's mask-auto): the target's "
                            "foreground queries attend only to the source's foreground keys, background to "
                            "background; the source's foreground from its cross-attention of `mask_words`, the "
                            "target's from its own cross-attention of `target_words` in the same step. "
                            "Flux, Chroma, Qwen-Image, SD3.5: mutual or union (the source's image tokens appended "
                            "to the joint sequence).",
                            default="mutual"),
            },
            "optional": {
                "negative": tip("CONDITIONING", "The negative prompt the sampler gets (connect the same one). As "
                                "MasaCtrl, the unconditional CFG half attends to the source image run with it, the "
                                "conditional half to the source run with its own prompt. Needed when sampling with "
                                "cfg != 1; a new negative records the source once more (cached per inversion and "
                                "negative). Chroma and Qwen-Image at cfg > 1 likewise; guidance-distilled Flux "
                                "samples at cfg 1 and needs none."),
                "mask_words": tip("STRING", "masked mode: comma-separated words of the source prompt marking the "
                                  "source's foreground (its cross-attention at latent/4, min-max normalised, >= "
                                  "0.1, as MasaCtrl's 16x16 maps at 512 px).", default=""),
                "clip": tip("CLIP", "masked mode: the CLIP that encoded the prompts (to find the words)."),
                "source_prompt": tip("STRING", "masked mode: the source prompt given to DDIM Invert.", default=""),
                "cache": tip(list(POLICIES), "Reference K/V: auto caches them (GPU if room, else CPU) once per "
                             "inversion and negative prompt and reuses them across runs (when they would not all fit "
                             "the memory budget, the first steps that fit, the rest recomputed); recompute runs the "
                             "source rows every step.", default="auto"),
                "target_prompt": tip("STRING", "masked mode: the target prompt, the same text as the positive "
                                     "conditioning the sampler gets; the target's foreground is its own "
                                     "cross-attention of `target_words` in this prompt, so an object that moves or "
                                     "changes shape is still masked right.", default=""),
                "target_words": tip("STRING", "masked mode: comma-separated words of `target_prompt` marking the "
                                    "target's foreground (MasaCtrl's cur_token_idx). Empty: `mask_words` (when the "
                                    "object keeps its name, e.g. 'cat' in both prompts); set it when the edit renames "
                                    "the object, e.g. mask_words 'cat', target_words 'dog'.", default=""),
                "mask_map_size": tip(list(MAP_SIZES), "masked mode: which cross-attention maps the source's and "
                                     "the target's masks are drawn from, by their size relative to the latent. auto "
                                     "= latent/4, as MasaCtrl (16x16 maps for SD1.5 at 512 px, 32x32 for SDXL at "
                                     "1024 px; on a smaller UNet its coarsest level). Pick a finer size (latent/2, "
                                     "latent/1) when the masks miss the object: finer maps follow outlines more "
                                     "closely but can be noisier. SD1.x/SD2.x have latent/1 to latent/8, SDXL "
                                     "latent/2 and latent/4.", default=MAP_SIZE_AUTO),
            },
        }

    @checked
    def patch(self, model, inversion, start_percent, start_layer, mode, negative=None, mask_words="", clip=None,
              source_prompt="", cache="auto", target_prompt="", target_words="", mask_map_size=MAP_SIZE_AUTO):
        return (build_kv_inject(model, inversion, start_percent, start_layer, mode, negative=negative,
                                mask_words=mask_words, clip=clip, source_prompt=source_prompt, cache=cache,
                                target_prompt=target_prompt, target_words=target_words,
                                mask_map_size=mask_map_size),)


NODE_CLASS_MAPPINGS = {"ICKVInject": ICKVInject}
NODE_DISPLAY_NAME_MAPPINGS = {"ICKVInject": "KV Inject (Mutual Self-Attention)"}
