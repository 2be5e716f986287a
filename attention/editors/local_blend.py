"""Prompt-to-Prompt's local blend: a mask from chosen words' cross-attention keeps the target row equal to the
source row outside it (see p2p.py's module notes for the post-CFG rewrite that makes it exact for DDIM/Euler)."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ...compat import PatchObject
from ..core.layers import AUTO_MAP_LEVEL
from ..core.schedule import Schedule, locate

BLEND_LEVEL = AUTO_MAP_LEVEL  # cross-attention maps at latent / 4 (16x16 for SD1.x at 512 px), as Prompt-to-Prompt;
                              # P2Plus Controller's `blend_map_size` picks another level


class LocalBlend(PatchObject):
    """Mask from chosen words' cross-attention; keeps the target row equal to the source row outside it."""

    def __init__(self, source_positions: Sequence[int], target_positions: Sequence[int], threshold: float,
                 start_percent: float, level: int, schedule: Schedule):
        self.positions = (list(source_positions), list(target_positions))
        self.threshold = float(threshold)
        self.start_percent = float(start_percent)
        self.level = int(level)
        self.schedule = schedule
        self.maps: Dict[Tuple[int, int], torch.Tensor] = {}   # (step, layer) -> (2, h, w) word maps
        self.last_mask: Optional[torch.Tensor] = None          # (1, 1, H, W) bool of the latest blended step

    def reset(self):
        self.maps.clear()
        self.last_mask = None

    def record(self, step: int, layer_index: int, probs: torch.Tensor, grid: Tuple[int, int]):
        """``probs``: (2, heads, Nq, Nk) cross-attention of the cond (source, target) rows."""
        mean = probs.float().mean(1)                                      # (2, Nq, Nk)
        rows = [mean[r][:, self.positions[r]].sum(-1) if self.positions[r] else mean.new_zeros(mean.shape[1])
                for r in range(2)]
        self.maps[(step, layer_index)] = torch.stack(rows).reshape(2, *grid)

    def record_map(self, step: int, layer_index: int, maps: torch.Tensor):
        """``maps``: (2, h, w) word maps of the cond (source, target) rows, already summed over the words and
        averaged over heads (DiT joint attention: attention/editors/dit_p2p.py)."""
        self.maps[(step, layer_index)] = maps

    def mask(self, step: int, size: Tuple[int, int]) -> Optional[torch.Tensor]:
        maps = [m for (s, _), m in self.maps.items() if s <= step]
        if not maps:
            return None
        total = torch.stack(maps).sum(0)[:, None]                          # (2, 1, h, w)
        total = F.max_pool2d(total, 3, stride=1, padding=1)
        total = F.interpolate(total, size=tuple(size), mode="nearest")
        total = total / total.flatten(1).amax(1).clamp_min(1e-12)[:, None, None, None]
        rows = total > self.threshold
        return rows[:1] | rows[1:2]                                        # union of source and target masks

    def __call__(self, args):
        """Post-CFG function: ``args["denoised"]`` (x0 predictions of both rows) -> blended x0 predictions."""
        x, denoised = args["input"], args["denoised"]
        if x.shape[0] != 2:
            return denoised
        sigma = float(args["sigma"].flatten()[0])
        i = locate(sigma, self.schedule.sigmas)
        if i is None or i >= self.schedule.steps or self.schedule.fraction(i) < self.start_percent:
            return denoised
        m = self.mask(i, x.shape[-2:])
        if m is None:
            return denoised
        m = m.to(denoised.device, denoised.dtype)[0]
        a = float(self.schedule.sigmas[i + 1]) / sigma                    # x' = a x + (1 - a) x0
        src_next_x0 = denoised[0] + (a / (1.0 - a)) * (x[0] - x[1])       # x0 that steps row 1 onto row 0's x'
        out = denoised.clone()
        out[1] = m * denoised[1] + (1 - m) * src_next_x0
        self.last_mask = m.bool()[None].cpu()
        return out
