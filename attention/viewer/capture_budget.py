"""Attention Capture's byte budget (its ``max_mb`` setting): checked when sampling starts, at the first captured
call of a run and before any map is stored (the latent size, batch, branches and, when the schedule is known, the
number of steps are known then), and again at every finished step (a schedule the capture could not read). Over
the budget the run stops with a message that names the settings that fit."""
from __future__ import annotations

import math
from typing import List, Sequence

from ...artifacts import named_error
from ..core.layers import AttentionLayer

WHAT = "Attention Capture"
SETTING = "max_mb"


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2 ** 20:.1f} MB"


def alternatives(sizes, layers: Sequence[AttentionLayer], latent_hw, steps: int, branches: int, rows: int, kinds,
                 tokens: int, query_grid: int, detail: str, budget: int) -> List[str]:
    """The settings (one change each) under which the same run fits ``budget`` bytes. ``sizes``: capture.py's
    ``storage_bytes`` and ``resolution_name`` (passed in: this module does not import capture.py)."""
    storage_bytes, resolution_name = sizes

    def cost(layers=layers, kinds=kinds, query_grid=query_grid, detail=detail):
        return storage_bytes(layers, latent_hw, steps, branches, rows, kinds, tokens, query_grid, detail)["total"]

    out = []
    if detail == "per layer" and cost(detail="per resolution") <= budget:
        out.append(f"detail 'per resolution' ({_mb(cost(detail='per resolution'))})")
    levels = sorted({l.level for l in layers})
    if len(levels) > 1:
        for level in sorted(levels, key=lambda lv: cost(layers=[l for l in layers if l.level == lv])):
            one = cost(layers=[l for l in layers if l.level == level])
            if one <= budget:
                out.append(f"resolution '{resolution_name(level)}' ({_mb(one)})")
                break
    if len(kinds) > 1:
        for kind in kinds:
            if cost(kinds=(kind,)) <= budget:
                out.append(f"kinds '{kind}' ({_mb(cost(kinds=(kind,)))})")
    if "self" in kinds:
        fits = [q for q in range(query_grid - 1, 0, -1) if cost(query_grid=q) <= budget]
        if fits:
            out.append(f"query_grid {fits[0]} ({_mb(cost(query_grid=fits[0]))})")
    out.append(f"{SETTING} {math.ceil(cost() / 2 ** 20)} or more (0 = no limit)")
    return out


def check(sizes, maps, layers: Sequence[AttentionLayer], latent_hw, steps: int, branches: int, rows: int,
          tokens: int, steps_known: bool = True, held: int = 0):
    """Raise when the run at these sizes (or ``held``, the bytes already stored) needs more than ``maps.max_bytes``."""
    budget = getattr(maps, "max_bytes", None)
    if not budget or latent_hw is None:
        return
    storage_bytes = sizes[0]
    need = max(held, storage_bytes(layers, latent_hw, steps, branches, rows, maps.kinds, tokens, maps.query_grid,
                                   maps.detail)["total"])
    if need <= budget:
        return
    fits = alternatives(sizes, layers, latent_hw, steps, branches, rows, maps.kinds, tokens, maps.query_grid,
                        maps.detail, budget)
    counted = f"{steps} steps" if steps_known else f"{steps} step(s) so far, the schedule's length unknown"
    raise named_error(   # raised while the sampler runs: named here
        f"{WHAT}: the maps of this run ({counted}, latent {latent_hw[0]}x{latent_hw[1]}, {rows} row(s), {branches} "
        f"branch(es)) would take {_mb(need)}, over {SETTING} ({_mb(budget)}). Settings that fit: "
        f"{'; '.join(fits)}.")


def check_step(sizes, maps, record):
    """After a finished step, with the stored maps over ``maps.max_bytes`` (a run whose steps the capture could not
    count up front, or whose branches came in separate calls): stop with the same message, sized by the steps so
    far and the branches this step recorded."""
    layers, latent_hw, branches, rows, tokens = maps.sizing
    branches = max(branches, len({b for (_, _, b) in record.maps}))
    check(sizes, maps, layers, latent_hw, len(maps.steps), branches, rows, tokens, steps_known=False,
          held=maps.stored_bytes())
