"""DDIM Invert's assembly (``invert_image``: the chain, and its first latent in ComfyUI's LATENT convention),
Inverted Noise's (``inverted_noise``), and the small utilities beside them (``latent_difference``,
``free_caches``)."""
from __future__ import annotations

import math

import torch

from .. import compat
from ..artifacts import InversionChainError
from ..logs import log
from ..model_info import check_supported, model_key
from ..samplers import inversion as inversion_lib


def invert_image(model, samples: torch.Tensor, positive, negative, inversion_cfg: float, steps: int, scheduler: str,
                 refine_iters: int, tolerance: float, end_percent: float):
    """(the inverted latent as a LATENT's samples, the forward sigmas, the Inversion)."""
    inv = inversion_lib.invert(model, samples, positive, negative, inversion_cfg, steps, scheduler, refine_iters,
                               tolerance=tolerance, end_percent=end_percent)
    log.info("[Inversion Chain] %s", inv.summary())
    # ComfyUI's mid-schedule LATENT convention (flow models: x / (1 - sigma)), so stock samplers start at the
    # chain's first latent; flow models at sigma 1 have none: there the raw x_T (sample with Inverted Noise)
    noise = compat.latent_for_start(model, inv.chain[0].clone(), float(inv.sigmas[0]))
    if noise is None:
        noise = inversion_lib.chain_latent_out(model, inv, 0)
    return noise.cpu(), inv.sigmas.clone(), inv


def inverted_noise(model, inversion):
    """(a NOISE that starts exactly at the inverted latent, a one-line report of what it starts from)."""
    check_supported(model, allow_flow=True)
    inversion.check_matches(model_key(model))
    report = (f"starts {inversion.steps} steps from sigma {float(inversion.sigmas[0]):.4g} at the inverted latent "
              f"(batch {inversion.latent_shape[0]}, latent {tuple(inversion.latent_shape[1:])})")
    return inversion_lib.InvertedNoise(model, inversion), report


def _json_number(x: float):
    return x if math.isfinite(x) else None


def latent_difference(a: torch.Tensor, b: torch.Tensor):
    """(max |a-b|, mean |a-b|, a report, the two numbers as JSON values: a non-finite one as None)."""
    a, b = a.float().cpu(), b.float().cpu()
    if a.shape != b.shape:
        raise InversionChainError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}.")
    if a.numel() == 0:
        raise InversionChainError(f"the latents are empty (shape {tuple(a.shape)}).")
    diff = (a - b).abs()
    max_abs, mean_abs = float(diff.max()), float(diff.mean())
    report = f"max |a-b| = {max_abs:.3e}, mean |a-b| = {mean_abs:.3e} (latent std {float(b.std()):.3f})"
    bad = int((~torch.isfinite(a)).sum() + (~torch.isfinite(b)).sum())
    if bad:
        report += f"; the latents hold {bad} NaN/inf value(s)"
    # the ui dict goes to the browser as JSON, where NaN and inf are not valid: a non-finite number is sent as null
    return max_abs, mean_abs, report, (_json_number(max_abs), _json_number(mean_abs))


def free_caches(disk_cache: bool = False) -> str:
    """Empty the reference store and StyleDiffusion's memory cache (and with ``disk_cache`` its files); a report."""
    from ..attention.store.reference import STORE
    from ..optimize import style_diffusion
    held, entries = STORE.held_bytes(), len(STORE.entries)
    styles = len(style_diffusion._memory)
    STORE.clear()
    style_diffusion.clear_memory_cache()
    files = style_diffusion.clear_disk_cache() if disk_cache else 0
    compat.empty_device_cache()
    report = (f"freed the reference store ({entries} entries, {held / 2 ** 20:.1f} MB) and {styles} cached "
              f"STYLE(s) in memory" + (f"; deleted {files} StyleDiffusion cache file(s)" if disk_cache else ""))
    log.info("[Inversion Chain] %s", report)
    return report
