"""Attention map capture: an observer editor that aggregates attention maps while sampling, and the ATTN_MAPS
store the viewer reads (its queries: map_query.py; its drawing: map_view.py).

What is kept (bounded memory, never a full self-attention matrix):
- cross-attention: for every key token (all of them, e.g. 77), the probability each query position gives it, mean
  over heads: ``(rows, tokens, h, w)`` per stored step / unit / branch;
- self-attention: the attention maps of ``query_grid x query_grid`` query points spread evenly over the token
  grid, mean over heads: ``(rows, points, h, w)``. Keys beyond the own grid (an editor such as KV Inject's
  ``union`` mode concatenates a reference image's keys) are folded onto the grid: each key block of ``h*w`` keys
  is summed, so a map still sums to 1 and shows where on the grid the query looks, whichever image it reads.

A *unit* is one attention layer (``detail = "per layer"``) or all captured layers of one resolution
(``"per resolution"``, the mean over those layers, as P2P's aggregate). A *step* is one distinct sigma in order of
arrival (calls at the same sigma, e.g. separate cond and uncond calls or a second-order sampler's repeated sigma,
are averaged); the run's fractions come from ``StepInfo.index/total`` when the schedule is known, else from
``i / number of steps seen``. While a step runs, its running sums live in float32 on the device; when the next
sigma arrives they are divided by their call counts and moved to the CPU in float16. Memory:
``steps x units x branches x rows x (tokens + points) x h x w x 2`` bytes (see ``storage_bytes``).

The capture never changes the sampler's output: the editor returns q/k/v/out unchanged and computes its maps on
the side (from the q/k it saw, plus an additive ``ctx.scratch["attention_bias"]`` if an editor computing attention
itself published one), or from the probabilities another editor edited when the controller computed them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ...artifacts import InversionChainError, user_text
from . import capture_budget
from ..core.controller import CallContext, Editor, attention_probs
from ..core.layers import AttentionLayer
from ..core import tokens as tokens_mod
from ...logs import log


ATTN_MAPS = "ATTN_MAPS"
KIND_CHOICES = {"cross + self": ("cross", "self"), "cross": ("cross",), "self": ("self",)}
RESOLUTIONS = ("latent/4", "latent/8", "latent/2", "latent/1", "all")
DETAILS = ("per layer", "per resolution")
BRANCHES = {"cond": 0, "uncond": 1}
BRANCH_NAMES = {v: k for k, v in BRANCHES.items()}
STORAGE_DTYPE = torch.float16
ATTENTION_BIAS_KEY = "attention_bias"   # ctx.scratch: additive bias (broadcastable to (B, heads, Nq, Nk))
SIGMA_RTOL = 1e-5


def resolution_name(level: int) -> str:
    return f"latent/{2 ** level}"


def resolution_levels(resolution: str) -> Optional[Tuple[int, ...]]:
    """Levels (number of 2x downsamplings) of a resolution choice; None = all levels."""
    if resolution == "all":
        return None
    if resolution not in RESOLUTIONS:
        raise InversionChainError(f"unknown resolution '{user_text(resolution)}'; use one of {', '.join(RESOLUTIONS)}.")
    return (int(math.log2(int(resolution.split("/")[1]))),)


def describe_layers(indices: Iterable[int]) -> str:
    """'4,5,7-9' for [4, 5, 7, 8, 9]."""
    ids = sorted(set(int(i) for i in indices))
    parts, start = [], None
    for i, x in enumerate(ids):
        if start is None:
            start = x
        if i + 1 == len(ids) or ids[i + 1] != x + 1:
            parts.append(str(start) if start == x else (f"{start},{x}" if x == start + 1 else f"{start}-{x}"))
            start = None
    return ",".join(parts)


def query_points(grid: Tuple[int, int], n: int) -> torch.Tensor:
    """Flat indices of ``n x n`` query points at the centres of an even n x n partition of the token grid."""
    h, w = int(grid[0]), int(grid[1])
    ys = [min(h - 1, int((i + 0.5) * h / n)) for i in range(n)]
    xs = [min(w - 1, int((j + 0.5) * w / n)) for j in range(n)]
    return torch.tensor([y * w + x for y in ys for x in xs], dtype=torch.long)


def point_fractions(n: int) -> List[Tuple[float, float]]:
    """(y, x) of each query point as fractions of the image height/width (same for every resolution)."""
    return [((i + 0.5) / n, (j + 0.5) / n) for i in range(n) for j in range(n)]


@dataclass(frozen=True)
class Unit:
    """Where a stored map comes from: one layer, or the mean of all captured layers of one resolution."""
    name: str                   # "L7" or "latent/4"
    layers: Tuple[int, ...]
    level: int


@dataclass
class PromptTokens:
    """A branch's prompt as CLIP tokens (first 77-token chunk), to name tokens by words."""
    clip: object
    text: str
    ids: List[int]

    @property
    def end(self) -> int:
        return self.ids.index(tokens_mod.END) if tokens_mod.END in self.ids else len(self.ids)

    def meaningful(self) -> List[int]:
        return list(range(1, self.end))

    def labels(self) -> Dict[int, str]:
        readable = tokens_mod.readable_tokens(self.clip, self.ids[:self.end])
        return {p: readable[p - 1] for p in self.meaningful() if p - 1 < len(readable)}

    def locate(self, word: str, input_name: str) -> List[int]:
        return tokens_mod.locate_words(self.clip, self.text, [word], input_name)[word]


