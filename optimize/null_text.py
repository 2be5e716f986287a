"""Null-text inversion (Mokady et al.) and negative-prompt inversion (Miyake et al.) on ComfyUI models.

Null-text inversion: given a real image's DDIM inversion chain made at cfg 1 (the pivots ``chain[i]``), find per
sampling step ``i`` an unconditional embedding ``u_i`` such that one guided DDIM step from the current latent lands
on the next pivot:  ``x_{i+1} = x_i + (s_{i+1} - s_i) * eps_cfg(x_i, s_i; c, u_i)``.  As in the paper's code:
``u`` starts from the negative prompt's embedding and carries over from step to step; Adam with
``lr = 1e-2 * (1 - i / 100)`` (floored at 1% beyond 99 steps; the base rate is an input: a model whose
unconditional branch reacts weakly to its context, like the pack's random-weight test model, needs a larger one);
at most ``inner_steps`` iterations per step, stopping after an iteration whose loss is below ``1e-5 + i * 2e-5``;
the loss is the MSE of the DDPM latent ``z = x / sqrt(1 + s^2)`` after the step (the paper's latent, so the
thresholds mean what they meant there); the latent then advances with the final ``u_i`` at full guidance, so later
steps correct the drift of earlier ones.

Memory: the activations of one batch-1 forward kept for backward (cloned once more by the saved-tensor hook); the
weights are not duplicated (see ``trainable_weights``).

Autograd inside ComfyUI: see ``training.py``. The model is called as the sampler calls it,
``model.model.apply_model(x, sigma, c_crossattn=..., <other model conds>, transformer_options=...)`` on the loaded
model, so ComfyUI's own latent scaling, dtype casting and attention patches apply.

Rectified-flow families with true CFG (Chroma, Qwen-Image, SD3.5; ``model_info.uncond_branch_problem``): the same
step is ComfyUI's Euler / ddim step on CONST sampling (``samplers/ddim.py``), and the loss compares the flow state
``x`` itself (the model's input) instead of ``z``. What is optimised is the cross-attention / joint-attention text
context ``c_crossattn`` (Chroma: T5 tokens; Qwen-Image: Qwen2.5-VL hidden states; SD3.5: CLIP-L/G + T5 concat);
every other model cond (SD3.5's pooled vector ``y``, attention masks) stays the negative prompt's.
``as_conditioning`` puts the embeddings back as a CONDITIONING of per-step timestep ranges for stock samplers.

Negative-prompt inversion: no optimisation; the source prompt's conditioning is the unconditional one, so the
source row's guided prediction equals its conditional one and reconstruction is as good as the cfg-1 inversion.
"""
from __future__ import annotations

import math
import time
from typing import List

import torch
import torch.nn.functional as F

from .. import compat
from ..artifacts import Inversion, InversionChainError, NullText, inversion_fingerprint
from ..model_info import check_supported, require_single_cfg1_inversion, uncond_branch_problem
from ..samplers import ddim
from .training import (ChainStep, chain_error, forward_hooks, minimise, normal as _normal, text_conds,
                       trainable_weights, walk_chain)

METHODS = ("null-text", "negative-prompt")
LEARNING_RATE = 1e-2


def check_inputs(model, inversion: Inversion, cfg: float, inner_steps: int,
                 method: str = "null-text inversion") -> bool:
    """Returns whether the model is a rectified-flow one (a true-CFG family; Flux and others get an error)."""
    check_supported(model, allow_flow=True)
    problem = uncond_branch_problem(model, method)
    if problem:
        raise InversionChainError(problem)
    flow = compat.is_flow_family(compat.model_sampling(model))
    require_single_cfg1_inversion(model, inversion, method, allow_flow=flow)
    if not math.isfinite(cfg) or cfg < 1.0:
        raise InversionChainError(f"cfg must be 1 or more (the guidance you will sample with), got {cfg}.")
    if inner_steps < 1:
        raise InversionChainError(f"inner_steps must be at least 1, got {inner_steps}.")
    return flow


def negative_prompt_inversion(model, inversion: Inversion, positive, cfg: float) -> NullText:
    """Zero-cost: the source prompt is the unconditional prompt at every step."""
    check_inputs(model, inversion, cfg, 1, "negative-prompt inversion")
    return NullText(method="negative-prompt", embeddings=None, positive=positive, negative=positive, cfg=float(cfg),
                    sigmas=inversion.sigmas.clone(), scheduler=inversion.scheduler,
                    inversion_fingerprint=inversion_fingerprint(inversion))


