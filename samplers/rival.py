"""RIVAL (Real-world Image Variation by ALignment) as a sampling loop in ComfyUI's sigma space.

One loop (``sample_variations``, on ``ddim``'s step) for both places the reference can come from (a
``ReferenceSource``): in the batch, rows [reference, variation 1..N], the reference row overwritten every step with
the inversion chain's latent at that step, so it always equals the real image's chain; or the reference store,
where the same row's keys/values and conditional eps were recorded once per inversion and only the variations are
sampled. Either way its attention keys/values feed the variations (attention/editors/rival.py). For the first
steps (t > t_early) the variations' noise prediction (after CFG) is AdaIN-normalised per channel over HxW to the
reference's conditional noise prediction (``normalize='eps'``, the official code), or their latents to the chain
latent's statistics (``'latent'``, the paper's prose).

When: the paper's timesteps are fractions of the steps here (``schedule.percent_after_timestep``): attention
replacement while ``i / N < replace_end_percent`` (t > t_align), normalisation while ``i / N <
normalize_end_percent`` (t > t_early); t_align = t_early = 600 on 50 ddim_uniform steps is 0.4, the ControlNet
config's t_early 400 is 0.6.

Example-based inpainting (the official ``inpaint_mask``): with a mask, latent cells outside it are set to the
chain's latent after every step (and at the start), so they end as the photo's own latent exactly; inside it the
variation is generated (its start: x_T's values of that region, permuted among themselves), aligned with the whole
photo through the reference row's attention and statistics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import compat
from ..artifacts import Inversion, InversionChainError, node_name, user_text
from ..attention.core import patching
from ..attention.store import reference as reference_store
from ..attention.store.partial_reference import cached_steps
from ..attention.store.reference import ReferenceKV
from ..conditioning import first_row, fingerprint
from ..attention.editors.rival import RivalAttentionEditor
from ..attention.core.schedule import Schedule, check_percents
from ..model_info import require_inversion
from . import ddim
from ..logs import log

INITS = ("permute", "adain", "inverted")
REFERENCE_MODES = ("cache", "batch")
NORMALIZE = ("eps", "latent", "off")
CONTROL_KEYS = ("control", "control_apply_to_uncond")   # CONDITIONING entries of ControlNets / T2I-Adapters


def adain(x: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-row, per-channel statistics over HxW (Qwen-Image's 5-D latents: over its 1xHxW) of ``x`` set to those of
    ``target`` (broadcast over rows)."""
    dims = tuple(range(2, x.dim()))
    mean_x, var_x = x.mean(dim=dims, keepdim=True), x.var(dim=dims, keepdim=True, unbiased=False)
    mean_t, var_t = target.mean(dim=dims, keepdim=True), target.var(dim=dims, keepdim=True, unbiased=False)
    return (x - mean_x) / (var_x + eps).sqrt() * (var_t + eps).sqrt() + mean_t


