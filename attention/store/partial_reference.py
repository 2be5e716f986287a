"""A reference that is cached for some steps and recomputed for the others (when the whole would not fit the
store's budget: SDXL at 1024 px on a 24 GB GPU). ``cached_steps`` decides how many steps fit."""
from __future__ import annotations

from typing import Dict, Iterable, Tuple, Union

import torch

from ..core import patching
from ..core.layers import AttentionLayer
from ...logs import log
from .reference import POLICIES, STORE, ReferenceKV, ReferenceStore, cached


class PartialReference:
    """A cache entry holding the first of the wanted steps (as many as fit the budget) and a recompute recorder for
    the other steps: a UNet wrapper runs the reference forward next to each of their sampling calls. Reads
    (``get``, ``eps``, ``cross_maps``) go to whichever holds the step."""

    mode = "partial"

    def __init__(self, cached: ReferenceKV, steps: Iterable[int], model, positive, negative=None):
        self.cached = cached
        self.steps = sorted(set(int(s) for s in steps))
        for name in ("inversion", "layers", "node", "branches", "cross_tokens", "cross_level", "storage_device"):
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


def steps_that_fit(entry: ReferenceKV, policy: str, model) -> int:
    """How many of ``entry``'s steps (each step holds the same bytes) fit the store's budget on the largest
    device the policy allows; ``len(entry.steps)`` when all do."""
    if policy == "recompute" or not entry.steps:
        return 0
    devices = {"cpu": [torch.device("cpu")]}.get(policy, [model.load_device, torch.device("cpu")])
    per_step = entry.estimate_bytes() / len(entry.steps)
    budget = max(STORE.budget(device) for device in devices)
    return min(len(entry.steps), int(budget // per_step))


def cached_steps(kind: str, model, reference: ReferenceKV, conditioning_fingerprint: str, policy: str, fill,
                 positive, negative=None, extra: tuple = ()) -> Tuple[Union[ReferenceKV, "PartialReference"], str]:
    """As ``reference.cached``, and when the whole entry would not fit the budget but some of its steps would, the
    first steps that fit are cached and the others recomputed next to their sampling calls: returns (the entry to
    use, "cache" | "partial" | "recompute"); "partial" comes with a PartialReference (``positive``/``negative``: the
    conditioning its recompute forwards use), "recompute" with ``reference`` itself."""
    key = ReferenceStore.key(kind, model, reference.inversion, conditioning_fingerprint, reference.layers,
                             reference.steps, tuple(extra) + (reference.keep,))
    if policy in POLICIES and policy != "recompute" and STORE.get(key) is None:
        fit = steps_that_fit(reference, policy, model)
        if 0 < fit < len(reference.steps):
            entry, mode = cached(kind, model, reference.with_steps(reference.steps[:fit]), conditioning_fingerprint,
                                 policy, fill, extra)
            if mode != "cache":
                return reference, "recompute"
            rest = len(reference.steps) - fit
            log.info("[Inversion Chain] %s: the cache budget holds %d of the %d steps' %s (%.1f MB); the other "
                     "%s recomputed next to each of %s sampling calls", reference.node, fit, len(reference.steps),
                     reference.noun, entry.nbytes() / 2 ** 20, "step is" if rest == 1 else f"{rest} are",
                     "its" if rest == 1 else "their")
            return PartialReference(entry, reference.steps, model, positive, negative), "partial"
    return cached(kind, model, reference, conditioning_fingerprint, policy, fill, extra)