def optimize(model, inversion: Inversion, positive, negative, cfg: float = 7.5, inner_steps: int = 10,
             learning_rate: float = LEARNING_RATE) -> NullText:
    flow = check_inputs(model, inversion, cfg, inner_steps)
    if not math.isfinite(learning_rate) or learning_rate <= 0:
        raise InversionChainError(f"learning_rate must be a positive number, got {learning_rate}.")
    if negative is None:
        raise InversionChainError("null-text inversion needs `negative` (the unconditional prompt to start "
                                  "from, usually empty).")
    started = time.perf_counter()
    conds_c, conds_u = text_conds(model, positive, negative, inversion.latent_shape, "null-text inversion")
    problem = _context_problem(negative, conds_u["c_crossattn"])
    if problem:
        raise InversionChainError(problem)
    # the loss compares the state after the step: the DDPM latent z for eps / v models (the paper's), the flow
    # state x itself on rectified-flow models (what their model reads)
    loss_space = ddim.flow_state if flow else ddim.z_from_x
    compat.load_models([model])
    device = model.load_device
    pbar = compat.progress_bar(inversion.steps * inner_steps)
    embeddings: List[torch.Tensor] = []
    losses, iters = [0.0] * inversion.steps, [0] * inversion.steps
    call = compat.unet_caller(model)

    def guided_step(x, s, s_next, d_cond, d_uncond):
        return ddim.guided_ddim_step(x, s, s_next, d_cond, d_uncond, cfg)

    with torch.inference_mode(False), trainable_weights(compat.diffusion_model_of(model)):
        conds_c = {k: _normal(v) for k, v in conds_c.items()}
        conds_u = {k: _normal(v) for k, v in conds_u.items()}
        carried = [conds_u.pop("c_crossattn").to(device).float()]   # u carries over from step to step

        def step(c: ChainStep) -> torch.Tensor:
            with torch.no_grad():
                d_cond = call(c.x, c.sigma, conds_c, 0)
            uncond = carried[0].detach().clone().requires_grad_(True)
            optimizer = torch.optim.Adam([uncond], lr=learning_rate * c.lr_scale)

            def loss_fn():
                with torch.enable_grad(), forward_hooks(), compat.differentiable_paths():
                    d_uncond = call(c.x, c.sigma, conds_u, 1, c_crossattn=uncond)
                    x_next = guided_step(c.x, c.s, c.s_next, d_cond, d_uncond)
                    return F.mse_loss(loss_space(x_next, c.s_next), c.target)

            step_losses, _ = minimise(loss_fn, optimizer, inner_steps, c.threshold, pbar, update_below_threshold=True)
            losses[c.i], iters[c.i] = step_losses[-1], len(step_losses)
            carried[0] = uncond = uncond.detach()
            embeddings.append(uncond.float().cpu().clone())
            with torch.no_grad():
                return guided_step(c.x, c.s, c.s_next, d_cond, call(c.x, c.sigma, conds_u, 1, c_crossattn=uncond))

        final_error = chain_error(model, walk_chain(inversion, device, step, loss_space), inversion, device)
    return NullText(method="null-text", embeddings=torch.stack(embeddings), positive=positive, negative=negative,
                    cfg=float(cfg), sigmas=inversion.sigmas.clone(), scheduler=inversion.scheduler,
                    inversion_fingerprint=inversion_fingerprint(inversion), losses=torch.tensor(losses),
                    inner_iters=torch.tensor(iters),
                    final_error=final_error, seconds=time.perf_counter() - started)


def _context_problem(negative, context: torch.Tensor):
    """The embedding optimised is the model's c_crossattn; ``as_conditioning`` writes it back as the CONDITIONING
    tensor, so the two must be the same tensor for this family (they are for the SD and true-CFG flow families).
    None, or why not (for the caller's error)."""
    if not negative or len(negative) != 1 or negative[0][0].shape[0] != 1:
        return (f"input `negative` must be one prompt (one CONDITIONING entry, batch 1), got {len(negative or [])} "
                f"entries.")
    tensor = negative[0][0]
    if tuple(tensor.shape) != tuple(context.shape):
        return (f"this model reads a text context of shape {tuple(context.shape)} from a `negative` CONDITIONING of "
                f"shape {tuple(tensor.shape)}; null-text inversion optimises the context as the CONDITIONING holds "
                f"it and does not apply here.")
    return None


def _percent_at(sampling, sigma: float) -> float:
    """The sampling percent whose sigma (``sampling.percent_to_sigma``, decreasing) is ``sigma``, by bisection."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if float(sampling.percent_to_sigma(mid)) > sigma:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def as_conditioning(model, null_text: NullText) -> list:
    """The NULL_TEXT as a negative CONDITIONING for stock samplers (CFGGuider, KSampler): negative-prompt inversion's
    is the source prompt; null-text inversion's has one entry per sampling step, the step's optimised context with
    the negative prompt's other entries (pooled output, ...), active only around that step's sigma: its
    ``start_percent`` / ``end_percent`` bounds sit halfway (in sigma) between neighbouring steps, so each of the
    inversion's sigmas falls inside exactly one entry's range whatever the float rounding of ComfyUI's
    percent-to-sigma conversion. Sample with the same MODEL (its sigma schedule) on the inversion's sigmas."""
    if null_text.method != "null-text":
        return [[t.clone(), dict(extra)] for t, extra in null_text.positive]
    sampling = compat.model_sampling(model)
    sigmas = [float(s) for s in null_text.sigmas]
    bounds = [0.0] + [_percent_at(sampling, 0.5 * (sigmas[i] + sigmas[i + 1])) for i in range(null_text.steps - 1)]
    bounds.append(1.0)
    base = null_text.negative[0][1]
    return [[null_text.embeddings[i].clone(), {**base, "start_percent": bounds[i], "end_percent": bounds[i + 1]}]
            for i in range(null_text.steps)]
