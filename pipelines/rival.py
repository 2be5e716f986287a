"""``rival_sample``: RIVAL's assembly (checks, the reference source, the attention editor, the stacked
conditioning) around the one sampling loop of ``samplers/rival.py``. The RIVAL Align Sampler node calls this."""
from __future__ import annotations

import torch

from ..artifacts import Inversion, InversionChainError, user_text
from ..attention.core import patching
from ..attention.core.schedule import Schedule
from ..attention.editors.rival import RivalAttentionEditor
from ..attention.store.partial_reference import PartialReference
from ..conditioning import first_row
from ..model_info import reads_pooled_output
from .. import compat
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
    MASK, 1 = regenerate): example-based inpainting, see ``samplers/rival.py``."""
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
        ref_cond = {}

        def observe(args):  # the reference row's conditional prediction, for eps normalisation
            ref_cond["denoised"] = args["cond_denoised"][:1]
            return args["denoised"]

        patching.add_post_cfg_function(m, observe)
        ref_y = None
        if reads_pooled_output(model):  # the reference row's ADM vector (SDXL sizes, unCLIP image embedding)
            blank = torch.zeros((1,) + tuple(inversion.latent_shape[1:]))
            ref_y = patching.capture_conds(model, first_row(inversion.positive), blank).get("y")
        patching.add_unet_wrapper(m, lambda previous: reference_rows(previous, ref_y))
        source = in_batch_reference(ref_cond)
        pos = stack_rows(inversion.positive, positive, batch_size)
        neg = stack_rows(negative, negative, batch_size)
        oom_hint = " (+1 reference row)"
    x_T = inversion.chain[0][:1]
    inits = torch.cat([initial_latent(x_T, seed + j, init, region) for j in range(batch_size)])
    out = sample_variations(m, source, inversion, inits, pos, neg, cfg, seed, schedule, normalize, normalize_end,
                            region, preview, oom_hint)
    if source.rows:
        return out[1:].cpu(), out[:1].cpu()
    return out.cpu(), compat.latent_out(model, inversion.chain[-1][:1].clone()).cpu()
