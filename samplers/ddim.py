"""Deterministic DDIM in ComfyUI's sigma space, and its exact inverse.

ComfyUI's sampler state for eps- and v-prediction models is ``x = x0 + sigma * eps`` (the latent divided by
``sqrt(alpha_bar)``). In that space the deterministic DDIM update from ``sigma`` to ``sigma_next`` is exactly an
Euler step ``x' = x + (sigma_next - sigma) * eps(x, sigma)``, which is what ComfyUI's ``ddim`` sampler runs.

Inversion walks the schedule upwards. The step that a forward DDIM step undoes exactly solves the implicit
equation ``x_hi = x_lo + (sigma_hi - sigma_lo) * eps(x_hi, sigma_hi)``; it is solved here by fixed-point
iteration. The "naive" inversion (diffusers' ``DDIMInverseScheduler``) is the first iterate from the guess that
keeps the model's input unchanged, ``z_hi = z_lo`` with ``z = x / sqrt(1 + sigma^2)``: the UNet sees the less noisy
latent at the higher timestep.

Rectified-flow models (ComfyUI's CONST sampling: Flux, Chroma, SD3, ...) have the state ``x = (1 - sigma) x0 +
sigma noise`` and ComfyUI's Euler/ddim step there is the same ``x + (sigma' - sigma) * (x - denoised) / sigma`` (the
model's velocity times the sigma step), so the same implicit step inverts it; only the naive guess differs (the
model input is ``x`` itself: ``keep_input_flow``).

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


def flow_state(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Rectified-flow models: the sampler state is what the model reads (the counterpart of ``z_from_x``)."""
    return x


def keep_input_vp(x_lo: torch.Tensor, sigma_lo: float, sigma_hi: float) -> torch.Tensor:
    """The naive guess for eps / v models: the x at ``sigma_hi`` whose model input ``z`` equals that at ``sigma_lo``."""
    return z_to_x(z_from_x(x_lo, sigma_lo), sigma_hi)


def keep_input_flow(x_lo: torch.Tensor, sigma_lo: float, sigma_hi: float) -> torch.Tensor:
    """The naive guess for rectified-flow models (CONST sampling: the state is the model input, ``x = (1 - sigma) x0
    + sigma noise``): the same x at the higher sigma."""
    return x_lo


NaiveGuess = Callable[[torch.Tensor, float, float], torch.Tensor]


@dataclass
class InversionStep:
    """Result of one inversion step from ``sigma_lo`` up to ``sigma_hi``."""

    x_hi: torch.Tensor
    residual: Optional[torch.Tensor]  # per-row bound on the round-trip error of this step; None for naive steps
    calls: int                        # noise-predictor evaluations spent


def row_max_abs(t: torch.Tensor) -> torch.Tensor:
    return t.detach().abs().flatten(1).amax(dim=1)


def _anderson(x_prev, g_prev, x, g):
    """One type-II Anderson (depth 1) step per row: the combination of the last two fixed-point images whose
    linearised residual is smallest. Falls back to the plain image ``g`` where the secant is degenerate."""
    f, f_prev = (g - x).flatten(1).double(), (g_prev - x_prev).flatten(1).double()
    df = f - f_prev
    denom = (df * df).sum(1)
    gamma = torch.where(denom > 0, (f * df).sum(1) / denom.clamp_min(1e-300), torch.zeros_like(denom))
    gamma = gamma.clamp(-4.0, 4.0).to(g.dtype).view(-1, *([1] * (g.ndim - 1)))
    return g - gamma * (g - g_prev)


