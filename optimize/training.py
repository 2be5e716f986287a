"""Running autograd on a ComfyUI model from inside a node (null-text inversion, StyleDiffusion's mappers).

Nodes run under ``torch.inference_mode()`` and a checkpoint's weights are inference tensors, which autograd
refuses to save for backward. Optimisation therefore runs under ``torch.inference_mode(False)`` +
``torch.enable_grad()``, with the UNet's weights swapped for normal copies (``trainable_weights``), normal input
tensors (``normal``) and every forward wrapped in ``saved_tensors_hooks(clone, identity)`` (``forward_hooks``)
because the 2024-03 transformer block adds its attention outputs in place (``x += n``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from .. import compat
from ..artifacts import InversionChainError
from ..attention.core import patching
from ..samplers import ddim


@contextlib.contextmanager
def trainable_weights(module: torch.nn.Module):
    """Temporarily make ``module``'s inference-tensor parameters normal tensors (autograd can save those).

    Parameter by parameter, the inference tensor is replaced by a normal copy and released, and afterwards the copy
    by a fresh inference tensor the same way, so memory stays at about one copy of the weights (plus the largest
    module's) instead of two. Values are bit-identical; only the tensor objects change."""

    def swap(pairs, inference: bool):
        done = {}
        with torch.inference_mode(inference):
            for sub, name in pairs:
                p = sub._parameters[name]
                new = done.get(id(p))
                if new is None:   # tied parameters stay tied
                    new = done[id(p)] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
                sub._parameters[name] = new
                del p

    pairs = [(sub, name) for sub in module.modules() for name, p in sub._parameters.items()
             if p is not None and p.is_inference()]
    try:
        swap(pairs, inference=False)
        yield
    finally:
        swap(pairs, inference=True)


def normal(t):
    """A non-inference copy of a tensor (call under inference_mode(False))."""
    return t.detach().clone() if torch.is_tensor(t) else t


def forward_hooks():
    """Saved-tensor hooks that make ComfyUI's in-place residual adds safe for backward."""
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t)


def text_conds(model, positive, negative, latent_shape, method: str):
    """The model-ready conds of both prompts (captured from ComfyUI's own sampling path); an error for models
    without a text context, which these optimisers act on."""
    latent = torch.zeros(latent_shape)
    conds_c = patching.capture_conds(model, positive, latent)
    conds_u = patching.capture_conds(model, negative, latent)
    if "c_crossattn" not in conds_c or "c_crossattn" not in conds_u:
        raise InversionChainError(f"this model takes no text context (c_crossattn); {method} does not apply.")
    return conds_c, conds_u


# -- the per-step skeleton shared by null-text inversion and StyleDiffusion ---------------------------------------
EARLY_STOP_EPS = 1e-5     # a step's iterations stop once the loss is below EARLY_STOP_EPS + i * EARLY_STOP_SLOPE
EARLY_STOP_SLOPE = 2e-5   # (the null-text paper's code; StyleDiffusion's code uses the same)


@dataclass
class ChainStep:
    """One sampling step of the walk down an inversion chain: step ``i`` from sigma ``s`` to ``s_next``, the
    current latent ``x`` (float32, sampler space), ``sigma`` as the model takes it, ``target`` (the next chain
    latent as the DDPM latent ``z``, which the losses compare against), the early-stop ``threshold`` and the
    learning-rate decay ``lr_scale = max(0.01, 1 - i / 100)``."""
    i: int
    x: torch.Tensor
    s: float
    s_next: float
    sigma: torch.Tensor
    target: torch.Tensor
    threshold: float
    lr_scale: float


def walk_chain(inversion, device, step: Callable[[ChainStep], torch.Tensor],
               loss_space: Callable[[torch.Tensor, float], torch.Tensor] = ddim.z_from_x) -> torch.Tensor:
    """From the chain's first latent down every sampling step: ``step(c)`` optimises its per-step variable against
    the next chain latent and returns the latent advanced with the result, from which the next step starts (so
    later steps correct earlier drift). ``loss_space(x, sigma)`` makes the target (the DDPM latent by default).
    Returns the final latent."""
    sigmas = inversion.sigmas
    x = inversion.latent_at(0, device, torch.float32).clone()
    for i in range(inversion.steps):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        target = loss_space(inversion.latent_at(i + 1, device, torch.float32).clone(), s_next)
        x = step(ChainStep(i, x, s, s_next, torch.full((1,), s, device=device), target,
                           EARLY_STOP_EPS + i * EARLY_STOP_SLOPE, max(0.01, 1.0 - i / 100.0)))
    return x


def minimise(loss_fn: Callable[[], torch.Tensor], optimizer, iterations: int, threshold: float, pbar,
             update_below_threshold: bool, on_loss: Optional[Callable[[float], None]] = None):
    """At most ``iterations`` optimiser steps on ``loss_fn()`` (interruptible, one progress tick each, the ticks
    of iterations not run added at the end), stopping once a loss is below ``threshold``: after that iteration's
    update (``update_below_threshold``, null-text's code) or before it (StyleDiffusion: those weights are kept).
    ``on_loss(value)`` sees every loss measured. Returns (the losses, whether the last iteration updated)."""
    losses: List[float] = []
    updated = False
    for _ in range(iterations):
        compat.check_interrupt()
        loss = loss_fn()
        pbar.update(1)
        losses.append(float(loss.detach()))
        if on_loss is not None:
            on_loss(losses[-1])
        below = losses[-1] < threshold
        if below and not update_below_threshold:
            updated = False
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        updated = True
        if below:
            break
    pbar.update(iterations - len(losses))
    return losses, updated


def chain_error(model, x: torch.Tensor, inversion, device) -> float:
    """Max abs difference, in LATENT space, between the walk's final latent and the chain's clean latent."""
    source = inversion.latent_at(inversion.steps, device, torch.float32)
    return float((compat.latent_out(model, x.detach().clone()) - compat.latent_out(model, source.clone())).abs().max())
