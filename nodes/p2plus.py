"""P2Plus Controller (Prompt-to-Prompt / P2Plus editing, real or generated images) and Null-Text Inversion."""
from __future__ import annotations

import torch

import comfy.sample

from .. import compat, conditioning
from ..artifacts import INVERSION, NULL_TEXT, STYLE, InversionChainError, NullText, Style
from ..attention import patching
from ..attention.p2p import (BLEND_LEVEL, DEFAULT_SELF_MAX_RES, MODES, CfgCheck, LocalBlend, P2PlusEditor,
                             StepSchedule, UncondContext, build_plan, word_positions)
from ..attention.style import ValueInjection
from ..attention.tokens import parse_words
from ..samplers import null_text as null_text_lib
from ..samplers.model_info import check_supported, model_key, require_inversion
from .common import CATEGORY, tip

WHAT = "P2Plus Controller"
WHAT_NT = "Null-Text Inversion"


def _encode(clip, text: str):
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return cond, pooled


def _conditioning(rows, sizes):
    """One CONDITIONING entry whose batch rows are ``rows`` [(cond, pooled), ...] (one prompt per latent row),
    with the SDXL size entries ``sizes`` (those of the inversion's conditioning, or of the generated latent)."""
    cond = torch.cat([c for c, _ in rows])
    extra = dict(sizes)
    if all(p is not None for _, p in rows):
        extra["pooled_output"] = torch.cat([p for _, p in rows])
    return [[cond, extra]]


def _rows_of(conditioning, what: str, name: str):
    """(cond, pooled) of a one-entry, one-row CONDITIONING."""
    if not conditioning or len(conditioning) != 1 or conditioning[0][0].shape[0] != 1:
        raise InversionChainError(f"{what}: the {name} conditioning it was made with must be one prompt (one entry, "
                                  f"batch 1).")
    return conditioning[0][0], conditioning[0][1].get("pooled_output")


def _require_source_prompt(made_with, source, sizes, source_prompt: str, artefact: str, maker: str):
    """The NULL_TEXT / STYLE was made with the same source conditioning as this node builds: prompt embedding,
    pooled output and (SDXL) size entries."""
    _rows_of(made_with, WHAT, "positive")
    differs = conditioning.mismatch(made_with, _conditioning([source], sizes))
    if differs:
        raise InversionChainError(f"{WHAT}: the {artefact} was made with another source prompt (or CLIP, or SDXL "
                                  f"size entries) than '{source_prompt}' ({differs}). Encode the same source prompt "
                                  f"(and, on SDXL, the same sizes) for {maker} and this node.")


