"""One schedule vocabulary for every editor: step index, sigma, timestep and fraction of the run.

``start_at``/``end_at`` are fractions of the sampling steps (0 = first step, 1 = after the last) wherever the
papers use fractions (P2P's tau); timesteps (0..1000, noisier = larger) where they use timesteps (RIVAL's t_align);
integer steps where they count steps (MasaCtrl's start_step).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class StepInfo:
    index: Optional[int]       # 0-based sampling step, None when the schedule is unknown
    total: Optional[int]       # number of sampling steps, None when unknown
    sigma: float
    timestep: float            # model timestep on the 0..999 scale

    @property
    def fraction(self) -> Optional[float]:
        """index / total: 0.0 at the first step; a step is 'within start_at..end_at' when start <= f < end."""
        if self.index is None or not self.total:
            return None
        return self.index / self.total

    def within(self, start_at: float, end_at: float) -> bool:
        f = self.fraction
        return f is not None and start_at <= f < end_at


def locate(sigma: float, schedule: torch.Tensor, rtol: float = 1e-4) -> Optional[int]:
    """Index of ``sigma`` in a descending schedule (ending in 0), None if absent."""
    if schedule is None or schedule.numel() == 0:
        return None
    diffs = (schedule - sigma).abs()
    i = int(torch.argmin(diffs))
    return i if float(diffs[i]) <= rtol * max(1.0, abs(sigma)) else None
