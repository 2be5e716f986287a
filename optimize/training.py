"""Running autograd on a ComfyUI model from inside a node (null-text inversion, StyleDiffusion's mappers).

Nodes run under ``torch.inference_mode()`` and a checkpoint's weights are inference tensors, which autograd
refuses to save for backward. Optimisation therefore runs under ``torch.inference_mode(False)`` +
``torch.enable_grad()``, with the UNet's weights swapped for normal copies (``trainable_weights``), normal input
tensors (``normal``) and every forward wrapped in ``saved_tensors_hooks(clone, identity)`` (``forward_hooks``)
because the 2024-03 transformer block adds its attention outputs in place (``x += n``).
"""
from __future__ import annotations

import contextlib

import torch

from ..artifacts import InversionChainError
from ..attention.core import patching


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


def text_conds(model, positive, negative, latent_shape, what: str, method: str):
    """The model-ready conds of both prompts (captured from ComfyUI's own sampling path); an error for models
    without a text context, which these optimisers act on."""
    latent = torch.zeros(latent_shape)
    conds_c = patching.capture_conds(model, positive, latent)
    conds_u = patching.capture_conds(model, negative, latent)
    if "c_crossattn" not in conds_c or "c_crossattn" not in conds_u:
        raise InversionChainError(f"{what}: this model takes no text context (c_crossattn); {method} does not apply.")
    return conds_c, conds_u
