"""``rival_sample``: RIVAL's assembly (checks, the reference source, the attention editor, the stacked
conditioning) around the one sampling loop of ``samplers/rival.py``. The RIVAL Align Sampler node calls this."""
from __future__ import annotations

import torch

from ..artifacts import Inversion, InversionChainError, node_name, user_text
from ..attention.core import dit_layers, mmdit_bridge, patching
from ..attention.core.schedule import Schedule
from ..attention.editors.dit_rival import DiTRival, DiTRivalKernelMask
from ..attention.editors.rival import RivalAttentionEditor
from ..attention.store import reference as reference_store
from ..attention.store.dit_reference import DiTReferenceKV, compute_dtype, image_tokens
from ..attention.store.partial_reference import PartialReference
from ..conditioning import first_row, fingerprint
from ..model_info import reads_pooled_output
from .. import compat
from ..logs import log
from ..samplers.rival import (REFERENCE_MODES, reference_rows, repeat_pooled, cached_reference,
                              cached_reference_source, check_inputs, in_batch_reference, initial_latent,
                              latent_region, sample_variations, stack_rows)


def rival_sample(model, positive, negative, inversion: Inversion, seed: int, batch_size: int, cfg: float = 5.0,
                 replace_end_percent: float = 0.4, normalize_end_percent: float = 0.4, init: str = "permute",
                 normalize: str = "eps",
                 preview: bool = True, reference_mode: str = "cache", mask=None):
    """Returns (variations [N, C, H, W], reference [1, C, H, W]) in LATENT space.

    ``reference_mode='cache'`` records the reference row once per inversion (and negative prompt) and keeps it out
    of the batch; ``'batch'`` runs it as row 0 of every step (the official code's layout). ``mask`` (a ComfyUI
    MASK, 1 = regenerate): example-based inpainting, see ``samplers/rival.py``. DiTs whose joint attention calls
    ``attn1_patch`` (Flux, Chroma, Qwen-Image; SD3.5 through the bridge): ``rival_dit``."""
    if compat.is_flow_family(compat.model_sampling(model)):
        return rival_dit(model, positive, negative, inversion, seed, batch_size, cfg, replace_end_percent,
                         normalize_end_percent, init, normalize, preview, reference_mode, mask)
    check_inputs(model, inversion, batch_size, cfg, replace_end_percent, normalize_end_percent, init, normalize)
    region = latent_region(mask, inversion.latent_shape)
    if reference_mode not in REFERENCE_MODES:
        raise InversionChainError(f"unknown reference mode '{user_text(reference_mode)}'; use one of "
                                  f"{', '.join(REFERENCE_MODES)}.")
    replace_end, normalize_end = float(replace_end_percent), float(normalize_end_percent)
    store = cached_reference(model, inversion, negative, partial=True) if reference_mode == "cache" \
        else None
    schedule = Schedule(inversion.sigmas, inversion.scheduler)
    if store is not None:   # the reference's K/V and eps from the store; only the variations are sampled
        m = patching.install(model, RivalAttentionEditor(replace_end, schedule, reference=store))
        if isinstance(store, PartialReference):
            store.install(m)
        source = cached_reference_source(store)
        pos = [[torch.cat([positive[0][0][:1]] * batch_size), repeat_pooled(positive[0][1], batch_size)]]
        neg = [[torch.cat([negative[0][0][:1]] * batch_size), repeat_pooled(negative[0][1], batch_size)]]
        oom_hint = ""
    else:                   # the photo's row runs in the batch, row 0 of every step
        m = patching.install(model, RivalAttentionEditor(replace_end, schedule))
        ref_y = None
        if reads_pooled_output(model):  # the reference row's ADM vector (SDXL sizes, unCLIP image embedding)
            blank = torch.zeros((1,) + tuple(inversion.latent_shape[1:]))
            ref_y = patching.capture_conds(model, first_row(inversion.positive), blank).get("y")
        source = in_batch_source(m, ref_y)
        pos = stack_rows(inversion.positive, positive, batch_size)
        neg = stack_rows(negative, negative, batch_size)
        oom_hint = " (+1 reference row)"
    return variations(model, m, source, inversion, seed, batch_size, init, region, pos, neg, cfg, schedule, normalize,
                      normalize_end, preview, oom_hint)


