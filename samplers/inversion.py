"""DDIM inversion of a latent through ComfyUI's own sampling path, keeping the whole chain."""
from __future__ import annotations

import math

import torch

from .. import compat
from ..artifacts import Inversion, InversionChainError, named_error, node_name, user_text
from ..attention.core.schedule import steps_within
from ..model_info import check_supported, model_key
from . import ddim

# The default per-step tolerance (sampling space, max abs) and iteration cap: the round trips they give on each
# family are measured in docs/nodes.md (DDIM Invert); a looser tolerance breaks SD2-v. The cap
# binds only where the map contracts slowly (v-prediction, few steps).
DEFAULT_TOLERANCE = 3e-4
DEFAULT_MAX_ITERS = 6


def timesteps_for(model_patcher, sigmas: torch.Tensor) -> torch.Tensor:
    sampling = compat.model_sampling(model_patcher)
    ts = torch.zeros_like(sigmas)
    nz = sigmas > 0
    if nz.any():
        device = sampling.sigmas.device if hasattr(sampling, "sigmas") else "cpu"
        ts[nz] = sampling.timestep(sigmas[nz].to(device)).float().cpu()
    return ts


def check_latent(samples: torch.Tensor):
    image_latent = isinstance(samples, torch.Tensor) and (samples.ndim == 4 or (samples.ndim == 5
                                                                                and samples.shape[2] == 1))
    if not image_latent:
        raise InversionChainError(f"expected a LATENT with samples of shape [batch, channels, height, width] "
                                  f"(or [batch, channels, 1, height, width], one frame of a video-VAE latent as "
                                  f"Qwen-Image's VAE Encode gives), got "
                                  f"{getattr(samples, 'shape', type(samples).__name__)}.")
    bad = ~torch.isfinite(samples)
    if bad.any():
        raise InversionChainError(
            f"the latent contains {int(bad.sum())} NaN/Inf values out of {samples.numel()}. "
            f"Encode the image again (VAEEncode) and check the upstream nodes; inversion needs finite latents.")


