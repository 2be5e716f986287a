"""Mutual self-attention (MasaCtrl): generated rows attend to a real image's keys/values from its inversion chain.

As MasaCtrl's editors, each CFG half of the target attends to the source's K/V of the same half: the conditional
half to the source run with the source prompt, the unconditional half to the source run with the negative prompt
the sampler uses (the ReferenceKV then holds two branches). ``masked`` is MasaCtrl's mask-auto: the source's
foreground comes from the source's cross-attention of its words, the target's from the target's own
cross-attention of its words in the same UNet call (the maps of the mask resolution's layers that ran so far in
this step, as MasaCtrl's list cleared after every step), and target foreground queries attend only to source
foreground keys, background to background.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from ...artifacts import named_error, node_name
from ...logs import log
from ..core import patching
from ..core.controller import CallContext, Editor, explicit_attention
from ..core.layers import AttentionLayer
from ..store.reference import ReferenceKV
from ..core.schedule import Schedule

MODES = ("mutual", "union", "masked")


def binary_mask(maps: torch.Tensor, grid, threshold: float) -> torch.Tensor:
    """MasaCtrl's mask from word maps (rows, h, w): min-max normalised per row, resized (nearest) to ``grid``,
    >= threshold. Returns (rows, gh * gw) bool."""
    m = maps.float()
    lo = m.amin(dim=(1, 2), keepdim=True)
    hi = m.amax(dim=(1, 2), keepdim=True)
    m = (m - lo) / (hi - lo).clamp_min(1e-8)
    m = F.interpolate(m[:, None], size=tuple(grid), mode="nearest")[:, 0]
    return (m >= threshold).flatten(1)


class TargetMaps:
    """The target's own cross-attention of its words, for the current step: a running mean over the layers at
    the mask resolution, of the conditional half's rows (MasaCtrl reads its conditional target row)."""

    def __init__(self):
        self.step: Optional[int] = None
        self.sum: Optional[torch.Tensor] = None  # (rows, h, w)
        self.count = 0

    def reset(self):
        self.step, self.sum, self.count = None, None, 0

    def add(self, step: int, maps: torch.Tensor):
        if step != self.step or self.sum is None or self.sum.shape != maps.shape:
            self.step, self.sum, self.count = step, torch.zeros_like(maps), 0
        self.sum += maps
        self.count += 1

    def current(self, step: int) -> Optional[torch.Tensor]:
        return self.sum / self.count if self.step == step and self.count else None


class KVInjectEditor(Editor):
    """From ``start_percent`` of the steps on (MasaCtrl's START_STEP 4 of 50 = 0.08), in the selected self-attention
    layers, each CFG half's queries attend to the source's K/V of its own half (``mutual``), to those and their own
    K/V concatenated (``union``), or (``masked``) within their region: target foreground queries to source
    foreground keys, background to background."""

    order = 10
    kinds = ("self",)

    def __init__(self, reference: ReferenceKV, layers: Sequence[AttentionLayer], start_percent: float, mode: str,
                 mask_threshold: float = 0.1, target_tokens: Sequence[int] = ()):
        self.reference = reference
        self._layers = list(layers)
        self.layer_ids = {l.index for l in layers}
        self.start_percent = float(start_percent)
        self.sched = Schedule(reference.inversion.sigmas, reference.inversion.scheduler)
        self.node = node_name()
        self.mode = mode
        self.mask_threshold = float(mask_threshold)
        self.target_tokens = list(target_tokens)
        self.target_maps = TargetMaps()
        self.kinds = ("self", "cross") if mode == "masked" else ("self",)

    def layers(self, all_layers):
        if self.mode != "masked":
            return self._layers
        # masked mode also records the reference's cross-attention maps at the mask resolution
        ids = self.layer_ids | {l.index for l in all_layers if l.level == self.reference.cross_level}
        return [l for l in all_layers if l.index in ids]

    def schedule(self):
        return self.sched.sigmas

    def begin_run(self):
        self.target_maps.reset()

    def acting(self, ctx: CallContext) -> bool:
        return self.sched.fraction(self.sched.step(ctx.step)) >= self.start_percent

    def active(self, ctx: CallContext) -> bool:
        if ctx.kind != "self" or ctx.layer.index not in self.layer_ids:
            return False
        return self.acting(ctx)

    def branch_kv(self, step: int, ctx: CallContext, k):
        """The source's K/V for every row: chunk j of the batch gets the branch ``cond_or_uncond[j]``."""
        if 1 in ctx.cond_or_uncond and self.reference.branches < 2:
            raise named_error(
                f"{self.node}: the sampler runs classifier-free guidance (an unconditional half) but `negative` is "
                f"not connected. As MasaCtrl, the unconditional half attends to the source image run with the "
                f"sampler's negative prompt: connect the same negative conditioning the sampler gets (or sample "
                f"at cfg 1).")
        rows = ctx.rows_per_chunk
        pairs = [self.reference.get(step, ctx.layer, k.device, k.dtype, int(b)) for b in ctx.cond_or_uncond]
        k_ref = torch.cat([p[0].expand(rows, -1, -1) for p in pairs])
        v_ref = torch.cat([p[1].expand(rows, -1, -1) for p in pairs])
        return k_ref, v_ref

    def edit_qkv(self, q, k, v, ctx):
        step = self.sched.step(ctx.step)
        expected = ctx.layer.grid(*self.reference.inversion.latent_shape[-2:])
        if tuple(ctx.grid) != tuple(expected):
            h, w = self.reference.inversion.latent_shape[-2:]
            shape = ctx.extra_options.get("original_shape")
            raise named_error(
                f"{self.node}: the latent being sampled is {tuple(shape[-2:]) if shape else ctx.grid} (HxW) but the "
                f"inversion was made at {(h, w)}. Sample at the inverted image's size.")
        k_ref, v_ref = self.branch_kv(step, ctx, k)
        if self.mode == "union":
            return q, torch.cat([k_ref, k], dim=1), torch.cat([v_ref, v], dim=1)
        if self.mode == "masked":
            ctx.scratch["kv_masks"] = self.masks(step, ctx)
        return q, k_ref.contiguous(), v_ref.contiguous()

    def source_foreground(self, step: int, grid) -> torch.Tensor:
        maps = self.reference.cross_maps.get(step)
        if maps is None:
            raise named_error(f"{self.node} (masked): no reference cross-attention maps for step {step}")
        return binary_mask(maps.sum(0, keepdim=True), grid, self.mask_threshold)[0]

    def masks(self, step: int, ctx: CallContext) -> Optional[Dict[str, torch.Tensor]]:
        """Source foreground (keys) and target foreground per batch row (queries); None before any target map of
        this step exists (MasaCtrl then attends unmasked) or when the batch's rows changed."""
        target = self.target_maps.current(step)
        if target is None or target.shape[0] != ctx.rows_per_chunk:
            return None
        target = binary_mask(target, ctx.grid, self.mask_threshold)           # (rows, Nq)
        return {"source": self.source_foreground(step, ctx.grid),            # (Nk,)
                "target": target.repeat(len(ctx.cond_or_uncond), 1)}          # every chunk's row j: cond row j

    def attend(self, q, k, v, ctx):
        masks = ctx.scratch.get("kv_masks") if self.mode == "masked" else None
        if masks is None:
            return None
        bias = RegionBias(masks["target"].to(q.device), masks["source"].to(q.device))
        ctx.scratch["attention_bias"] = bias  # observers (attention capture) see the masked attention
        return explicit_attention(q, k, v, ctx.heads, bias)