class ICP2PlusController:
    DESCRIPTION = (
        "Prompt-to-Prompt editing with P2Plus unconditional-branch control. Outputs a patched MODEL, 2-row "
        "positive/negative CONDITIONING (row 0 source, row 1 target) and a 2-row LATENT holding the same starting "
        "noise twice. Sample them with a stock sampler: KSamplerAdvanced (add_noise disable, sampler ddim, the "
        "inversion's steps and scheduler) or SamplerCustom (add_noise off, ddim, this node's sigmas). Row 0 "
        "reconstructs the source image (exactly under guidance with a NULL_TEXT), row 1 is the edit.")
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
                "cross_replace": tip("FLOAT", "tau_c: fraction of the steps (from the start) during which the "
                                     "target's cross-attention maps are the source's. Larger keeps more layout.",
                                     default=0.6, min=0.0, max=1.0, step=0.01),
                "self_replace": tip("FLOAT", "tau_s: fraction of the steps during which the target's "
                                    "self-attention maps (cond branch, small resolutions) are the source's.",
                                    default=0.6, min=0.0, max=1.0, step=0.01),
                "uncond_self_replace": tip("FLOAT", "tau_u (P2Plus): fraction of the steps during which the "
                                           "unconditional branch's self-attention maps are the source's too. 0 = "
                                           "plain Prompt-to-Prompt; 0.5 for large structural changes.",
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
                "blend_start": tip("FLOAT", "Local blend acts from this fraction of the steps on (the authors' "
                                   "null-text code: 0.2).", default=0.2, min=0.0, max=1.0, step=0.01),
                "inversion": tip(INVERSION, "Real image: the source's DDIM inversion (one image, cfg 1). Its x_T "
                                 "starts both rows and its schedule defines the steps."),
                "null_text": tip(NULL_TEXT, "From Null-Text Inversion on the same inversion: per-step "
                                 "unconditional embeddings that make row 0 reconstruct the image under guidance."),
                "latent": tip("LATENT", "Generated image (no inversion): gives the size; the noise comes from "
                              "`seed`."),
                "seed": tip("INT", "Generated image (no inversion): seed of the shared starting noise.",
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
                             "`style_until` lasts, the value input of both rows' cross-attention (cond branch) "
                             "comes from the trained mappers: row 0 retraces the photo, row 1 keeps its "
                             "appearance (refine: aligned tokens only); keys keep each row's prompt."),
                "style_until": tip("FLOAT", "tau_v (StyleDiffusion): fraction of the steps during which the value "
                                   "input comes from the STYLE; afterwards each row uses its own prompt. 0 = no "
                                   "style (plain P2Plus); paper default 0.5, 0.2-0.5 for large structural changes.",
                                   default=0.5, min=0.0, max=1.0, step=0.01),
            },
        }

    def build(self, model, clip, source_prompt, target_prompt, mode, cross_replace, self_replace, uncond_self_replace,
              reweight="", blend_words="", blend_threshold=0.3, blend_start=0.2, inversion=None, null_text=None,
              latent=None, seed=0, steps=50, scheduler="ddim_uniform", self_replace_max_res=DEFAULT_SELF_MAX_RES,
              style=None, style_until=0.5):
        check_supported(model, WHAT)
        for name, value in (("cross_replace", cross_replace), ("self_replace", self_replace),
                            ("uncond_self_replace", uncond_self_replace), ("blend_start", blend_start),
                            ("style_until", style_until)):
            if not 0.0 <= float(value) <= 1.0:
                raise InversionChainError(f"{WHAT}: {name} is a fraction of the steps in [0, 1], got {value}.")
        plan = build_plan(clip, source_prompt, target_prompt, mode, reweight, WHAT)

        # schedule and starting noise
        if inversion is not None:
            require_inversion(model, inversion, WHAT)
            if inversion.latent_shape[0] != 1:
                raise InversionChainError(f"{WHAT}: the INVERSION holds {inversion.latent_shape[0]} images; edit one "
                                          f"image at a time.")
            schedule = StepSchedule(inversion.sigmas, inversion.scheduler, WHAT)
            x_t = model.model.process_latent_out(inversion.chain[0].float().clone()).cpu()
        else:
            if null_text is not None:
                raise InversionChainError(f"{WHAT}: a NULL_TEXT needs the INVERSION it was made from; connect it to "
                                          f"`inversion` as well.")
            if latent is None or "samples" not in latent:
                raise InversionChainError(f"{WHAT}: connect `inversion` (edit a real image) or `latent` (e.g. "
                                          f"EmptyLatentImage: the size of a generated image).")
            sigmas = compat.calculate_sigmas(model, scheduler, steps)
            schedule = StepSchedule(sigmas, scheduler, WHAT)
            shape = latent["samples"][:1]
            noise = comfy.sample.prepare_noise(shape, seed) * (1.0 + float(sigmas[0]) ** 2) ** 0.5
            x_t = model.model.process_latent_out(noise.float())
        latent_out = {"samples": x_t.repeat(2, 1, 1, 1).contiguous()}

        # conditioning (row 0 source, row 1 target); SDXL's size entries as the inversion was made with (a
        # re-encoded prompt without them conditions on 768 px and row 0 would stop reconstructing), or as
        # CLIPTextEncodeSDXL would give for the generated latent's size
        sizes = (conditioning.size_entries(inversion.positive) if inversion is not None
                 else conditioning.size_entries_for_latent(latent["samples"].shape))
        source = _encode(clip, source_prompt)
        target = _encode(clip, target_prompt)
        if null_text is not None:
            if not isinstance(null_text, NullText):
                raise InversionChainError(f"{WHAT}: `null_text` must come from Null-Text Inversion.")
            null_text.check_inversion(inversion, WHAT)
            _require_source_prompt(null_text.positive, source, sizes, source_prompt, "NULL_TEXT", "Null-Text Inversion")
            uncond = source if null_text.method == "negative-prompt" else _rows_of(null_text.negative, WHAT,
                                                                                  "negative")
        else:
            uncond = _encode(clip, "")
        positive = _conditioning([source, target], sizes)
        negative = _conditioning([uncond, uncond], sizes)

        # local blend
        blend = None
        words = parse_words(blend_words)
        if words:
            src_pos, tgt_pos = [], []
            for word in words:
                in_src = word_positions(clip, plan.source_ids, word)
                in_tgt = word_positions(clip, plan.target_ids, word)
                if not in_src and not in_tgt:
                    raise InversionChainError(f"{WHAT}: the blend word '{word}' is in neither the source prompt "
                                              f"'{source_prompt}' nor the target prompt '{target_prompt}'.")
                src_pos += in_src
                tgt_pos += in_tgt
            layers = patching.layers_of(model)
            level = min(BLEND_LEVEL, max(l.level for l in layers))
            blend = LocalBlend(sorted(set(src_pos)), sorted(set(tgt_pos)), blend_threshold, blend_start, level,
                               schedule)

        editor = P2PlusEditor(plan, schedule, cross_replace, self_replace, uncond_self_replace, self_replace_max_res,
                              blend, WHAT)
        patched = patching.install(model, editor, WHAT)
        if blend is not None:
            patching.add_post_cfg_function(patched, blend)
        if null_text is not None and null_text.method == "null-text":
            patching.add_attn2_patch(patched, UncondContext(null_text.embeddings, schedule))
            patching.add_post_cfg_function(patched, CfgCheck(null_text.cfg, WHAT))
        if style is not None:
            if not isinstance(style, Style):
                raise InversionChainError(f"{WHAT}: `style` must come from StyleDiffusion Mapper.")
            if inversion is None:
                raise InversionChainError(f"{WHAT}: a STYLE needs the INVERSION it was trained on; connect it to "
                                          f"`inversion` as well.")
            style.check(model_key(model), inversion, WHAT)
            _require_source_prompt(style.positive, source, sizes, source_prompt, "STYLE", "StyleDiffusion Mapper")
            # row 0 takes the style token for token; row 1 through the edit's token alignment
            row_maps = [None, (plan.mapper.long(), plan.aligned.float())]
            patching.add_attn2_patch(patched, ValueInjection(style.values, schedule, style_until, row_maps))
        print(f"[Inversion Chain] {WHAT}: {plan.describe()}; {schedule.steps} steps ({schedule.scheduler}); "
              f"tau_c {cross_replace}, tau_s {self_replace}, tau_u {uncond_self_replace}"
              f"{'; local blend ' + ', '.join(words) if words else ''}"
              f"{'; ' + null_text.method + ' uncond' if null_text is not None else ''}"
              f"{'; StyleDiffusion values until ' + str(style_until) if style is not None else ''}")
        return (patched, positive, negative, latent_out, schedule.sigmas.clone())