@dataclass
class StepRecord:
    sigma: float
    index: Optional[int]            # StepInfo.index when the schedule was known
    total: Optional[int]
    maps: Dict[Tuple[str, str, int], torch.Tensor] = field(default_factory=dict)  # (kind, unit, branch) -> (r,T,h,w)


class AttentionMaps:
    """ATTN_MAPS: what ``ICAttentionCapture`` records during sampling; read by the viewer after sampling."""

    def __init__(self, kinds: Sequence[str], levels: Optional[Sequence[int]], detail: str, query_grid: int,
                 prompts: Optional[Dict[int, PromptTokens]] = None):
        if detail not in DETAILS:
            raise InversionChainError(f"unknown detail '{user_text(detail)}'; use one of {', '.join(DETAILS)}.")
        self.kinds = tuple(kinds)
        self.levels = None if levels is None else tuple(levels)
        self.detail = detail
        self.query_grid = int(query_grid)
        self.prompts: Dict[int, PromptTokens] = dict(prompts or {})
        self.units: Dict[str, Unit] = {}
        self.grids: Dict[str, Tuple[int, int]] = {}
        self.steps: List[StepRecord] = []
        self.latent_hw: Optional[Tuple[int, int]] = None
        self.runs = 0
        self._pending: Optional[StepRecord] = None
        self._sums: Dict[Tuple[str, str, int], List] = {}  # key -> [float32 sum (rows, T, h, w), count]
        self._warned = set()
        self.max_bytes: Optional[int] = None   # the node's max_mb (None: no limit); see capture_budget.py
        self.sizing = None                     # (layers, latent_hw, branches, rows, tokens) of the current run
        self.start_token = True   # cross maps: key 0 is CLIP's start token (the viewer drops it); False on DiTs

    # -- recording ---------------------------------------------------------------------------------------------
    def set_units(self, layers: Sequence[AttentionLayer]):
        self.units = {}
        if self.detail == "per layer":
            for l in layers:
                self.units[f"L{l.index}"] = Unit(f"L{l.index}", (l.index,), l.level)
        else:
            for level in sorted({l.level for l in layers}):
                ids = tuple(l.index for l in layers if l.level == level)
                self.units[resolution_name(level)] = Unit(resolution_name(level), ids, level)
        self._unit_of = {i: u for u in self.units.values() for i in u.layers}

    def unit_of(self, layer_index: int) -> Unit:
        return self._unit_of[layer_index]

    def empty(self) -> bool:
        return not self.steps and self._pending is None

    def reset(self):
        """Forget what was recorded (a new sampling run starts)."""
        self.steps = []
        self._pending = None
        self._sums = {}
        self.grids = {}
        self.latent_hw = None
        self.runs += 1

    def add(self, kind: str, layer_index: int, branch: int, maps: torch.Tensor, sigma: float, index=None,
            total=None, grid=None, latent_hw=None):
        """Accumulate ``maps`` (rows, T, h*w) float32 of one call into the running sums of the current step."""
        if self._pending is None or abs(sigma - self._pending.sigma) > SIGMA_RTOL * max(1.0, abs(sigma)):
            self.flush()
            self._pending = StepRecord(sigma=sigma, index=index, total=total)
        if self.latent_hw is None and latent_hw is not None:
            self.latent_hw = tuple(latent_hw)
        unit = self.unit_of(layer_index)
        h, w = grid
        if self.grids.setdefault(unit.name, (h, w)) != (h, w):
            self.warn_once(("grid", unit.name), f"{unit.name}: token grid changed within a run; maps skipped")
            return
        maps = maps.reshape(maps.shape[0], maps.shape[1], h, w)
        key = (kind, unit.name, branch)
        entry = self._sums.get(key)
        if entry is None:
            self._sums[key] = [maps.float().clone(), 1]
        elif entry[0].shape != maps.shape:
            self.warn_once(("shape",) + key, f"{kind} {unit.name}: batch layout changed within a step "
                                         f"({tuple(entry[0].shape)} vs {tuple(maps.shape)}); call skipped")
        else:
            entry[0].add_(maps.float())
            entry[1] += 1

    def flush(self):
        """Close the current step: running means to CPU float16."""
        if self._pending is None:
            return
        record = self._pending
        for key, (total, count) in self._sums.items():
            record.maps[key] = (total / count).to(device="cpu", dtype=STORAGE_DTYPE)
        if record.maps:
            self.steps.append(record)
            if self.max_bytes and self.sizing and self.stored_bytes() > self.max_bytes:
                capture_budget.check_step(SIZES, self, record)
            if len(self.steps) == 1:
                mb = sum(t.numel() * t.element_size() for t in record.maps.values()) / 2 ** 20
                log.info("Attention Capture: %.2f MB per step (CPU, float16)", mb)
        self._pending = None
        self._sums = {}

    def warn_once(self, key, message):
        """Log ``message`` once per ``key`` (the capture editor warns through its maps too)."""
        if key not in self._warned:
            self._warned.add(key)
            log.warning("Attention Capture: %s", message)

    # -- memory ------------------------------------------------------------------------------------------------
    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.steps for t in s.maps.values())

    def pending_bytes(self) -> int:
        return sum(e[0].numel() * e[0].element_size() for e in self._sums.values())

    def nbytes(self) -> int:
        """Every tensor byte this store holds (finished steps + the running sums of the current step)."""
        return self.stored_bytes() + self.pending_bytes()

    # -- reading (the viewer) ----------------------------------------------------------------------------------
    def fractions(self) -> List[float]:
        """Fraction of the run at which each recorded step starts (0 = first step)."""
        n = len(self.steps)
        if n and all(s.index is not None and s.total for s in self.steps) \
                and len({s.total for s in self.steps}) == 1:
            return [s.index / s.total for s in self.steps]
        return [i / n for i in range(n)]

    def branches(self, kind: str) -> List[int]:
        return sorted({b for s in self.steps for (k, _, b) in s.maps if k == kind})

    def rows(self, kind: str, branch: int) -> int:
        for s in self.steps:
            for (k, _, b), t in s.maps.items():
                if k == kind and b == branch:
                    return int(t.shape[0])
        return 0


