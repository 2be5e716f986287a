"""Deterministic DDIM in ComfyUI's sigma space, and its exact inverse.

ComfyUI's sampler state for eps- and v-prediction models is ``x = x0 + sigma * eps`` (the latent divided by
``sqrt(alpha_bar)``). In that space the deterministic DDIM update from ``sigma`` to ``sigma_next`` is exactly an
Euler step ``x' = x + (sigma_next - sigma) * eps(x, sigma)``, which is what ComfyUI's ``ddim`` sampler runs.

Inversion walks the schedule upwards. The step that a forward DDIM step undoes exactly solves the implicit
equation ``x_hi = x_lo + (sigma_hi - sigma_lo) * eps(x_hi, sigma_hi)``; it is solved here by fixed-point
iteration. The "naive" inversion (diffusers' ``DDIMInverseScheduler``) is the first iterate from the guess that
keeps the model's input unchanged, ``z_hi = z_lo`` with ``z = x / sqrt(1 + sigma^2)``: the UNet sees the less noisy
latent at the higher timestep.

Everything here is pure tensor math: ``eps_fn(x, sigma)`` is whatever noise predictor the caller has.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

EpsFn = Callable[[torch.Tensor, float], torch.Tensor]


def eps_from_denoised(x: torch.Tensor, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
    """Noise prediction from ComfyUI's x0 prediction (valid for eps and v models alike)."""
    return (x - denoised) / sigma


def ddim_step(x: torch.Tensor, eps: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One deterministic DDIM step (either direction) with a given noise prediction."""
    return x + (sigma_next - sigma) * eps


def guided_ddim_step(x: torch.Tensor, sigma: float, sigma_next: float, d_cond: torch.Tensor, d_uncond: torch.Tensor,
                     cfg: float) -> torch.Tensor:
    """One DDIM step with classifier-free guidance from the two x0 predictions (what ComfyUI's CFG computes)."""
    denoised = d_uncond + cfg * (d_cond - d_uncond)
    return ddim_step(x, eps_from_denoised(x, denoised, sigma), sigma, sigma_next)


def z_from_x(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Sigma-space state -> the usual DDPM latent ``z = sqrt(alpha_bar) * x``."""
    return x / (1.0 + sigma * sigma) ** 0.5


def z_to_x(z: torch.Tensor, sigma: float) -> torch.Tensor:
    return z * (1.0 + sigma * sigma) ** 0.5


@dataclass
class InversionStep:
    """Result of one inversion step from ``sigma_lo`` up to ``sigma_hi``."""

    x_hi: torch.Tensor
    residual: Optional[torch.Tensor]  # per-row bound on the round-trip error of this step; None for naive steps
    calls: int                        # noise-predictor evaluations spent


def row_max_abs(t: torch.Tensor) -> torch.Tensor:
    return t.detach().abs().flatten(1).amax(dim=1)


def invert_step(eps_fn: EpsFn, x_lo: torch.Tensor, sigma_lo: float, sigma_hi: float,
                refine_iters: int) -> InversionStep:
    """Solve ``x_hi = x_lo + (sigma_hi - sigma_lo) * eps(x_hi, sigma_hi)`` with ``1 + refine_iters`` evaluations.

    ``refine_iters = 0`` is the naive DDIM inversion step. The residual reported after refinement is the size of
    the last fixed-point update, ``|x^(r) - x^(r-1)|``: that is the exact round-trip error of the previous iterate,
    and bounds the returned one's (the map contracts when the step is small), at no extra evaluation. A naive step
    has no such measure without an extra UNet call, so its residual is None.
    """
    ds = sigma_hi - sigma_lo
    guess = z_to_x(z_from_x(x_lo, sigma_lo), sigma_hi)
    x_hi = x_lo + ds * eps_fn(guess, sigma_hi)
    residual = None
    for _ in range(refine_iters):
        x_next = x_lo + ds * eps_fn(x_hi, sigma_hi)
        residual = row_max_abs(x_next - x_hi)
        x_hi = x_next
    return InversionStep(x_hi=x_hi, residual=residual, calls=1 + refine_iters)


def invert_chain(eps_fn: EpsFn, x0: torch.Tensor, sigmas_ascending: List[float], refine_iters: int,
                 on_step: Optional[Callable[[int, torch.Tensor], None]] = None):
    """Invert along an ascending sigma schedule starting at ``sigmas_ascending[0]`` (usually 0).

    Returns ``(chain, residuals, calls)``: ``chain[k]`` is the latent at ``sigmas_ascending[k]``.
    ``on_step(k, x)`` runs after each step (progress, interrupt checks).
    """
    chain = [x0]
    residuals = []
    calls = 0
    x = x0
    for k in range(len(sigmas_ascending) - 1):
        step = invert_step(eps_fn, x, float(sigmas_ascending[k]), float(sigmas_ascending[k + 1]), refine_iters)
        x = step.x_hi
        calls += step.calls
        chain.append(x)
        residuals.append(step.residual)
        if on_step is not None:
            on_step(k, x)
    return chain, residuals, calls