class ICNullTextInversion:
    DESCRIPTION = (
        "Makes CFG sampling retrace a real image's inversion: null-text inversion optimises one unconditional "
        "embedding per step (Adam, early stop as the paper); negative-prompt inversion uses the source prompt as "
        "the unconditional prompt (no cost). Feed the NULL_TEXT to P2Plus Controller with the same inversion.")
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
                "method": tip(list(null_text_lib.METHODS), "null-text: optimise one embedding per step (up to "
                              "inner_steps forward+backward passes each); negative-prompt: the source prompt is the "
                              "unconditional prompt (no cost; row 0 then samples exactly as at cfg 1, edits are "
                              "guided away from the source prompt).", default="null-text"),
            },
            "optional": {
                "learning_rate": tip("FLOAT", "Adam's base rate, decayed as lr * (1 - step/100). 0.01 is the "
                                     "paper's (Stable Diffusion); raise it if the reconstruction stays poor.",
                                     default=null_text_lib.LEARNING_RATE, min=1e-5, max=10.0, step=0.001,
                                     round=0.00001),
            },
        }

    def run(self, model, inversion, positive, negative, cfg=7.5, inner_steps=10, method="null-text",
            learning_rate=null_text_lib.LEARNING_RATE):
        if method not in null_text_lib.METHODS:
            raise InversionChainError(f"{WHAT_NT}: unknown method '{method}'; use one of "
                                      f"{', '.join(null_text_lib.METHODS)}.")
        if method == "negative-prompt":
            result = null_text_lib.negative_prompt_inversion(model, inversion, positive, cfg, WHAT_NT)
        else:
            result = null_text_lib.optimize(model, inversion, positive, negative, cfg, inner_steps, learning_rate,
                                            WHAT_NT)
        print(f"[Inversion Chain] {result.summary()}")
        return (result,)


NODE_CLASS_MAPPINGS = {"ICP2PlusController": ICP2PlusController, "ICNullTextInversion": ICNullTextInversion}
NODE_DISPLAY_NAME_MAPPINGS = {"ICP2PlusController": "P2Plus Controller", "ICNullTextInversion": "Null-Text Inversion"}