def invert_step(eps_fn: EpsFn, x_lo: torch.Tensor, sigma_lo: float, sigma_hi: float, refine_iters: int,
                tolerance: float = 0.0, eps_guess: Optional[torch.Tensor] = None,
                naive_guess: NaiveGuess = keep_input_vp) -> InversionStep:
    """Solve ``x_hi = x_lo + (sigma_hi - sigma_lo) * eps(x_hi, sigma_hi)``: at most ``1 + refine_iters`` evaluations,
    fewer once the residual is at most ``tolerance``.

    The first iterate comes from ``eps_guess`` (a predicted noise at ``sigma_hi``, e.g. extrapolated from the
    previous steps: no evaluation) or else from ``naive_guess``, which keeps the model's input unchanged. Each
    evaluation ``g = x_lo + ds * eps(x)`` gives the exact round-trip error of ``x``, ``|g - x|`` (a forward DDIM step
    from ``x`` lands at ``x_lo + x - g``); that is the residual reported, and it bounds the returned ``g``'s error
    where the map contracts. From the second evaluation on, iterates are Anderson-accelerated (depth 1), which
    matters where the map contracts slowly (v-prediction at the top of the schedule). ``refine_iters = 0`` without
    a guess is the naive DDIM inversion step (residual None: not measurable without another evaluation).
    """
    ds = sigma_hi - sigma_lo
    if eps_guess is not None:
        x = x_lo + ds * eps_guess
    else:
        x = naive_guess(x_lo, sigma_lo, sigma_hi)
    g = x_lo + ds * eps_fn(x, sigma_hi)
    calls = 1
    residual = row_max_abs(g - x) if (eps_guess is not None or refine_iters > 0) else None
    if eps_guess is None and refine_iters == 0:
        return InversionStep(x_hi=g, residual=None, calls=1)
    x_prev = g_prev = None
    while calls < 1 + refine_iters and float(residual.max()) > tolerance:
        x_next = g if x_prev is None else _anderson(x_prev, g_prev, x, g)
        x_prev, g_prev = x, g
        x = x_next
        g = x_lo + ds * eps_fn(x, sigma_hi)
        calls += 1
        residual = row_max_abs(g - x)
    return InversionStep(x_hi=g, residual=residual, calls=calls)


GUESSES = ("extrapolate", "previous", "naive")


def invert_chain(eps_fn: EpsFn, x0: torch.Tensor, sigmas_ascending: List[float], refine_iters: int,
                 on_step: Optional[Callable[[int, torch.Tensor], None]] = None, tolerance: float = 0.0,
                 guess: str = "extrapolate", naive_guess: NaiveGuess = keep_input_vp,
                 keep: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
    """Invert along an ascending sigma schedule starting at ``sigmas_ascending[0]`` (usually 0).

    Returns ``(chain, residuals, calls)``: ``chain[k]`` is the latent at ``sigmas_ascending[k]``; ``calls`` the
    evaluations per step. ``guess`` picks each step's first iterate: ``extrapolate`` (the noise the last two steps
    solved for, extrapolated linearly in sigma), ``previous`` (the last step's noise) or ``naive``
    (``naive_guess``: ``keep_input_vp`` for eps / v models, ``keep_input_flow`` for rectified-flow models).
    ``on_step(k, x)`` runs after each step (progress, interrupt checks). ``keep(x)`` is what the chain stores of
    each latent as soon as it is made (e.g. a copy on the offload device); the steps themselves run on ``x``.
    """
    keep = keep or (lambda t: t)
    chain = [keep(x0)]
    residuals = []
    calls = []
    x = x0
    solved = []  # (sigma, eps) each step solved for: eps = (x_hi - x_lo) / ds
    for k in range(len(sigmas_ascending) - 1):
        s_lo, s_hi = float(sigmas_ascending[k]), float(sigmas_ascending[k + 1])
        eps_guess = None
        if guess != "naive" and refine_iters > 0 and solved:
            eps_guess = solved[-1][1]
            if guess == "extrapolate" and len(solved) > 1:
                (s1, e1), (s2, e2) = solved[-2], solved[-1]
                eps_guess = e2 + (e2 - e1) * ((s_hi - s2) / (s2 - s1))
        step = invert_step(eps_fn, x, s_lo, s_hi, refine_iters, tolerance, eps_guess, naive_guess)
        solved = (solved + [(s_hi, (step.x_hi - x) / (s_hi - s_lo))])[-2:]
        x = step.x_hi
        calls.append(step.calls)
        chain.append(keep(x))
        residuals.append(step.residual)
        if on_step is not None:
            on_step(k, x)
    return chain, residuals, calls
