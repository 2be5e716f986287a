"""A reference that is cached for some steps and recomputed for the others (when the whole would not fit the
store's budget: SDXL at 1024 px on a 24 GB GPU). ``reference.cached_steps`` decides how many steps fit."""
from __future__ import annotations

from typing import Dict, Iterable

import torch

from . import patching
from .layers import AttentionLayer
from .reference import ReferenceKV


class PartialReference:
    """A cache entry holding the first of the wanted steps (as many as fit the budget) and a recompute recorder for
    the other steps: a UNet wrapper runs the reference forward next to each of their sampling calls. Reads
    (``get``, ``eps``, ``cross_maps``) go to whichever holds the step."""

    mode = "partial"

    def __init__(self, cached: ReferenceKV, steps: Iterable[int], model, positive, negative=None):
        self.cached = cached
        self.steps = sorted(set(int(s) for s in steps))
        for name in ("inversion", "layers", "what", "branches", "cross_tokens", "cross_level", "storage_device"):
            setattr(self, name, getattr(cached, name))
        self.recomputed = cached.with_steps([i for i in self.steps if i not in cached.steps])
        self.recomputed.storage_device = model.load_device
        if cached.recompute_conds is None:   # kept on the store entry (same key): later runs skip the capture
            latent = torch.zeros((1,) + tuple(self.inversion.latent_shape[1:]))
            cached.recompute_conds = (patching.capture_conds(model, positive, latent),
                                      patching.capture_conds(model, negative, latent) if cached.branches == 2
                                      else None)
        self.recomputed.conds, self.recomputed.conds_uncond = cached.recompute_conds

    @property
    def eps(self) -> Dict[int, torch.Tensor]:
        return {**self.cached.eps, **self.recomputed.eps}

    @property
    def cross_maps(self) -> Dict[int, torch.Tensor]:
        return {**self.cached.cross_maps, **self.recomputed.cross_maps}

    def nbytes(self) -> int:
        return self.cached.nbytes()

    def get(self, step: int, layer: AttentionLayer, device, dtype, branch: int = 0):
        holder = self.cached if step in self.cached.steps else self.recomputed
        return holder.get(step, layer, device, dtype, branch)

    def install(self, model):
        """Add the recompute wrapper to ``model`` (a clone about to sample)."""
        return patching.add_unet_wrapper(model, self.recomputed.recompute_wrapper)
