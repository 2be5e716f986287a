"""KV Inject (Mutual Self-Attention) node."""
from __future__ import annotations

import torch

from ..artifacts import INVERSION, InversionChainError, user_text
from ..attention.core import patching
from ..attention.editors.kv_inject import MODES, KVInjectEditor, TargetMapObserver, negative_check
from ..attention.core.layers import decoder_start, select_layers
from ..attention.store import reference as reference_store
from ..attention.store.partial_reference import cached_steps
from ..attention.store.reference import POLICIES, ReferenceKV
from ..attention.core.schedule import check_percents, steps_within
from .. import conditioning
from ..attention.core.tokens import locate_words, parse_words
from ..model_info import require_inversion
from ..logs import log
from .common import CATEGORY, tip
from .contract import checked

WHAT = "KV Inject"


class ICKVInject:
    DESCRIPTION = ("MasaCtrl mutual self-attention from a real image: from `start_percent` of the steps on, the "
                   "self-attention of layers >= `start_layer` uses the source image's keys/values taken from its "
                   "inversion chain, each CFG half those of the same half (conditional: the source prompt; "
                   "unconditional: `negative`). "
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
                "start_percent": tip("FLOAT", "Fraction of the sampling steps from which to inject: step i of N "
                                     "injects when i/N >= start_percent. MasaCtrl's START_STEP 4 of 50 = 0.08. "
                                     "Earlier steps let the new prompt set the layout.",
                                     default=0.08, min=0.0, max=1.0, step=0.01),
                "start_layer": tip("INT", "First self-attention layer to inject, in execution order (SD1.x/2.x: "
                                   "16 layers, down 0-5, mid 6, up 7-15; SDXL: 70, down 0-23, mid 24-33, up 34-69). "
                                   "-1 (default) = the first decoder layer at the second-finest attention "
                                   "resolution, which means the same on every family: 10 on SD1.x/2.x (MasaCtrl's "
                                   "default), 34 on SDXL.", default=-1, min=-1, max=200),
                "mode": tip(list(MODES), "mutual: queries attend to the source's K/V (MasaCtrl); union: to the "
                            "source's and their own K/V concatenated; masked (MasaCtrl's mask-auto): the target's "
                            "foreground queries attend only to the source's foreground keys, background to "
                            "background; the source's foreground from its cross-attention of `mask_words`, the "
                            "target's from its own cross-attention of `target_words` in the same step.",
                            default="mutual"),
            },
            "optional": {
                "negative": tip("CONDITIONING", "The negative prompt the sampler gets (connect the same one). As "
                                "MasaCtrl, the unconditional CFG half attends to the source image run with it, the "
                                "conditional half to the source run with its own prompt. Needed when sampling with "
                                "cfg != 1; a new negative records the source once more (cached per inversion and "
                                "negative)."),
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
            },
        }

    @checked
    def patch(self, model, inversion, start_percent, start_layer, mode, negative=None, mask_words="", clip=None,
              source_prompt="", cache="auto", target_prompt="", target_words=""):
        require_inversion(model, inversion, WHAT)
        if mode not in MODES:
            raise InversionChainError(f"{WHAT}: unknown mode '{user_text(mode)}'; use one of {', '.join(MODES)}.")
        layers = patching.layers_of(model)
        if start_layer == -1:
            start_layer = decoder_start(layers)
        if not 0 <= start_layer < len(layers):
            raise InversionChainError(f"{WHAT}: start_layer {start_layer} is beyond this model's {len(layers)} "
                                      f"self-attention layers (valid: 0..{len(layers) - 1}, or -1 for the family "
                                      f"default).")
        check_percents(WHAT, start_percent=start_percent)
        if not steps_within(inversion.steps, start_percent):  # no step would inject: say so, not a silent no-op
            raise InversionChainError(f"{WHAT}: start_percent {start_percent:g} leaves none of the inversion's "
                                      f"{inversion.steps} steps, so nothing would be injected; use a value below "
                                      f"{(inversion.steps - 1) / inversion.steps:g} (MasaCtrl: 0.08 = step 4 of 50).")
        selected = select_layers(layers, start=start_layer)
        cross_tokens, cross_level, target_tokens = None, 2, []
        if mode == "masked":
            words = parse_words(mask_words)
            if not words or clip is None or not source_prompt.strip() or not target_prompt.strip():
                raise InversionChainError(f"{WHAT}: masked mode needs `mask_words`, `clip`, `source_prompt` (the "
                                          f"prompt the inversion was made with) and `target_prompt` (the sampler's "
                                          f"positive prompt: the target's mask comes from its own cross-attention).")
            found = locate_words(clip, source_prompt, words, f"{WHAT} `mask_words`")
            cross_tokens = sorted({i for ids in found.values() for i in ids})
            cross_level = min(2, max(l.level for l in layers))
            found = locate_words(clip, target_prompt, parse_words(target_words) or words,
                                 f"{WHAT} `target_words`" if parse_words(target_words) else
                                 f"{WHAT} `mask_words` (in `target_prompt`; set `target_words` for the target's "
                                 f"name of the object)")
            target_tokens = sorted({i for ids in found.values() for i in ids})
        branches = 1 if negative is None else 2
        reference = ReferenceKV(inversion, selected, steps_within(inversion.steps, start_percent),
                                cross_tokens=cross_tokens, cross_level=cross_level, branches=branches, what=WHAT)
        latent = torch.zeros(inversion.latent_shape)
        positive = conditioning.first_row(inversion.positive)
        negative = None if negative is None else conditioning.first_row(negative)
        # the store owns the cache (keyed by inversion, its conditioning, the negative, layers, steps and mask
        # words): a second node or run with the same inputs reuses it; it is filled through a model patched with a
        # recorder only (start_percent 2: never active, it only records)
        recorder = patching.install(model, KVInjectEditor(reference, selected, 2.0, mode, what=WHAT), WHAT)
        key = conditioning.fingerprint(positive) + ("" if negative is None else conditioning.fingerprint(negative))
        # "partial": the first steps cached, the others recomputed next to their sampling calls
        reference, reference.mode = cached_steps(
            "kv_inject", model, reference, key, cache, lambda ref: ref.fill(recorder, latent, negative=negative),
            positive, negative, extra=(tuple(cross_tokens or ()), cross_level))
        editor = KVInjectEditor(reference, selected, start_percent, mode, target_tokens=target_tokens, what=WHAT)
        patched = patching.install(model, editor, WHAT)
        if mode == "masked":
            patched = patching.install(patched, TargetMapObserver(editor), WHAT)
        if negative is not None:
            patching.add_unet_wrapper(patched, negative_check(negative[0][0], WHAT))
        if reference.mode == "partial":
            reference.install(patched)
        elif reference.mode == "cache":
            log.info(f"[Inversion Chain] {WHAT}: reference K/V for {len(reference.steps)} steps x {len(selected)} "
                     f"layers x {branches} CFG branch(es): {reference.nbytes() / 2 ** 20:.1f} MB on "
                     f"{reference.storage_device} (cache holds {reference_store.STORE.held_bytes() / 2 ** 20:.1f} MB "
                     f"in {len(reference_store.STORE.entries)} entries)")
        else:
            reference.storage_device = model.load_device
            reference.conds = patching.capture_conds(model, positive, latent[:1])
            if negative is not None:
                reference.conds_uncond = patching.capture_conds(model, negative, latent[:1])
            patching.add_unet_wrapper(patched, reference.recompute_wrapper)
            log.info(f"[Inversion Chain] {WHAT}: recomputing reference K/V at every step"
                     f"{' (' + reference.budget_message + ')' if getattr(reference, 'budget_message', '') else ''}")
        return (patched,)


NODE_CLASS_MAPPINGS = {"ICKVInject": ICKVInject}
NODE_DISPLAY_NAME_MAPPINGS = {"ICKVInject": "KV Inject (Mutual Self-Attention)"}
