"""The Attention Map Viewer's queries over an ATTN_MAPS: which steps, units, branch and row, averaged into tiles
(one per token, word or query point), with clear errors for anything outside what was captured. Drawing the
tiles is map_view.py's job."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from ...artifacts import InversionChainError, user_text
from .capture import (BRANCH_NAMES, BRANCHES, AttentionMaps, describe_layers, point_fractions, resolution_levels,
                      resolution_name)


@dataclass
class Tile:
    label: str                  # token / word / query point
    map: torch.Tensor           # (h, w) float32, the mean over the selected steps and units
    point: Optional[Tuple[float, float]] = None   # self: the query point (y, x) as fractions


@dataclass
class Selection:
    tiles: List[Tile]
    steps: List[int]            # indices of the recorded steps used
    step_label: str
    layer_label: str
    grid: Tuple[int, int]


MAX_TILES = 256  # viewer tiles per grid: query_grid 16 gives 256 points; more text entries are refused


def _parse_layers(text: str, limit: int) -> Optional[set]:
    """Layer indices named by ``text``, clamped to the model's ``limit`` layers (so '0-5000000' costs nothing)."""
    text = (text or "").strip().lower()
    if text in ("", "all"):
        return None
    out = set()
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if a < 0 or b < a:
                    raise ValueError
                out.update(range(a, min(b, limit - 1) + 1))
            else:
                if int(part) < 0:
                    raise ValueError
                out.add(int(part))
        except ValueError:
            raise InversionChainError(f"`layers` must be 'all' or layer numbers and ranges like '4,5,7-9'; "
                                      f"got '{user_text(text[:80])}'.") from None
    return out


def _point_spec(part: str) -> Optional[int]:
    part = part.strip()
    digits = part[1:].strip()
    # ASCII digits only: str.isdigit also accepts characters int() refuses (superscripts such as "²")
    if part.startswith("#") and digits.isascii() and digits.isdigit():
        return int(digits)
    return None


def select(maps: AttentionMaps, kind: str, tokens_text: str, start_percent: float, end_percent: float, layers_text: str,
           resolution: str, branch: str, row: int) -> Selection:
    """Tiles (one per token / word / query point) of the chosen steps, units, branch and row; clear errors for
    anything outside what was captured."""
    maps.flush()
    if kind not in maps.kinds:
        raise InversionChainError(f"{kind}-attention was not captured (the capture recorded "
                                  f"{' and '.join(maps.kinds)}); set the capture's `kinds` to include it.")
    if not maps.steps:
        raise InversionChainError("no attention was captured. Connect Attention Capture's MODEL to the "
                                  "sampler that made `latent`, and run that sampler before this node.")
    if branch not in BRANCHES:
        raise InversionChainError(f"branch must be one of {', '.join(BRANCHES)}, got '{user_text(branch)}'.")
    b = BRANCHES[branch]
    have = maps.branches(kind)
    if b not in have:
        raise InversionChainError(f"the {branch} branch was not captured (captured: "
                                  f"{', '.join(BRANCH_NAMES[x] for x in have)}). The uncond branch exists only when "
                                  f"cfg > 1.")
    n_rows = maps.rows(kind, b)
    if not 0 <= row < n_rows:
        raise InversionChainError(f"row {row} is outside the run's batch of {n_rows} row(s) "
                                  f"(valid: 0..{n_rows - 1}).")

    # steps
    fr = maps.fractions()
    n = len(maps.steps)
    if not (0.0 <= start_percent <= 1.0 and 0.0 <= end_percent <= 1.0) or start_percent >= end_percent:
        raise InversionChainError(f"the step range start_percent {start_percent} .. end_percent "
                                  f"{end_percent} must satisfy 0 <= start_percent < end_percent <= 1 (fractions of "
                                  f"the run's {n} steps).")
    chosen_steps = [i for i, f in enumerate(fr) if start_percent <= f < end_percent]
    if not chosen_steps:
        listing = ", ".join(f"{f:.3g}" for f in fr)
        raise InversionChainError(f"the step range {start_percent}..{end_percent} selects none of the run's "
                                  f"{n} "
                                  f"steps (they start at fractions {listing}).")

    # units
    units = list(maps.units.values())
    if resolution != "all captured":
        levels = resolution_levels(resolution) if resolution != "all" else None
        units = [u for u in units if levels is None or u.level in levels]
        if not units:
            have_res = sorted({resolution_name(u.level) for u in maps.units.values()})
            raise InversionChainError(f"{resolution} was not captured; captured: {', '.join(have_res)}.")
    wanted = _parse_layers(layers_text, 1 + max(i for u in maps.units.values() for i in u.layers))
    if wanted is not None:
        picked = [u for u in units if set(u.layers) <= wanted]
        if not picked:
            listing = "; ".join(f"{u.name}: layers {describe_layers(u.layers)}" for u in units)
            raise InversionChainError(
                f"no captured unit lies within layers '{user_text(layers_text[:80])}'. Captured "
                f"({maps.detail}): "
                f"{listing}.")
        units = picked
    units = [u for u in units if any((kind, u.name, b) in maps.steps[i].maps for i in chosen_steps)]
    if not units:
        raise InversionChainError("nothing was captured for these layers, steps and branch.")
    grid = max((maps.grids[u.name] for u in units), key=lambda g: g[0] * g[1])

    # average over steps and units (units upsampled to the largest grid)
    total, count = None, 0
    for i in chosen_steps:
        for u in units:
            t = maps.steps[i].maps.get((kind, u.name, b))
            if t is None:
                continue
            m = t[row].float()                                                  # (T, h, w)
            if kind == "cross" and maps.start_token:
                m = m[1:] / m[1:].sum(0, keepdim=True).clamp_min(1e-12)         # drop the start token, renormalise
                m = torch.cat([torch.zeros_like(m[:1]), m], 0)
            if tuple(m.shape[-2:]) != tuple(grid):
                m = torch.nn.functional.interpolate(m[None], size=grid, mode="bilinear", align_corners=False)[0]
            total = m if total is None else total + m
            count += 1
    mean = total / count

    tiles = _tiles(maps, kind, tokens_text, mean, b)
    lo, hi = chosen_steps[0], chosen_steps[-1]
    step_label = (f"steps {fr[lo]:.2f}-{(fr[hi + 1] if hi + 1 < n else 1.0):.2f}"
                  f" ({lo}-{hi} of {n})" if lo != hi else f"step {lo} of {n} ({fr[lo]:.2f})")
    layer_ids = sorted({i for u in units for i in u.layers})
    layer_label = f"L{describe_layers(layer_ids)} @{grid[0]}x{grid[1]}"
    return Selection(tiles=tiles, steps=chosen_steps, step_label=step_label, layer_label=layer_label, grid=grid)