def storage_bytes(layers: Sequence[AttentionLayer], latent_hw: Tuple[int, int], steps: int, branches: int,
                  rows: int, kinds: Sequence[str], tokens: int = 77, query_grid: int = 4,
                  detail: str = "per layer") -> Dict[str, int]:
    """The capture's memory for a run, from the data layout: ``stored`` (finished steps, float16 on the CPU) and
    ``pending`` (one step's running sums, float32 on the device) for ``layers`` (the captured ones)."""
    per_map = (tokens if "cross" in kinds else 0) + (query_grid ** 2 if "self" in kinds else 0)
    if detail == "per layer":
        grids = [l.grid(*latent_hw) for l in layers]
    else:
        grids = [next(l for l in layers if l.level == lv).grid(*latent_hw) for lv in sorted({l.level for l in layers})]
    cells = sum(h * w for h, w in grids)
    one_step = branches * rows * per_map * cells
    return {"stored": steps * one_step * 2, "pending": one_step * 4, "total": steps * one_step * 2 + one_step * 4}


SIZES = (storage_bytes, resolution_name)   # what capture_budget.py sizes runs with


class AttentionCaptureEditor(Editor):
    """Observer (order 90): sees every call at its layers after the other editors changed q/k/v or the
    probabilities; records maps into an ``AttentionMaps``; returns everything unchanged."""

    order = 90

    def __init__(self, maps: AttentionMaps, layers: Sequence[AttentionLayer]):
        self.maps = maps
        self.kinds = tuple(maps.kinds)
        self._layers = list(layers)
        self.layer_ids = {l.index for l in layers}
        self._key = f"capture_{id(self)}"
        maps.set_units(self._layers)

    def points(self, grid, device) -> torch.Tensor:
        # made per call (n*n indices): a cache would be state the store's memory accounting does not see
        return query_points(grid, self.maps.query_grid).to(device)

    def layers(self, all_layers):
        return [l for l in all_layers if l.index in self.layer_ids]

    def active(self, ctx: CallContext) -> bool:
        return ctx.kind in self.kinds and ctx.layer.index in self.layer_ids

    def begin_run(self):  # schedule.RunTracker: sigma went back up, or another MODEL clone samples
        self.maps.reset()

    # the hooks: stash q/k, take edited probabilities if the controller computes them, record at the end
    def edit_qkv(self, q, k, v, ctx):
        ctx.scratch[self._key] = (q, k)
        return q, k, v

    def edit_probs(self, probs, ctx):
        if ctx.kind == "cross":
            m = probs.mean(1)                                                   # (B, Nq, Nk)
        else:
            pts = self.points(ctx.grid, probs.device)
            m = probs.index_select(2, pts).mean(1)                              # (B, P, Nk)
        ctx.scratch[self._key] = m
        return probs

    def edit_out(self, out, ctx):
        stash = ctx.scratch.pop(self._key, None)
        if stash is None:
            return out
        with torch.no_grad():
            m = self._side_maps(stash, ctx) if isinstance(stash, tuple) else stash
            self._record(m, ctx)
        return out

    # -- maps ------------------------------------------------------------------------------------------------
    def _side_maps(self, qk, ctx) -> torch.Tensor:
        q, k = qk
        bias = ctx.scratch.get(ATTENTION_BIAS_KEY)
        if ctx.kind == "self":
            pts = self.points(ctx.grid, q.device)
            q = q.index_select(1, pts)
            if hasattr(bias, "rows"):   # a bias made per query row (masked KV Inject): the points' rows only
                bias = bias.rows(pts)
            elif bias is not None and bias.dim() >= 2 and bias.shape[-2] > 1:
                bias = bias.index_select(-2, pts.to(bias.device))
        elif hasattr(bias, "rows"):
            bias = bias.rows(torch.arange(q.shape[1], device=q.device))
        if bias is not None:
            bias = bias.to(q.device, torch.float32)
        return attention_probs(q, k, ctx.heads, bias).mean(1)                   # (B, Nq or P, Nk)

    def _record(self, m: torch.Tensor, ctx: CallContext):
        h, w = ctx.grid
        if ctx.kind == "cross":
            m = m.transpose(1, 2)                                               # (B, T, h*w)
        else:
            nk = m.shape[-1]
            if nk % (h * w) != 0:
                self.maps.warn_once(("keys", ctx.layer.index), f"self-attention layer {ctx.layer.index} has {nk} keys, "
                                f"not a multiple of its {h}x{w} grid; not captured")
                return
            m = m.reshape(m.shape[0], m.shape[1], nk // (h * w), h * w).sum(2)  # (B, P, h*w)
        chunks = list(ctx.cond_or_uncond)
        b = m.shape[0]
        if b % len(chunks) != 0:
            self.maps.warn_once(("rows", ctx.layer.index),
                                f"batch of {b} rows does not split into {len(chunks)} chunks")
            return
        rpc = b // len(chunks)
        m = m.reshape(len(chunks), rpc, m.shape[1], m.shape[2])
        shape = ctx.extra_options.get("original_shape")
        latent_hw = (int(shape[2]), int(shape[3])) if shape is not None else None
        step = ctx.step
        if self.maps.max_bytes and self.maps.empty():   # the run's first captured call: before any map is kept
            tokens = m.shape[2] if ctx.kind == "cross" else 77
            self.maps.sizing = (self._layers, latent_hw, len(set(chunks)), rpc, tokens)
            capture_budget.check(SIZES, self.maps, *self.maps.sizing[:2], step.total or 1, *self.maps.sizing[2:],
                                 steps_known=bool(step.total))
        for branch in sorted(set(int(c) for c in chunks)):
            idx = [i for i, c in enumerate(chunks) if int(c) == branch]
            sel = m[idx[0]] if len(idx) == 1 else m[idx].mean(0)
            self.maps.add(ctx.kind, ctx.layer.index, branch, sel, step.sigma, step.index, step.total, (h, w),
                          latent_hw)


# -- capture set-up (used by the node) -------------------------------------------------------------------------
def capture_layers(all_layers: Sequence[AttentionLayer], resolution: str) -> List[AttentionLayer]:
    levels = resolution_levels(resolution)
    chosen = [l for l in all_layers if levels is None or l.level in levels]
    if not chosen:
        have = sorted({l.level for l in all_layers})
        valid = ", ".join(f"{resolution_name(lv)} (layers "
                          f"{describe_layers(l.index for l in all_layers if l.level == lv)})"
                          for lv in have)
        raise InversionChainError(f"this model has no attention layers at {resolution}. Its resolutions: "
                                  f"{valid}, or all.")
    return chosen


def prompt_tokens(clip, prompt: str) -> PromptTokens:
    return PromptTokens(clip=clip, text=prompt, ids=tokens_mod.token_ids(clip, prompt))
