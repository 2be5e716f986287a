"""``build_edit``: the whole Prompt-to-Prompt / P2Plus assembly (plan, schedule, starting noise, two-row
conditioning, local blend, null-text and StyleDiffusion context patches) on a patched ``model.clone()``.
The P2Plus Controller node validates its widgets and calls this; the result is sampled by a stock sampler."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import compat, conditioning
from ..artifacts import InversionChainError, NullText, Style, node_name, user_text
from ..model_info import (check_supported, model_key, reads_pooled_output, require_inversion,
                          uncond_branch_problem)
from ..attention.core import patching
from ..optimize import null_text as null_text_lib
from ..attention.core.context import UNCOND, CfgCheck, ContextPatch
from ..attention.core import dit_layers
from ..attention.editors.dit_p2p import DiTP2PlusOverride, StartCheck
from ..attention.editors.edit_plan import build_plan, build_stream_plan
from ..attention.viewer import dit_capture
from ..attention.core.layers import MAP_SIZE_AUTO, map_level, map_size_problem
from ..attention.editors.local_blend import LocalBlend
from ..attention.editors.p2p import DEFAULT_SELF_MAX_RES, P2PlusEditor
from ..attention.core.schedule import Schedule, check_percents
from ..attention.editors.style import joint_attention_has_no_value_input, value_injection
from ..attention.core.tokens import QWEN_STREAM, T5_STREAM, parse_words, word_positions



@dataclass
class Edit:
    model: object            # the patched MODEL clone
    positive: list           # CONDITIONING, row 0 source, row 1 target
    negative: list           # CONDITIONING, both rows
    latent: dict             # LATENT: two rows of the same x_T
    sigmas: torch.Tensor     # the schedule the edit is defined on
    description: str


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


def _rows_of(conditioning, name: str):
    """(cond, pooled) of a one-entry, one-row CONDITIONING."""
    if not conditioning or len(conditioning) != 1 or conditioning[0][0].shape[0] != 1:
        raise InversionChainError(f"the {name} conditioning it was made with must be one prompt (one entry, "
                                  f"batch 1).")
    return conditioning[0][0], conditioning[0][1].get("pooled_output")


def _require_source_prompt(made_with, source, sizes, source_prompt: str, artefact: str, maker: str,
                           pooled_matters: bool = True):
    """The NULL_TEXT / STYLE was made with the same source conditioning as this edit builds: prompt embedding,
    pooled output (where the model reads it) and (SDXL) size entries."""
    _rows_of(made_with, "positive")
    differs = conditioning.mismatch(made_with, _conditioning([source], sizes), pooled_matters=pooled_matters)
    if differs:
        raise InversionChainError(f"the {artefact} was made with another source prompt (or CLIP, or SDXL "
                                  f"size entries) than '{user_text(source_prompt)}' ({differs}). Encode the same "
                                  f"source prompt "
                                  f"(and, on SDXL, the same sizes) for {maker} and this node.")


def build_edit(model, clip, source_prompt: str, target_prompt: str, mode: str, cross_replace_end_percent: float,
               self_replace_end_percent: float, uncond_self_replace_end_percent: float, reweight: str = "",
               blend_words: str = "", blend_threshold: float = 0.3, blend_start_percent: float = 0.2,
               inversion=None, null_text: Optional[NullText] = None, latent: Optional[dict] = None, seed: int = 0,
               steps: int = 50, scheduler: str = "ddim_uniform", self_replace_max_res: int = DEFAULT_SELF_MAX_RES,
               style: Optional[Style] = None, style_end_percent: float = 0.5, blend_map_size: str = MAP_SIZE_AUTO
               ) -> Edit:
    if compat.is_flow_family(compat.model_sampling(model)):
        return build_dit_edit(model, clip, source_prompt, target_prompt, mode, cross_replace_end_percent,
                              self_replace_end_percent, uncond_self_replace_end_percent, reweight, blend_words,
                              blend_threshold, blend_start_percent, inversion, null_text, latent, seed, steps,
                              scheduler, self_replace_max_res, style, blend_map_size)
    check_supported(model)
    check_percents(cross_replace_end_percent=cross_replace_end_percent,
                   self_replace_end_percent=self_replace_end_percent,
                   uncond_self_replace_end_percent=uncond_self_replace_end_percent,
                   blend_start_percent=blend_start_percent, style_end_percent=style_end_percent)
    plan = build_plan(clip, source_prompt, target_prompt, mode, reweight)

    # schedule and starting noise
    if inversion is not None:
        require_inversion(model, inversion)
        if inversion.latent_shape[0] != 1:
            raise InversionChainError(f"the INVERSION holds {inversion.latent_shape[0]} images; edit one "
                                      f"image at a time.")
        schedule = Schedule.of(inversion)
        x_t = compat.latent_out(model, inversion.chain[0].float().clone()).cpu()
    else:
        if null_text is not None:
            raise InversionChainError("a NULL_TEXT needs the INVERSION it was made from; connect it to "
                                      "`inversion` as well.")
        if latent is None or "samples" not in latent:
            raise InversionChainError("connect `inversion` (edit a real image) or `latent` (e.g. "
                                      "EmptyLatentImage: the size of a generated image).")
        sigmas = compat.calculate_sigmas(model, scheduler, steps)
        schedule = Schedule(sigmas, scheduler)
        noise = compat.seed_noise(model, latent["samples"][:1], seed, sigmas)  # as a stock sampler scales it
        x_t = compat.latent_out(model, noise.float())
    latent_out = {"samples": x_t.repeat(2, 1, 1, 1).contiguous()}

    # conditioning (row 0 source, row 1 target); SDXL's size entries as the inversion was made with (a
    # re-encoded prompt without them conditions on 768 px and row 0 would stop reconstructing), or as
    # CLIPTextEncodeSDXL would give for the generated latent's size
    sizes = (conditioning.size_entries(inversion.positive) if inversion is not None
             else conditioning.size_entries_for_latent(latent["samples"].shape))
    source = _encode(clip, source_prompt)
    target = _encode(clip, target_prompt)
    if null_text is not None:
        null_text.check_inversion(inversion)   # its type: the node contract checked it
        _require_source_prompt(null_text.positive, source, sizes, source_prompt, "NULL_TEXT", "Null-Text Inversion",
                               reads_pooled_output(model))
        uncond = source if null_text.method == "negative-prompt" else _rows_of(null_text.negative, "negative")
    else:
        uncond = _encode(clip, "")
    positive = _conditioning([source, target], sizes)
    negative = _conditioning([uncond, uncond], sizes)

    # local blend
    blend = None
    words = parse_words(blend_words)
    if words:
        src_pos, tgt_pos = blend_positions(words, plan, lambda ids, word: word_positions(clip, ids, word),
                                           source_prompt, target_prompt)
        layers = patching.layers_of(model)
        level = map_level(layers, blend_map_size)
        if level is None:
            problem = map_size_problem(layers, "blend_map_size", user_text(blend_map_size))
            raise InversionChainError(problem)
        blend = LocalBlend(sorted(set(src_pos)), sorted(set(tgt_pos)), blend_threshold, blend_start_percent, level,
                           schedule)

    editor = P2PlusEditor(plan, schedule, cross_replace_end_percent, self_replace_end_percent,
                          uncond_self_replace_end_percent, self_replace_max_res, blend)
    patched = patching.install(model, editor)
    if blend is not None:
        patching.add_post_cfg_function(patched, blend)
    if null_text is not None and null_text.method == "null-text":
        patching.add_attn2_patch(patched, ContextPatch(
            null_text.embeddings, schedule, UNCOND, keys=True,
            mismatch="Use the negative output of P2Plus Controller with the NULL_TEXT's model."))
        patching.add_post_cfg_function(patched, CfgCheck(null_text.cfg))
    if style is not None:
        if inversion is None:   # its type: the node contract checked it
            raise InversionChainError("a STYLE needs the INVERSION it was trained on; connect it to "
                                      "`inversion` as well.")
        style.check(model_key(model), inversion)
        _require_source_prompt(style.positive, source, sizes, source_prompt, "STYLE", "StyleDiffusion Mapper",
                               reads_pooled_output(model))
        # row 0 takes the style token for token; row 1 through the edit's token alignment
        row_maps = [None, (plan.mapper.long(), plan.aligned.float())]
        patching.add_attn2_patch(patched, value_injection(style.values, schedule, style_end_percent, row_maps))
    description = (f"{plan.describe()}; {schedule.steps} steps ({schedule.scheduler}); "
                   f"cross/self/uncond-self replace until {cross_replace_end_percent}/{self_replace_end_percent}/"
                   f"{uncond_self_replace_end_percent} of the steps"
                   f"{'; local blend ' + ', '.join(words) if words else ''}"
                   f"{'; ' + null_text.method + ' uncond' if null_text is not None else ''}"
                   f"{'; StyleDiffusion values until ' + str(style_end_percent) if style is not None else ''}")
    return Edit(patched, positive, negative, latent_out, schedule.sigmas.clone(), description)


DIT_FAMILIES = "Flux (dev-style, guidance-distilled: cfg 1), Chroma and Qwen-Image (true CFG)"


def blend_positions(words, plan, positions_of, source_prompt: str, target_prompt: str, tokens: str = ""):
    """(source positions, target positions) of the local-blend words, the CLIP or T5 plan alike; a word in neither
    prompt is an error naming both."""
    src_pos, tgt_pos = [], []
    for word in words:
        in_src, in_tgt = positions_of(plan.source_ids, word), positions_of(plan.target_ids, word)
        if not in_src and not in_tgt:
            raise InversionChainError(f"the blend word '{user_text(word)}' is in neither the source prompt "
                                      f"'{user_text(source_prompt)}' nor the target prompt "
                                      f"'{user_text(target_prompt)}'{tokens}.")
        src_pos += in_src
        tgt_pos += in_tgt
    return src_pos, tgt_pos


def _starting_latent(model, inversion, latent, steps, scheduler, family):
    """(Schedule, the 2-row LATENT) on a flow model. A flow sampler at sigma 1 scales the LATENT by 1 - sigma = 0, so
    an x_T in the LATENT with add_noise off (as on UNets) would be lost. Generated image: zeros with ``batch_index``
    [0, 0], so a stock sampler with add_noise ON gives both rows the same noise (its seed's first row). Real image
    (``inversion``): the inversion's x_T in both rows (LATENT space), its schedule; the sampler starts there from
    Inverted Noise (one image's start tiled to the two rows) on SamplerCustomAdvanced."""
    if inversion is not None:
        require_inversion(model, inversion, allow_flow=True)
        if inversion.latent_shape[0] != 1:
            raise InversionChainError(f"the INVERSION holds {inversion.latent_shape[0]} images; edit one "
                                      f"image at a time.")
        x_t = compat.latent_out(model, inversion.chain[0].float().clone()).cpu()
        return Schedule.of(inversion), {"samples": x_t.repeat(2, *([1] * (x_t.ndim - 1))).contiguous()}
    if latent is None or "samples" not in latent:
        raise InversionChainError(f"connect `inversion` (edit a real image: sample from Inverted Noise) or `latent` "
                                  f"(e.g. EmptySD3LatentImage: the size of the generated image); on {family} a "
                                  f"generated image's noise comes from the sampler's seed (add_noise on).")
    sigmas = compat.calculate_sigmas(model, scheduler, steps)
    first = latent["samples"][:1]
    zeros = torch.zeros_like(first).repeat(2, *([1] * (first.ndim - 1)))
    return Schedule(sigmas, scheduler), {"samples": zeros, "batch_index": [0, 0]}


def _dit_negative(model, clip, null_text, inversion, source, source_prompt):
    """The 2-row negative of a DiT edit: the empty prompt; with a NULL_TEXT (true-CFG families only), the source
    prompt (negative-prompt inversion) or the per-step optimised contexts as Null-Text Conditioning places them
    (one entry per step, active around its sigma), each in both rows."""
    if null_text is None:
        uncond = _encode(clip, "")
        return _conditioning([uncond, uncond], {})
    problem = uncond_branch_problem(model, "null-text inversion")
    if problem:
        raise InversionChainError(f"`null_text`: {problem}")
    null_text.check_inversion(inversion)   # its type: the node contract checked it
    _require_source_prompt(null_text.positive, source, {}, source_prompt, "NULL_TEXT", "Null-Text Inversion",
                           reads_pooled_output(model))
    if null_text.method == "negative-prompt":
        return _conditioning([source, source], {})
    return [[t.repeat(2, *([1] * (t.ndim - 1))), extra] for t, extra in null_text_lib.as_conditioning(model, null_text)]


def _carried(inversion) -> dict:
    """What the edit's positive keeps from the inversion's besides the prompt: Flux-dev's FluxGuidance value (a
    re-encoded prompt without it is read at ComfyUI's default guidance, and row 0 would stop reconstructing)."""
    if inversion is None or not inversion.positive:
        return {}
    extra = inversion.positive[0][1]
    return {"guidance": extra["guidance"]} if "guidance" in extra else {}


def build_dit_edit(model, clip, source_prompt, target_prompt, mode, cross_replace_end_percent,
                   self_replace_end_percent, uncond_self_replace_end_percent, reweight, blend_words,
                   blend_threshold, blend_start_percent, inversion, null_text, latent, seed, steps, scheduler,
                   self_replace_max_res, style, blend_map_size=MAP_SIZE_AUTO) -> Edit:
    """Prompt-to-Prompt / P2Plus on a Flux-layout DiT or Qwen-Image: the edit plan over the text tokens the DiT reads
    (T5, Qwen2.5), applied to the joint attention's image-to-text probabilities by an
    ``optimized_attention_override`` (attention/editors/dit_p2p.py)."""
    family = compat.family_name(model)
    qwen = dit_layers.is_qwen_image(model)
    if not (dit_layers.is_flux_layout(model) or qwen):
        raise InversionChainError(f"the model family '{family}' is not supported yet by this node; on "
                                  f"rectified-flow models it edits {DIT_FAMILIES}, and SD1.x, SD2.x, SDXL.")
    stream = QWEN_STREAM if qwen else T5_STREAM
    for feature in ("dit-attention-patches", "attention-override"):
        missing = compat.missing_feature_message(feature, node_name())
        if missing:
            raise InversionChainError(missing)
    if style is not None:
        raise InversionChainError(f"`style`: {joint_attention_has_no_value_input(family)} Disconnect `style`.")
    check_percents(cross_replace_end_percent=cross_replace_end_percent,
                   self_replace_end_percent=self_replace_end_percent,
                   uncond_self_replace_end_percent=uncond_self_replace_end_percent,
                   blend_start_percent=blend_start_percent)
    if blend_map_size != MAP_SIZE_AUTO:
        raise InversionChainError(f"`blend_map_size` '{user_text(blend_map_size)}': every block of {family} attends on "
                                  f"one token grid (latent/2), so the blend mask has no other size to read; set it to "
                                  f"{MAP_SIZE_AUTO}.")
    if stream.tokenizer(clip) is None:
        raise InversionChainError(f"{family} reads the prompts as {stream.name} tokens, and this `clip` has no "
                                  f"{stream.name} tokenizer; connect the CLIP that encodes its prompts (Flux: CLIP-L "
                                  f"+ T5, Chroma: T5, Qwen-Image: Qwen2.5-VL).")
    plan = build_stream_plan(clip, stream, source_prompt, target_prompt, mode, reweight)
    schedule, latent_out = _starting_latent(model, inversion, latent, steps, scheduler, family)
    source, target = _encode(clip, source_prompt), _encode(clip, target_prompt)
    if source[0].shape[1] != plan.mapper.numel():
        raise InversionChainError(f"this CLIP encodes {source[0].shape[1]} text tokens for "
                                  f"{plan.mapper.numel()} {stream.name} tokens; connect the CLIP of {family} "
                                  f"(Flux: CLIP-L + T5, Chroma: T5, Qwen-Image: Qwen2.5-VL).")
    positive = _conditioning([source, target], _carried(inversion))
    negative = _dit_negative(model, clip, null_text, inversion, source, source_prompt)
    words, blend = parse_words(blend_words), None
    if words:
        src_pos, tgt_pos = blend_positions(words, plan, lambda ids, word: stream.word_positions(clip, ids, word),
                                           source_prompt, target_prompt, f" (as {stream.name} tokens)")
        blend = LocalBlend(sorted(set(src_pos)), sorted(set(tgt_pos)), blend_threshold, blend_start_percent, 0,
                           schedule)
    patched = model.clone()
    to = dict(patched.model_options.get("transformer_options", {}))
    dm = dit_layers.diffusion_model_of(model)
    positions = {(b.kind, b.index): b.position for b in dit_layers.enumerate_blocks(model)}
    to["optimized_attention_override"] = DiTP2PlusOverride(
        plan, schedule, cross_replace_end_percent, self_replace_end_percent, uncond_self_replace_end_percent,
        int(self_replace_max_res) ** 2, plan.mapper.numel(), int(getattr(dm, "patch_size", 2)),
        to.get("optimized_attention_override"), blend, positions, dit_capture.SHAPE_KEY)
    patched.model_options["transformer_options"] = to
    patching.add_unet_wrapper(patched, dit_capture.shape_wrapper)
    if inversion is not None:
        patching.add_unet_wrapper(patched, lambda previous: StartCheck(inversion.chain[0], inversion.sigmas[0],
                                                                       previous))
    if blend is not None:
        patching.add_post_cfg_function(patched, blend)
    if null_text is not None and null_text.method == "null-text":
        patching.add_post_cfg_function(patched, CfgCheck(null_text.cfg))
    how = ("real image: sample from Inverted Noise (the same inversion) with SamplerCustomAdvanced on these sigmas, "
           "sampler euler" if inversion is not None else "sample with add_noise ON (both rows get the sampler "
                                                         "seed's noise)")
    description = (f"{plan.describe()} ({stream.name} tokens, joint attention of {family}); {schedule.steps} steps "
                   f"({schedule.scheduler}); cross/self/uncond-self replace until {cross_replace_end_percent}/"
                   f"{self_replace_end_percent}/{uncond_self_replace_end_percent} of the steps"
                   f"{'; local blend ' + ', '.join(words) if words else ''}"
                   f"{'; ' + null_text.method + ' uncond' if null_text is not None else ''}; {how}")
    return Edit(patched, positive, negative, latent_out, schedule.sigmas.clone(), description)
