"""StyleDiffusion on the attention core: the value input of cross-attention from a STYLE (keys keep the prompt),
and a differentiable recorder of cross-attention maps for the mapper's attention loss."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..artifacts import InversionChainError
from .controller import CallContext, Editor
from .layers import AttentionLayer
from .p2p import BLEND_LEVEL
from .schedule import Schedule

RowMap = Optional[Tuple[torch.Tensor, torch.Tensor]]   # (source token per target token, 1 = aligned / 0 = own)


class ValueInjection:
    """attn2 pre-projection patch ``(n, context, value, extra_options) -> (n, context, value)``.

    In the conditional chunk's rows, the value input becomes the STYLE's embedding of the current step while the
    step's fraction of the run is below ``end_percent``; ``context`` (the keys' input) is never touched, so the
    attention probabilities stay the prompt's. ComfyUI projects ``value`` with ``to_v`` right after this patch.

    ``row_maps[r]`` (optional, per row of the cond chunk) aligns the style's tokens to another prompt's (P2Plus
    refine: a target token takes the source token it is aligned to, new tokens keep their own value input).
    ``override`` (training): a tensor used at every step instead of the stored embeddings."""

    def __init__(self, values: Optional[torch.Tensor], schedule: Schedule, end_percent: float = 1.0,
                 row_maps: Sequence[RowMap] = ()):
        self.values = values                  # (steps, 1, tokens, dim) or None (training only)
        self.schedule = schedule
        self.end_percent = float(end_percent)
        self.row_maps = list(row_maps)
        self.override: Optional[torch.Tensor] = None
        self._cache: Dict[tuple, torch.Tensor] = {}

    def __deepcopy__(self, memo):  # 2024-03 clone() deep-copies model_options
        return self

    def to(self, device):  # 0.3x moves patch objects with the model
        return self

    def embedding(self, step: int, device, dtype) -> torch.Tensor:
        key = (step, device, dtype)
        if key not in self._cache:
            if len(self._cache) > 4 * len(self.values):
                self._cache.clear()
            self._cache[key] = self.values[step].to(device=device, dtype=dtype)
        return self._cache[key]

    def __call__(self, n, context, value, extra_options):
        order = extra_options.get("cond_or_uncond") or []
        if 0 not in order or context is None:
            return n, context, value
        if self.override is not None:
            emb = self.override.to(context.dtype)
        elif self.values is None:
            return n, context, value
        else:
            step = self.schedule.index(float(extra_options["sigmas"].flatten()[0]))
            if self.schedule.fraction(step) >= self.end_percent:
                return n, context, value
            emb = self.embedding(step, context.device, context.dtype)
        if tuple(context.shape[1:]) != tuple(emb.shape[1:]):
            raise InversionChainError(
                f"{self.schedule.what}: the prompt's context is {tuple(context.shape[1:])} (tokens, dim) but the STYLE "
                f"holds {tuple(emb.shape[1:])}. Use a source prompt of the same length (and the same model) as the "
                f"StyleDiffusion Mapper's.")
        per = context.shape[0] // len(order)
        out = (context if value is None else value).clone()
        for c, kind in enumerate(order):
            if kind != 0:
                continue
            for r in range(per):
                row = c * per + r
                row_map = self.row_maps[r] if r < len(self.row_maps) else None
                if row_map is None:
                    out[row] = emb[0]
                else:
                    source_token, aligned = (t.to(out.device) for t in row_map)
                    a = aligned.to(out.dtype)[:, None]
                    out[row] = a * emb[0][source_token] + (1 - a) * out[row]
        return n, context, out


class CrossAttentionRecorder(Editor):
    """Observer: keeps the conditional rows' cross-attention probabilities (mean over heads, ``(rows, Nq, Nk)``)
    of the layers at one resolution, in call order, with autograd intact (the attention loss backpropagates
    through them). Only records while ``enabled``."""

    order = 90
    kinds = ("cross",)

    def __init__(self, level: int, schedule: torch.Tensor):
        self.level = int(level)
        self._schedule = schedule
        self.enabled = False
        self.maps: List[torch.Tensor] = []

    def schedule(self):
        return self._schedule

    def layers(self, all_layers: Sequence[AttentionLayer]) -> Sequence[AttentionLayer]:
        level = min(self.level, max(l.level for l in all_layers))
        return [l for l in all_layers if l.level == level]

    def active(self, ctx: CallContext) -> bool:
        return self.enabled and ctx.kind == "cross" and bool(ctx.chunk_rows(0))

    def needs_probs(self, ctx: CallContext) -> bool:
        return True

    def edit_probs(self, probs, ctx):
        self.maps.append(probs[ctx.chunk_rows(0)].mean(dim=1))
        return probs

    def take(self) -> torch.Tensor:
        """The maps recorded since the last take, stacked: (layers, rows, Nq, Nk)."""
        if not self.maps:
            raise InversionChainError("StyleDiffusion Mapper: no cross-attention maps were recorded (the model has "
                                      "no cross-attention layers at latent/4).")
        out = torch.stack(self.maps)
        self.maps = []
        return out


def recorder_level() -> int:
    """Cross-attention maps at latent/4 (16x16 at 512 px), the resolution StyleDiffusion's loss uses."""
    return BLEND_LEVEL