def in_batch_source(m, ref_y):
    """The photo's row runs as row 0 of every step: its conditional prediction is observed after CFG (for the
    normalisation) and its rows are handed to the model with ``ref_y`` (its own ADM vector, or None)."""
    ref_cond = {}

    def observe(args):
        ref_cond["denoised"] = args["cond_denoised"][:1]
        return args["denoised"]

    patching.add_post_cfg_function(m, observe)
    patching.add_unet_wrapper(m, lambda previous: reference_rows(previous, ref_y))
    return in_batch_reference(ref_cond)


def variations(model, m, source, inversion: Inversion, seed: int, batch_size: int, init: str, region, pos, neg,
               cfg: float, schedule, normalize: str, normalize_end: float, preview: bool, oom_hint: str):
    """(variations, the photo's row: sampled in the batch layout, else its reconstruction from the chain)."""
    x_T = inversion.chain[0][:1]
    inits = torch.cat([initial_latent(x_T, seed + j, init, region) for j in range(batch_size)])
    out = sample_variations(m, source, inversion, inits, pos, neg, cfg, seed, schedule, normalize, normalize_end,
                            region, preview, oom_hint)
    if source.rows:
        return out[1:].cpu(), out[:1].cpu()
    return out.cpu(), compat.latent_out(model, inversion.chain[-1][:1].clone()).cpu()


def rival_dit(model, positive, negative, inversion: Inversion, seed: int, batch_size: int, cfg: float,
              replace_end_percent: float, normalize_end_percent: float, init: str, normalize: str, preview: bool,
              reference_mode: str, mask=None, steps=None):
    """RIVAL on a DiT with joint attention (Flux, Chroma, Qwen-Image, SD3.5): the same loop (``sample_variations``:
    ComfyUI's Euler step in sigma space, which on these models moves along the predicted velocity), the cross-image
    attention as an ``attn1_patch`` in every joint-attention block (attention/editors/dit_rival.py; on Qwen-Image
    with the kernel's mask set by an ``optimized_attention_override``; SD3.5's MMDiT calls the patch through
    attention/core/mmdit_bridge.py, which ``patching.add_attn1_patch`` installs). ``normalize='eps'`` normalises the
    sampler's direction ``(x - denoised) / sigma``: eps on eps-models (the official code), the velocity here.
    ``steps`` (tests): the steps the attention patch acts at, default all."""
    check_inputs(model, inversion, batch_size, cfg, replace_end_percent, normalize_end_percent, init, normalize,
                 allow_flow=True)
    family = compat.family_name(model)
    if not dit_layers.is_joint_attention_dit(model):
        raise InversionChainError(
            f"the model family '{family}' is not supported yet; among the rectified-flow families RIVAL runs "
            f"on Flux, Chroma, Qwen-Image and SD3.5 (their joint attention's attn1_patch).")
    qwen, mmdit = dit_layers.is_qwen_image(model), mmdit_bridge.is_mmdit(model)
    for feature in ("dit-attention-patches",) + (("attention-override",) if qwen or mmdit else ()):
        missing = compat.missing_feature_message(feature, node_name())
        if missing:
            raise InversionChainError(missing)
    if not dit_layers.calls_attn1_patch(model):
        # SD3 / SD3.5 reach the patches through the attention override (attention/core/mmdit_bridge.py)
        feature = "attention-override" if mmdit else "dit-attention-patches"
        raise InversionChainError(
            f"this ComfyUI's {family} attention calls no attn1_patch, so RIVAL's cross-image attention cannot be "
            f"set; update ComfyUI (the hook it needs exists from {compat.FEATURES[feature][0]} on).")
    if reference_mode not in REFERENCE_MODES:
        raise InversionChainError(f"unknown reference mode '{user_text(reference_mode)}'; use one of "
                                  f"{', '.join(REFERENCE_MODES)}.")
    region = latent_region(mask, inversion.latent_shape)
    replace_end, normalize_end = float(replace_end_percent), float(normalize_end_percent)
    blocks = dit_layers.enumerate_blocks(model)
    tokens = image_tokens(model, inversion.latent_shape)
    schedule = Schedule(inversion.sigmas, inversion.scheduler)
    store = dit_reference(model, inversion, negative, blocks, tokens, 1 if cfg == 1.0 else 2) \
        if reference_mode == "cache" else None
    m = model.clone()
    if store is not None:   # the photo's K/V and velocity from the store; only the variations are sampled
        patching.add_attn1_patch(m, DiTRival(inversion.sigmas, blocks, replace_end, tokens, store, steps, qwen))
        source = cached_reference_source(store)
        pos = [[torch.cat([positive[0][0][:1]] * batch_size), repeat_pooled(positive[0][1], batch_size)]]
        neg = [[torch.cat([negative[0][0][:1]] * batch_size), repeat_pooled(negative[0][1], batch_size)]]
        oom_hint = ""
    else:                   # the photo's row runs in the batch, row 0 of every step
        pos = dit_rows(inversion.positive, positive, batch_size)
        neg = dit_rows(negative, negative, batch_size)
        patching.add_attn1_patch(m, DiTRival(inversion.sigmas, blocks, replace_end, tokens, None, steps, qwen))
        source = in_batch_source(m, None)
        oom_hint = " (+1 reference row)"
    if qwen:   # Qwen-Image ignores a patch's attn_mask: the appended columns are masked in the kernel call
        to = dict(m.model_options.get("transformer_options", {}))
        to["optimized_attention_override"] = DiTRivalKernelMask(store is None, to.get("optimized_attention_override"))
        m.model_options["transformer_options"] = to
    return variations(model, m, source, inversion, seed, batch_size, init, region, pos, neg, cfg, schedule, normalize,
                      normalize_end, preview, oom_hint)


