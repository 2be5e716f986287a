"""Mutual self-attention (MasaCtrl): generated rows attend to a real image's keys/values from its inversion chain."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..artifacts import InversionChainError
from .controller import CallContext, Editor, apply_probs, attention_probs
from .layers import AttentionLayer
from .reference import ReferenceKV
from .schedule import Schedule

MODES = ("mutual", "union", "masked")


class KVInjectEditor(Editor):
    """From ``start_percent`` of the steps on (MasaCtrl's START_STEP 4 of 50 = 0.08), in the selected self-attention
    layers, every row's queries attend to the reference K/V (``mutual``), to reference and own K/V concatenated
    (``union``), or (``masked``) to the reference K/V of the same region: foreground queries to foreground keys,
    background to background, with the foreground given by the reference's cross-attention maps of chosen words
    (min-max normalised, > threshold)."""

    order = 10
    kinds = ("self",)

    def __init__(self, reference: ReferenceKV, layers: Sequence[AttentionLayer], start_percent: float, mode: str,
                 mask_threshold: float = 0.1, what: str = "KV injection"):
        self.reference = reference
        self._layers = list(layers)
        self.layer_ids = {l.index for l in layers}
        self.start_percent = float(start_percent)
        self.sched = Schedule(reference.inversion.sigmas, reference.inversion.scheduler, what)
        self.what = what
        self.mode = mode
        self.mask_threshold = mask_threshold
        self.kinds = ("self", "cross") if mode == "masked" else ("self",)

    def layers(self, all_layers):
        if self.mode != "masked":
            return self._layers
        # masked mode also records the reference's cross-attention maps at the mask resolution
        ids = self.layer_ids | {l.index for l in all_layers if l.level == self.reference.cross_level}
        return [l for l in all_layers if l.index in ids]

    def schedule(self):
        return self.sched.sigmas

    def active(self, ctx: CallContext) -> bool:
        if ctx.kind != "self" or ctx.layer.index not in self.layer_ids:
            return False
        return self.sched.fraction(self.sched.step(ctx.step)) >= self.start_percent

    def edit_qkv(self, q, k, v, ctx):
        step = self.sched.step(ctx.step)
        expected = ctx.layer.grid(*self.reference.inversion.latent_shape[-2:])
        if tuple(ctx.grid) != tuple(expected):
            h, w = self.reference.inversion.latent_shape[-2:]
            shape = ctx.extra_options.get("original_shape")
            raise InversionChainError(
                f"{self.what}: the latent being sampled is {tuple(shape[-2:]) if shape else ctx.grid} (HxW) but the "
                f"inversion was made at {(h, w)}. Sample at the inverted image's size.")
        k_ref, v_ref = self.reference.get(step, ctx.layer, k.device, k.dtype)
        rows = k.shape[0]
        k_ref, v_ref = k_ref.expand(rows, -1, -1), v_ref.expand(rows, -1, -1)
        if self.mode == "union":
            return q, torch.cat([k_ref, k], dim=1), torch.cat([v_ref, v], dim=1)
        if self.mode == "masked":
            ctx.scratch["kv_mask"] = self.foreground(step, ctx.grid)
        return q, k_ref.contiguous(), v_ref.contiguous()

    def foreground(self, step: int, grid) -> torch.Tensor:
        maps = self.reference.cross_maps.get(step)
        if maps is None:
            raise RuntimeError(f"{self.what} (masked): no reference cross-attention maps for step {step}")
        m = maps.mean(0, keepdim=True)[None]                                     # (1, 1, h, w)
        m = (m - m.amin()) / (m.amax() - m.amin()).clamp_min(1e-8)
        m = F.interpolate(m, size=grid, mode="nearest")[0, 0]
        return (m > self.mask_threshold).flatten()

    def attend(self, q, k, v, ctx):
        if self.mode != "masked":
            return None
        fg = ctx.scratch["kv_mask"].to(q.device)
        same_region = fg[:, None] == fg[None, :]                                # queries x reference keys
        bias = torch.zeros(same_region.shape, device=q.device, dtype=torch.float32)
        bias.masked_fill_(~same_region, float("-inf"))
        ctx.scratch["attention_bias"] = bias  # observers (attention capture) see the masked attention
        return apply_probs(attention_probs(q, k, ctx.heads, bias), v, ctx.heads)