class RegionBias:
    """masked mode's additive bias, made per block of query rows (``explicit_attention`` asks chunk by chunk, the
    capture for its query points), so the float32 (B, Nq, Nk) bias never exists whole: 0 where a query's region
    (target foreground / background) is the key's (source), -inf elsewhere; a query whose region has no source key
    attends to all of them (MasaCtrl's all-minimum row: uniform)."""

    def __init__(self, target: torch.Tensor, source: torch.Tensor):
        self.target, self.source = target, source     # (B, Nq) and (Nk,) region labels

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        tgt = self.target.index_select(1, index.to(self.target.device))
        same_region = tgt[:, :, None] == self.source[None, None, :]             # rows x queries x source keys
        same_region |= ~same_region.any(dim=-1, keepdim=True)
        bias = torch.zeros(same_region.shape, device=self.target.device, dtype=torch.float32)
        bias.masked_fill_(~same_region, float("-inf"))
        return bias[:, None]                                                    # (B, 1, len(index), Nk)


class TargetMapObserver(Editor):
    """masked mode: reads the target's cross-attention of its words at the mask resolution (after map editors, so
    a P2P edit or a test's forced map is what counts) into the KV editor's ``target_maps``."""

    order = 80
    kinds = ("cross",)

    def __init__(self, editor: KVInjectEditor):
        self.editor = editor

    def layers(self, all_layers):
        return [l for l in all_layers if l.level == self.editor.reference.cross_level]

    def active(self, ctx: CallContext) -> bool:
        return (ctx.kind == "cross" and ctx.layer.level == self.editor.reference.cross_level
                and 0 in ctx.cond_or_uncond and self.editor.acting(ctx))

    def needs_probs(self, ctx):
        return True

    def edit_probs(self, probs, ctx):
        rows = ctx.chunk_rows(0)
        tokens = [t for t in self.editor.target_tokens if t < probs.shape[-1]]
        maps = probs[rows][..., tokens].float().mean(1).sum(-1)                # (rows, Nq): heads mean, words sum
        self.editor.target_maps.add(self.editor.sched.step(ctx.step), maps.reshape(len(rows), *ctx.grid))
        return probs


def negative_check(negative_context: torch.Tensor):
    """UNet wrapper factory: warns (once per patched model) when the sampler's unconditional half is not the
    ``negative`` the source's unconditional K/V were recorded with; MasaCtrl pairs the two halves with the same
    negative prompt, and a different one still runs, attending to the recorded source."""
    said = []
    node = node_name()

    def factory(previous):
        def wrapper(apply_model, args):
            context = args["c"].get("c_crossattn")
            branches = list(args.get("cond_or_uncond") or [])
            if not said and torch.is_tensor(context) and 1 in branches:
                rows = context.shape[0] // len(branches)
                got = context[branches.index(1) * rows]
                expected = negative_context[0].to(got.device, got.dtype)
                same = got.shape[0] % expected.shape[0] == 0 and torch.allclose(
                    got, expected.repeat(got.shape[0] // expected.shape[0], 1), atol=1e-4)
                if not same:
                    said.append(True)
                    log.warning("[Inversion Chain] %s: the sampler's negative prompt is not the `negative` connected "
                                "to %s; the unconditional half attends to the source recorded with %s's negative. "
                                "Connect the same negative to both.", node, node, node)
            return patching.call_unet(apply_model, args, previous)
        return wrapper
    return factory