def dit_reference(model, inversion: Inversion, negative, blocks, tokens: int, branches: int):
    """The photo's image-token K/V in every block at every chain step (and its conditional velocity), recorded
    once per (inversion, negative) into the shared reference store; None when it would not fit the store's budget
    (then the photo's row runs in the batch)."""
    entry = DiTReferenceKV(inversion, blocks, range(inversion.steps), tokens, compute_dtype(model), branches,
                           repeat_text=compat.text_batches_by_repeat(model))
    entry.record_eps = True
    positive = first_row(inversion.positive)
    negative_row = first_row(negative) if branches == 2 else None
    key = fingerprint(positive) + ("" if negative_row is None else fingerprint(negative_row))
    latent = torch.zeros(inversion.latent_shape)
    entry, mode = reference_store.cached("dit_rival", model, entry, key, "auto",
                                         lambda ref: ref.fill(model, latent, negative=negative_row),
                                         extra=(tuple(b.key for b in blocks),))
    if mode == "recompute":
        return None
    log.info("[Inversion Chain] %s: reference K/V, %.1f MB on %s", node_name(), entry.nbytes() / 2 ** 20,
             entry.storage_device)
    return entry


def dit_rows(reference_cond, generation_cond, variations: int):
    """``stack_rows`` for DiTs: text tokens are part of the joint attention, so prompts of different token counts
    cannot share a batch (repeating tokens, harmless in a UNet's cross-attention, changes a DiT's attention), and
    the photo's row must read the inversion's own guidance."""
    ref, gen = reference_cond[0], generation_cond[0]
    if ref[0].shape[1] != gen[0].shape[1]:
        raise InversionChainError(
            f"reference_kv 'batch' runs the photo's row with the inversion's prompt ({ref[0].shape[1]} "
            f"tokens) in one batch with the variations' prompt ({gen[0].shape[1]} tokens); on DiT models they must "
            f"have the same token count. Use reference_kv 'cache', or prompts of the same length.")
    guidance = [m.get("guidance") for m in (ref[1], gen[1])]
    if guidance[0] != guidance[1]:
        raise InversionChainError(
            f"reference_kv 'batch' runs the photo's row with the variations' Flux guidance {guidance[1]}, but "
            f"the inversion was made with {guidance[0]}; use reference_kv 'cache' or the same FluxGuidance.")
    return stack_rows(reference_cond, generation_cond, variations)
