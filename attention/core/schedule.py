"""The one schedule: which sampling step a UNet call belongs to, when a new run starts, and when an effect acts.

Vocabulary (ComfyUI's own convention): every "when" input is a fraction of the sampling steps. Step ``i`` of ``N``
(0-based) acts when ``start_percent <= i / N < end_percent``; so 0..1 is every step and an end of 0 none. Papers
that count timesteps (RIVAL's t_align/t_early) or steps (MasaCtrl's START_STEP) keep their parameter in the
tooltip with the equivalent fraction (``percent_after_timestep``, ``percent_of_step``).

``locate`` is the only sigma -> step index code. The Controller calls it once per UNet call and hands editors the
result as ``ctx.step`` (:class:`StepInfo`); patches that are not editors (attn2 pre-projection patches, post-CFG
functions, UNet wrappers) see only a sigma and call :meth:`Schedule.index`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ...artifacts import InversionChainError, named_error, node_name

SIGMA_RTOL = 1e-4


def locate(sigma: float, schedule: Optional[torch.Tensor], rtol: float = SIGMA_RTOL) -> Optional[int]:
    """Index of ``sigma`` in a descending schedule (ending in 0), None if absent."""
    if schedule is None or schedule.numel() == 0:
        return None
    diffs = (schedule - float(sigma)).abs()
    i = int(torch.argmin(diffs))
    return i if float(diffs[i]) <= rtol * max(1.0, abs(float(sigma))) else None


@dataclass(frozen=True)
class StepInfo:
    """Where a UNet call is in the run (computed once per call by the Controller)."""

    index: Optional[int]       # 0-based sampling step, None when the schedule is unknown or the sigma is not on it
    total: Optional[int]       # number of sampling steps, None when unknown
    sigma: float
    timestep: float            # model timestep on the 0..999 scale

    @property
    def fraction(self) -> Optional[float]:
        """index / total: 0.0 at the first step."""
        if self.index is None or not self.total:
            return None
        return self.index / self.total

    def within(self, start_percent: float, end_percent: float) -> bool:
        """True when ``start_percent <= index / total < end_percent`` (False when the step is unknown)."""
        f = self.fraction
        return f is not None and start_percent <= f < end_percent


class Schedule:
    """The sigma schedule an effect is defined on (an inversion's, or ``steps`` + ``scheduler``), with the error
    that names how to sample on it (and the node that made it: the error is raised while a sampler runs)."""

    def __init__(self, sigmas: torch.Tensor, scheduler: str, hint: Optional[str] = None):
        self.sigmas = sigmas.detach().float().cpu()
        self.scheduler = scheduler
        self.node = node_name()
        self.hint = hint

    @classmethod
    def of(cls, inversion) -> "Schedule":
        """An INVERSION's schedule; a partial inversion's error names its KSampler Advanced start_at_step."""
        return cls(inversion.sigmas, inversion.scheduler, hint=inversion.how_to_sample())

    @property
    def steps(self) -> int:
        return int(self.sigmas.numel()) - 1

    def off_schedule(self, sigma: float) -> InversionChainError:
        how = self.hint or (
            f"{self.steps} steps and scheduler '{self.scheduler}' (sampler 'ddim', denoise 1.0; a schedule that "
            f"starts below the model's sigma_max, here {float(self.sigmas[0]):.5g}, is a partial inversion's: "
            f"KSampler Advanced's start_at_step), or feed the `sigmas` of DDIM Invert / this node to SamplerCustom")
        return named_error(
            f"{self.node}: sampling reached sigma {float(sigma):.5g}, which is not on the edit's schedule. Sample "
            f"with {how}.")

    def index(self, sigma: float) -> int:
        """The sampling step of ``sigma`` (for patches that see only a sigma); an error when it is not a step."""
        i = locate(float(sigma), self.sigmas)
        if i is None or i >= self.steps:
            raise self.off_schedule(sigma)
        return i

    def step(self, info: StepInfo) -> int:
        """The step of an editor's ``ctx.step``; an error when the Controller could not place it on a schedule."""
        if info.index is None or info.index >= self.steps or info.total != self.steps:
            raise self.off_schedule(info.sigma)
        return info.index

    def fraction(self, i: int) -> float:
        return i / self.steps

    def acting(self, start_percent: float = 0.0, end_percent: float = 1.0) -> List[int]:
        """The steps ``i`` with ``start_percent <= i / N < end_percent``."""
        return steps_within(self.steps, start_percent, end_percent)


def steps_within(steps: int, start_percent: float = 0.0, end_percent: float = 1.0) -> List[int]:
    return [i for i in range(steps) if start_percent <= i / steps < end_percent]


class RunTracker:
    """The one "a new sampling run started" rule: a call whose sigma is higher than the previous call's, or that
    comes from another owner (another MODEL clone's Controller) than the previous call."""

    def __init__(self):
        self._owner = None
        self._sigma: Optional[float] = None

    def new_run(self, sigma: float, owner=None) -> bool:
        started = self._sigma is not None and (
            owner is not self._owner or sigma > self._sigma * (1 + 1e-5) + 1e-8)
        self._owner, self._sigma = owner, float(sigma)
        return started


def check_percents(**percents: float):
    """Every "when" input is a fraction of the steps in [0, 1]."""
    for name, value in percents.items():
        if not 0.0 <= float(value) <= 1.0:
            raise InversionChainError(f"{name} is a fraction of the sampling steps in [0, 1], got {value}.")


def percent_after_timestep(timesteps: Sequence[float], t: float) -> float:
    """The fraction of the steps whose model timestep is above ``t`` (RIVAL's t_align/t_early as an end_percent):
    the steps ``i / N < p`` are exactly those with timestep > t, on a schedule whose timesteps descend."""
    ts = [float(x) for x in timesteps]
    steps = len(ts) - 1 if len(ts) > 1 and ts[-1] == 0.0 else len(ts)
    return sum(1 for x in ts[:steps] if x > t) / steps


def percent_of_step(step: int, steps: int) -> float:
    """MasaCtrl's integer START_STEP as a start_percent (4 of 50 -> 0.08)."""
    return step / steps
