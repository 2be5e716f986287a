"""KV Inject (Mutual Self-Attention) node."""
from __future__ import annotations

import torch

from ..artifacts import INVERSION, InversionChainError
from ..attention import patching
from ..attention.kv_inject import MODES, KVInjectEditor
from ..attention.layers import select_layers
from ..attention.reference import POLICIES, ReferenceKV
from ..attention.tokens import locate_words, parse_words
from ..samplers.model_info import require_inversion
from .common import CATEGORY, tip
from .contract import checked

WHAT = "KV Inject"


class ICKVInject:
    DESCRIPTION = ("MasaCtrl-style mutual self-attention from a real image: from `start_step` on, the self-attention "
                   "of layers >= `start_layer` uses the source image's keys/values taken from its inversion chain. "
                   "Sample with the stock KSampler (sampler ddim, scheduler and steps of the inversion) or "
                   "SamplerCustom with DDIM Invert's sigmas; start from the inversion's noise to keep the layout.")
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
                "start_step": tip("INT", "Integer sampling step from which to inject (MasaCtrl: 4 of 50). Earlier "
                                  "steps let the new prompt set the layout.", default=4, min=0, max=1000),
                "start_layer": tip("INT", "First self-attention layer to inject, in execution order (SD1.x/2.x: "
                                   "16 layers, down 0-5, mid 6, up 7-15; SDXL: 70). MasaCtrl: 10.",
                                   default=10, min=0, max=200),
                "mode": tip(list(MODES), "mutual: queries attend to the source's K/V; union: to source and own "
                            "K/V concatenated; masked: foreground/background attend within their own region, "
                            "regions from the source's cross-attention of `mask_words`.", default="mutual"),
            },
            "optional": {
                "mask_words": tip("STRING", "masked mode: comma-separated words of the source prompt marking the "
                                  "foreground (threshold 0.1 on their 16x16 cross-attention).", default=""),
                "clip": tip("CLIP", "masked mode: the CLIP used for the source prompt (to find the words)."),
                "source_prompt": tip("STRING", "masked mode: the source prompt given to DDIM Invert.", default=""),
                "cache": tip(list(POLICIES), "Reference K/V: auto caches them (GPU if room, else CPU) once per "
                             "inversion and reuses them across runs; recompute runs the source row every step.",
                             default="auto"),
            },
        }

    @checked
    def patch(self, model, inversion, start_step, start_layer, mode, mask_words="", clip=None, source_prompt="",
              cache="auto"):
        require_inversion(model, inversion, WHAT)
        layers = patching.layers_of(model)
        if not 0 <= start_layer < len(layers):
            raise InversionChainError(f"{WHAT}: start_layer {start_layer} is beyond this model's {len(layers)} "
                                      f"self-attention layers (valid: 0..{len(layers) - 1}).")
        if start_step >= inversion.steps:  # no step would inject: say so rather than return an unpatched model
            raise InversionChainError(f"{WHAT}: start_step {start_step} is at or beyond the inversion's "
                                      f"{inversion.steps} steps, so nothing would be injected; use 0.."
                                      f"{inversion.steps - 1} (MasaCtrl: 4 of 50).")
        selected = select_layers(layers, start=start_layer)
        cross_tokens, cross_level = None, 2
        if mode == "masked":
            words = parse_words(mask_words)
            if not words or clip is None or not source_prompt.strip():
                raise InversionChainError(f"{WHAT}: masked mode needs `mask_words`, `clip` and `source_prompt` "
                                          f"(the prompt the inversion was made with).")
            found = locate_words(clip, source_prompt, words, f"{WHAT} `mask_words`")
            cross_tokens = sorted({i for ids in found.values() for i in ids})
            cross_level = min(2, max(l.level for l in layers))
        reference = ReferenceKV(inversion, selected, range(min(start_step, inversion.steps), inversion.steps),
                                cross_tokens=cross_tokens, cross_level=cross_level)
        editor = KVInjectEditor(reference, selected, start_step, mode)
        patched = patching.install(model, editor, WHAT)
        latent = torch.zeros(inversion.latent_shape)
        reference.mode = reference.choose_storage(cache, model)
        if reference.mode == "cache":
            reference.fill(patched, latent)
            print(f"[Inversion Chain] {WHAT}: cached reference K/V for {len(reference.steps)} steps x "
                  f"{len(selected)} layers: {reference.nbytes() / 2 ** 20:.1f} MB on {reference.storage_device}")
        else:
            reference.storage_device = model.load_device
            positive = [[c[0][:1], c[1]] for c in inversion.positive]
            reference.conds = patching.capture_conds(model, positive, latent[:1])
            patching.add_unet_wrapper(patched, reference.recompute_wrapper)
            print(f"[Inversion Chain] {WHAT}: recomputing reference K/V at every step")
        return (patched,)


NODE_CLASS_MAPPINGS = {"ICKVInject": ICKVInject}
NODE_DISPLAY_NAME_MAPPINGS = {"ICKVInject": "KV Inject (Mutual Self-Attention)"}