def initial_latent(x_T: torch.Tensor, seed: int, init: str,
                   region: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One variation's starting latent from the inversion's x_T ([1, C, H, W], sampler space). With ``region``
    (a [1, 1, H, W] bool latent mask, True = regenerated) only that region is drawn, as the official inpainting
    does (a permutation of x_T's values inside it); the rest is x_T. An all-True region gives the unmasked draw."""
    gen = torch.Generator(device="cpu").manual_seed(compat.wrap_seed(seed))  # seed + j wraps as ComfyUI seeds
    if init == "inverted":
        return x_T.clone()
    if init == "permute":  # one spatial permutation for all channels: per-channel statistics kept exactly
        flat = x_T.flatten(2)   # [1, C, H*W] (Qwen-Image's [1, C, 1, H, W] too)
        cells = torch.arange(flat.shape[-1]) if region is None else region.flatten().nonzero().squeeze(1).cpu()
        perm = torch.randperm(len(cells), generator=gen)
        out = flat.clone()
        out[:, :, cells.to(x_T.device)] = flat[:, :, cells[perm].to(x_T.device)]
        return out.reshape(x_T.shape)
    if init == "adain":
        noise = adain(torch.randn(x_T.shape, generator=gen).to(x_T.device, x_T.dtype), x_T)
        return noise if region is None else torch.where(region.to(x_T.device), noise, x_T)
    raise InversionChainError(f"unknown init '{user_text(init)}'; use one of {', '.join(INITS)}.")


def latent_region(mask, latent_shape) -> Optional[torch.Tensor]:
    """A ComfyUI MASK (1 = regenerate, 0 = keep; the official masks are the inverse: white = keep) as a
    [1, 1, h, w] bool mask on the latent grid, or None. The mask may be at latent size or any whole multiple of it
    (the image size); each latent cell is regenerated when the mask's mean over the cell is at least 0.5 (the
    official code also binarises, at 128 of 255 after resizing to the latent grid)."""
    if mask is None:
        return None
    h, w = int(latent_shape[-2]), int(latent_shape[-1])
    accepted = (f"a MASK of one image, [H, W] or [1, H, W], at the latent size {h}x{w} or a whole multiple of it "
                f"(the image size {8 * h}x{8 * w}), values in [0, 1]")
    if not torch.is_tensor(mask) or mask.ndim not in (2, 3) or (mask.ndim == 3 and mask.shape[0] != 1):
        got = f"shape {tuple(mask.shape)}" if torch.is_tensor(mask) else type(mask).__name__
        raise InversionChainError(f"input `mask` got {got}; accepted: {accepted}.")
    m = mask.reshape(1, 1, mask.shape[-2], mask.shape[-1]).float()
    k = m.shape[-2] // h
    if k < 1 or m.shape[-2] != k * h or m.shape[-1] != k * w:
        raise InversionChainError(f"input `mask` is {m.shape[-2]}x{m.shape[-1]} but the inversion's latent is "
                                  f"{h}x{w}; accepted: {accepted}. Resize the mask to the inverted image.")
    if not bool(torch.isfinite(m).all()) or float(m.min()) < 0 or float(m.max()) > 1:
        raise InversionChainError(f"input `mask` has values outside [0, 1] (or NaN); accepted: {accepted}.")
    if k > 1:
        m = torch.nn.functional.avg_pool2d(m, k)
    return m >= 0.5


def stack_rows(reference_cond, generation_cond, variations: int):
    """A CONDITIONING with one row per batch row: the reference's prompt, then the generation prompt N times.
    Token counts that differ are repeated to a common multiple (attention over repeated keys is unchanged)."""
    ref, gen = reference_cond[0], generation_cond[0]
    a, b = ref[0][:1], gen[0][:1]
    if a.shape[-1] != b.shape[-1]:
        raise InversionChainError(f"the inversion's conditioning has width {a.shape[-1]} but the prompt has "
                                  f"{b.shape[-1]}; encode both with the same CLIP.")
    if a.shape[1] != b.shape[1]:
        import math
        n = math.lcm(a.shape[1], b.shape[1])
        a, b = a.repeat(1, n // a.shape[1], 1), b.repeat(1, n // b.shape[1], 1)
    meta = dict(gen[1])
    pooled = [d.get("pooled_output") for d in (ref[1], gen[1])]
    if all(p is not None for p in pooled):
        meta["pooled_output"] = torch.cat([pooled[0][:1]] + [pooled[1][:1]] * variations)
    return [[torch.cat([a] + [b] * variations), meta]]


def check_inputs(model, inversion, batch_size, cfg, replace_end_percent, normalize_end_percent, init, normalize,
                 allow_flow: bool = False):
    require_inversion(model, inversion, allow_flow=allow_flow)
    check_percents(replace_end_percent=replace_end_percent, normalize_end_percent=normalize_end_percent)
    if batch_size < 1:
        raise InversionChainError(f"batch_size must be at least 1, got {batch_size}.")
    if init not in INITS:
        raise InversionChainError(f"unknown init '{user_text(init)}'; use one of {', '.join(INITS)}.")
    if inversion.is_partial and init != "inverted":  # permute/adain make new noise from x_T: needs pure noise
        raise InversionChainError(
            f"`inversion` is partial (DDIM Invert end_percent < 1: the last {inversion.steps} of "
            f"{inversion.full_steps} steps), so its start latent is the photo plus noise, not noise; init "
            f"'{user_text(init)}' "
            f"would scramble it. Use init 'inverted' (an edit from that level) or invert with end_percent 1.")
    if normalize not in NORMALIZE:
        raise InversionChainError(f"unknown normalize '{user_text(normalize)}'; use one of "
                                  f"{', '.join(NORMALIZE)}.")
    if cfg <= 0:
        raise InversionChainError(f"cfg must be positive, got {cfg}.")


def cached_reference(model, inversion: Inversion, negative, policy: str = "auto",
                     partial: bool = False):
    """The inversion's reference K/V for both CFG branches (and its conditional eps), recorded once per
    (inversion, negative prompt) into the shared reference store; None when it would not fit the store's budget
    (then the reference row runs in the batch). With ``partial``, when every step would not fit but some would,
    the first steps that fit are cached and the rest recomputed per step (a PartialReference)."""
    layers = patching.layers_of(model)
    reference = ReferenceKV(inversion, layers, range(inversion.steps), branches=2)
    schedule = Schedule(inversion.sigmas, inversion.scheduler)
    # a ControlNet on the negative (Apply ControlNet (Advanced)) steers the variations' uncond branch only; the
    # photo's reference is recorded without it, as the official pipeline passes zero residuals for the reference
    negative_row = [[c, {k: v for k, v in meta.items() if k not in CONTROL_KEYS}] for c, meta in first_row(negative)]

    def fill(ref):
        # the recorder's editor must write into ``ref`` (the entry being filled)
        recorder = patching.install(model, RivalAttentionEditor(1.0, schedule, reference=ref))
        ref.fill(recorder, torch.zeros(inversion.latent_shape), negative=negative_row)

    key = fingerprint(first_row(inversion.positive)) + fingerprint(negative_row)
    if partial:
        entry, mode = cached_steps("rival", model, reference, key, policy, fill, first_row(inversion.positive),
                                   negative_row)
    else:
        entry, mode = reference_store.cached("rival", model, reference, key, policy, fill)
    if mode == "recompute":
        return None
    log.info("[Inversion Chain] %s: reference K/V, %.1f MB on %s", node_name(), entry.nbytes() / 2 ** 20,
             entry.storage_device)
    return entry


@dataclass
class ReferenceSource:
    """Where the variations' reference comes from, the one thing the two layouts differ in.

    ``rows`` is how many reference rows run in the batch ahead of the variations: 1 when the photo's row is
    sampled with them (its latent overwritten with the chain's at every step), 0 when its keys/values were recorded
    beforehand (the reference store). ``eps(x, i, sigma)`` is the reference's conditional noise prediction at step
    ``i`` (for ``normalize='eps'``), read from the batch's own prediction or from the store."""
    rows: int
    eps: Callable[[torch.Tensor, int, float], torch.Tensor]


def in_batch_reference(ref_cond: dict) -> ReferenceSource:
    """The photo's row runs as row 0; ``ref_cond['denoised']`` is filled every step by a post-CFG observer."""
    return ReferenceSource(1, lambda x, i, s: ddim.eps_from_denoised(x[:1], ref_cond["denoised"].to(x), s))


def cached_reference_source(store) -> ReferenceSource:
    """The photo's keys/values and conditional eps come from ``store`` (a ReferenceKV or PartialReference)."""
    return ReferenceSource(0, lambda x, i, s: store.eps[i].to(x))


def sample_variations(patched, source: ReferenceSource, inversion: Inversion, inits: torch.Tensor, positive,
                      negative, cfg: float, seed: int, schedule: Schedule, normalize: str, normalize_end: float,
                      region: Optional[torch.Tensor], preview: bool, oom_hint: str):
    """The RIVAL sampling loop on ``patched`` (the editor already installed): the shared DDIM step, the
    variations' eps (or latents) AdaIN-normalised to the reference while ``i / N < normalize_end``, and, with
    ``region``, every row outside it set to the chain's latent after each step. Returns every row's final latent
    (reference rows first) in sampler space."""
    steps, sigmas = inversion.steps, inversion.sigmas
    r = source.rows
    preview_cb = compat.preview_callback(patched, steps) if preview else None
    pbar = None if preview else compat.progress_bar(steps)
    keep = None if region is None else ~region

    def rival_loop(model_k, x, sigmas_in, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        chain = lambda i: inversion.latent_at(i, x.device, x.dtype)[:1]  # noqa: E731
        x = inits.to(x.device, x.dtype)
        if r:
            x = torch.cat([chain(0), x])
        ones = x.new_ones([x.shape[0]])
        for i in range(steps):
            compat.check_interrupt()
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            if r:   # the reference row follows the photo's chain
                x[:r] = chain(i)
            denoised = model_k(x, ones * s, **extra_args)
            eps = ddim.eps_from_denoised(x, denoised, s)
            late = schedule.fraction(i) < normalize_end
            if normalize == "eps" and late:
                eps[r:] = adain(eps[r:], source.eps(x, i, s))
            x_next = ddim.ddim_step(x, eps, s, s_next)
            if normalize == "latent" and late:
                x_next[r:] = adain(x_next[r:], chain(i + 1))
            if r:
                x_next[:r] = chain(i + 1)
            if keep is not None:  # inpainting: outside the mask every row is the chain's latent
                x_next = torch.where(keep.to(x.device), chain(i + 1), x_next)
            if preview_cb is not None:
                preview_cb(i, denoised[r:], x[r:], steps)
            else:
                pbar.update(1)
            x = x_next
        return x

    latent_image = torch.zeros((r + inits.shape[0],) + tuple(inversion.latent_shape[1:]))
    try:
        return compat.sample_with_function(patched, rival_loop, sigmas, positive, negative, cfg, latent_image,
                                           seed=seed)
    except compat.out_of_memory_errors() as e:
        raise InversionChainError(f"out of memory with batch_size {inits.shape[0]}{oom_hint}; lower "
                                  f"batch_size or the image size. ({e})") from e


def reference_rows(previous, ref_y=None):
    """UNet wrapper (batch layout): the reference row (row 0 of each CFG chunk) is conditioned as the photo's
    inversion, whatever else the generation's CONDITIONING carries, so its keys/values and eps equal the cached
    reference's. A ControlNet / T2I-Adapter on the conditioning acts on the variations only (zero residuals for the
    reference row, as the official ControlNet pipeline passes zeros for it); on models with an ADM input the
    conditional reference row reads the inversion's vector ``ref_y`` (unCLIP image embedding, SDXL sizes)."""
    def wrapper(apply_model, args):
        c = args["c"]
        branches = list(args.get("cond_or_uncond") or [0])
        chunks = len(branches)
        rows = args["input"].shape[0] // chunks
        y = c.get("y")
        if ref_y is not None and torch.is_tensor(y) and y.shape[0] == chunks * rows:
            y = y.clone()
            for j, branch in enumerate(branches):
                if branch == 0:   # COND; the uncond rows all read the negative's vector already
                    y[j * rows] = ref_y[0].to(y)
            c = {**c, "y": y}
        control = c.get("control")
        if control:
            stripped = {}
            for key, residuals in control.items():
                out = []
                for r in residuals:
                    if torch.is_tensor(r) and r.shape[0] == chunks * rows:
                        r = r.clone()
                        r.view(chunks, rows, *r.shape[1:])[:, 0] = 0
                    out.append(r)
                stripped[key] = out
            c = {**c, "control": stripped}
        if c is not args["c"]:
            args = {**args, "c": c}
        return patching.call_unet(apply_model, args, previous)
    return wrapper


def repeat_pooled(meta: dict, n: int) -> dict:
    meta = dict(meta)
    if meta.get("pooled_output") is not None:
        meta["pooled_output"] = torch.cat([meta["pooled_output"][:1]] * n)
    return meta