def invert(model_patcher, latent_samples: torch.Tensor, positive, negative, cfg: float, steps: int,
           scheduler: str = "ddim_uniform", refine_iters: int = DEFAULT_MAX_ITERS,
           tolerance: float = DEFAULT_TOLERANCE, guess: str = "extrapolate", end_percent: float = 1.0) -> Inversion:
    """Invert ``latent_samples`` (LATENT space) along ``scheduler``'s sigmas; returns the whole chain.
    ``end_percent`` < 1 stops early (partial inversion, DiffEdit's encoding ratio): inversion step j of ``steps``
    (j = 0 at the clean end) runs when j / steps < end_percent, so K of the steps run and the chain ends at the
    sampling schedule's sigma of step steps - K; the INVERSION then describes that K-step chain.
    ``refine_iters`` caps the fixed-point iterations of a step; a step stops as soon as its round-trip residual
    (in the model's sampling space) is at most ``tolerance``. The INVERSION reports each step's residual and
    evaluations (``unet_calls`` counts CFG-guided evaluations, one per step at least)."""
    check_supported(model_patcher, allow_flow=True)
    flow = compat.is_flow_family(compat.model_sampling(model_patcher))
    check_latent(latent_samples)
    if steps < 1:
        raise InversionChainError(f"steps must be at least 1, got {steps}.")
    if refine_iters < 0:
        raise InversionChainError(f"refine_iters must be 0 or more, got {refine_iters}.")
    if not math.isfinite(tolerance) or tolerance < 0:
        raise InversionChainError(f"tolerance must be 0 or a positive number, got {tolerance}.")
    if guess not in ddim.GUESSES:
        raise InversionChainError(f"unknown first guess '{user_text(guess)}'; use one of "
                                  f"{', '.join(ddim.GUESSES)}.")
    if not math.isfinite(cfg) or cfg <= 0:
        raise InversionChainError(f"inversion_cfg must be a positive number, got {cfg}.")
    if cfg != 1.0 and negative is None:
        raise InversionChainError(f"inversion_cfg {cfg} != 1 needs the optional `negative` conditioning "
                                  f"(or set inversion_cfg to 1.0).")
    if not math.isfinite(end_percent) or not 0.0 <= end_percent <= 1.0:
        raise InversionChainError(f"end_percent is the fraction of the {steps} steps to invert, in (0, 1]; "
                                  f"got {end_percent}.")
    run = len(steps_within(steps, 0.0, end_percent))  # the vocabulary's rule, counted from the clean end
    if run < 1:
        raise InversionChainError(f"end_percent {end_percent} inverts none of the {steps} steps (step j runs "
                                  f"when j/{steps} < end_percent); use at least {1 / steps:.4g}, or more steps.")
    full = compat.calculate_sigmas(model_patcher, scheduler, steps)
    if float(full[-1]) != 0.0:
        raise InversionChainError(f"scheduler '{user_text(scheduler)}' does not end at sigma 0; pick one "
                                  f"that does.")
    sigmas = full[steps - run:].clone()  # the tail KSampler Advanced samples from start_at_step = steps - run
    ascending = sigmas.flip(0)
    offload = compat.offload_device(model_patcher)
    pbar = compat.progress_bar(run)
    state = {}

    def inversion_sampler(model_k, x, sigmas_up, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        ones = x.new_ones([x.shape[0]])
        last = {"x": x}

        def eps_fn(x_in, sigma):
            compat.check_interrupt()
            denoised = model_k(x_in, ones * sigma, **extra_args)
            return ddim.eps_from_denoised(x_in, denoised, sigma)

        def on_step(k, x_k):
            last["x"] = x_k
            pbar.update(1)
            if callback is not None:
                callback({"i": k, "x": x_k, "denoised": x_k, "sigma": sigmas_up[k + 1], "sigma_hat": sigmas_up[k + 1]})

        # each latent goes to the offload device as soon as it is made, into its slot of the chain (forward order):
        # the load device holds only the step in progress, never the whole chain
        stored = torch.empty((len(sigmas_up),) + tuple(x.shape), device=offload, dtype=torch.float32)
        slots = iter(range(len(sigmas_up) - 1, -1, -1))

        def keep(x_k):
            slot = stored[next(slots)]
            slot.copy_(x_k)
            return slot

        _, residuals, calls = ddim.invert_chain(eps_fn, x, sigmas_up.tolist(), refine_iters, on_step=on_step,
                                                tolerance=tolerance, guess=guess,
                                                naive_guess=ddim.keep_input_flow if flow else ddim.keep_input_vp,
                                                keep=keep)
        state["chain"] = stored
        nan = torch.full((x.shape[0],), float("nan"))
        state["residuals"] = torch.stack([nan if r is None else r.float().cpu() for r in reversed(residuals)])
        state["calls"] = torch.tensor(list(reversed(calls)), dtype=torch.int32)
        return last["x"]

    compat.sample_with_function(model_patcher, inversion_sampler, ascending, positive,
                                negative if negative is not None else positive, cfg, latent_samples)
    return Inversion(sigmas=sigmas, timesteps=timesteps_for(model_patcher, sigmas), chain=state["chain"],
                     residuals=state["residuals"], positive=positive, negative=negative, cfg=float(cfg),
                     scheduler=scheduler, refine_iters=int(refine_iters), latent_shape=tuple(latent_samples.shape),
                     model_key=model_key(model_patcher), unet_calls=int(state["calls"].sum()),
                     step_calls=state["calls"], tolerance=float(tolerance), full_steps=int(steps))


def chain_latent_out(model_patcher, inversion: Inversion, index: int) -> torch.Tensor:
    """The chain latent at ``index`` converted back to LATENT space (undoing the model's latent scaling)."""
    return compat.latent_out(model_patcher, inversion.chain[index].clone()).cpu()


class InvertedNoise(compat.PatchObject):
    """A NOISE for SamplerCustomAdvanced (``seed``, ``generate_noise(latent)``) that starts the sampler exactly at
    the inversion's first latent, whatever LATENT the sampler is given (compat.noise_for_start). Flow models need it:
    at sigma 1 their sampler scales the LATENT by 1 - sigma = 0, so SamplerCustom with add_noise off starts from
    zeros there; on eps / v models it is equivalent to SamplerCustom with add_noise off. A LATENT whose batch is k
    times the inversion's starts every block of its rows at the inversion's latents (tiled, as ComfyUI repeats a
    conditioning to the batch): P2Plus Controller's 2-row LATENT (row 0 source, row 1 edit) from a 1-image
    inversion."""

    def __init__(self, model_patcher, inversion: Inversion):
        self.model, self.inversion, self.node, self.seed = model_patcher, inversion, node_name(), 0

    def generate_noise(self, input_latent):
        samples = input_latent["samples"]
        inv = self.inversion
        shape, made = tuple(samples.shape), tuple(inv.latent_shape)
        if shape[1:] != made[1:] or shape[0] % made[0]:
            raise named_error(f"{self.node}: SamplerCustomAdvanced's latent_image is {shape} but the inversion was "
                              f"made for {made}. Give it a latent of that size (the inverted image's latent, or an "
                              f"empty latent) or one whose batch is a multiple of {made[0]} with the same "
                              f"channels and size (e.g. P2Plus Controller's LATENT: each block of {made[0]} rows "
                              f"starts at the inversion's latents).")
        start = inv.chain[0]
        if shape[0] != made[0]:
            start = start.repeat(shape[0] // made[0], *([1] * (start.ndim - 1)))
        noise = compat.noise_for_start(self.model, start, inv.sigmas, samples.float().cpu())
        return noise.to(samples.device, samples.dtype)