def _tiles(maps: AttentionMaps, kind: str, tokens_text: str, mean: torch.Tensor, branch: int):
    parts = [p.strip() for p in (tokens_text or "").replace(";", ",").split(",") if p.strip()]
    if len(parts) > MAX_TILES:
        raise InversionChainError(f"`tokens` lists {len(parts)} entries; at most {MAX_TILES} tiles are drawn "
                                  f"in one grid. List fewer words or positions (empty = every token).")
    if kind == "self":
        fr = point_fractions(maps.query_grid)
        n = len(fr)
        if not parts:
            chosen = list(range(n))
        else:
            chosen = []
            for p in parts:
                i = _point_spec(p)
                if i is None or not 0 <= i < n:
                    raise InversionChainError(f"for self-attention, `tokens` picks query points as #0..#{n - 1}"
                                              f" (row by row on a {maps.query_grid}x{maps.query_grid} grid); got "
                                              f"'{user_text(p)}'. Leave it empty for all points.")
                chosen.append(i)
        return [Tile(label=f"point #{i} (y {fr[i][0]:.2f}, x {fr[i][1]:.2f})", map=mean[i], point=fr[i])
                for i in chosen]

    n_tok = mean.shape[0]
    lo = 1 if maps.start_token else 0   # CLIP's start token #0 is never a tile; T5 (DiTs) has none
    prompt = maps.prompts.get(branch)
    where = "prompt" if branch == 0 else "negative_prompt"
    if not parts:
        if prompt is None:
            raise InversionChainError(f"to show every token of the prompt, give Attention Capture `clip` and "
                                      f"`{where}`; or list token positions as #{lo}..#{n_tok - 1}.")
        labels = prompt.labels()
        positions = [p for p in prompt.meaningful() if p < n_tok]
        if not positions:
            raise InversionChainError(f"the {BRANCH_NAMES[branch]} prompt '{user_text(prompt.text)}' has no "
                                      f"tokens; "
                                      f"list token positions as #{lo}..#{n_tok - 1} instead.")
        return [Tile(label=f"{labels.get(p, p)} (#{p})", map=mean[p]) for p in positions]
    tiles = []
    for p in parts:
        i = _point_spec(p)
        if i is not None:
            if not lo <= i < n_tok:
                raise InversionChainError(f"token position #{i} is outside {lo}..#{n_tok - 1}"
                                          + (" (#0, the start token, is excluded)." if lo else "."))
            label = prompt.labels().get(i, f"#{i}") if prompt is not None else f"#{i}"
            tiles.append(Tile(label=f"{label} (#{i})", map=mean[i]))
            continue
        if prompt is None:
            raise InversionChainError(f"to name tokens by words, give Attention Capture `clip` and "
                                      f"`{where}`; or list token positions as #{lo}..#{n_tok - 1}.")
        found = prompt.locate(p, "`tokens`")
        found = [i for i in found if i < n_tok]
        tiles.append(Tile(label=p, map=mean[found].sum(0)))
    return tiles
