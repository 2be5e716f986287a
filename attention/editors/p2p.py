"""Prompt-to-Prompt and P2Plus editors: attention-map exchange between a source row and a target row.

Batch layout. The latent has two rows, 0 = source (reconstructs the real image), 1 = target (the edit); both start
from the same x_T. Inside a UNet call ``ctx.chunk_rows(0)`` are the cond rows and ``ctx.chunk_rows(1)`` the uncond
rows; within a chunk the first row is the source, the second the target.

What is exchanged, and when (``i`` = sampling step, ``N`` = steps; a step is replaced while ``i / N < tau``, the
pack's one schedule vocabulary, so tau = 1 replaces every step and tau = 0 none):
- cross-attention, cond branch, every layer, while ``i / N < cross_replace_end_percent`` (tau_c): the target's
  probability maps become the source's, column by column through an :class:`EditPlan` (replace: same token
  positions; refine: target tokens aligned to the source tokens, new tokens keep their own maps; reweight: chosen
  target tokens' maps scaled by c, on the replace mapping when the token counts match, else on the refine alignment;
  ``reweight`` words scale in the other modes too, as Prompt-to-Prompt composes its reweight controller with a
  replace/refine one). The values stay the target's own (``out_t = P_s V_t``).
- self-attention, cond branch, while ``i / N < self_replace_end_percent`` (tau_s), only in layers whose token grid
  is at most ``self_max_res`` x ``self_max_res``. Default 32 (32x32 = 1024 tokens), as the P2Plus/StyleDiffusion
  code and the authors' later null-text notebook do; the first Prompt-to-Prompt notebook used 16 (only the 16x16 and
  8x8 layers of SD1.x at 512 px). The limit is in tokens, as in the papers' code, so it selects fewer layers at
  larger images.
- P2Plus: self-attention in the **uncond** branch, same layers, while ``i / N < uncond_self_replace_end_percent``
  (tau_u). With tau_u = 0 this is exactly Prompt-to-Prompt.

Cheap where possible. A replaced map ``softmax(q_s k_s^T)`` is what the target gets when its queries and keys are
the source's, so self-attention replacement and word-swap cross-attention replacement only copy the source row's
q and k into the target row and let ComfyUI's own attention kernel run (no probability tensor is ever built).
Only refine/reweight cross-attention (a column permutation / scaling of the maps) and the local-blend recording
(16x16-level maps of chosen words) compute probabilities explicitly; both are small (77 keys).

Local blend (``LocalBlend``): the chosen words' cross-attention maps (cond rows, after the exchange, the layers at
level 2 = latent / 4, i.e. 16x16 for SD1.x at 512 px; summed over heads, layers and all steps so far), 3x3 max-pooled,
upsampled (nearest) to the latent, normalised by their maximum and thresholded: the target row keeps its own latent
inside the union of the source's and the target's masks and takes the source row's outside. It runs as a post-CFG
function: it rewrites the target's x0 prediction so that the sampler's DDIM/Euler step
``x' = x + (s' - s) (x - x0) / s`` lands exactly on ``x_src' + m (x_tgt' - x_src')`` (exact for the ddim and euler
samplers, which the pack's workflows use).

Modules: tokens.py (CLIP token sequences, alignment), edit_plan.py (EditPlan), local_blend.py (LocalBlend),
context.py (per-step context patches: null-text's unconditional embeddings, StyleDiffusion's values), edit.py
(``build_edit``: the whole P2Plus assembly the node calls).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from ...artifacts import named_error, node_name
from ..core.controller import CallContext, Editor, attention_probs
from .edit_plan import EditPlan
from .local_blend import LocalBlend
from ..core.schedule import Schedule

DEFAULT_SELF_MAX_RES = 32


@dataclass
class _CallPlan:
    swap_rows: List[Tuple[int, int]]    # (source row, target row) pairs whose q/k the target takes
    explicit: bool                      # map the cond target's cross-attention columns explicitly
    record: bool                        # record local-blend maps from this call
    step: int
    cond: List[int]


class P2PlusEditor(Editor):
    """Prompt-to-Prompt (cond branch) plus P2Plus (uncond self-attention) on a 2-row batch (source, target)."""

    order = 50
    kinds = ("self", "cross")

    def __init__(self, plan: EditPlan, schedule: Schedule, cross_replace_end_percent: float,
                 self_replace_end_percent: float, uncond_self_replace_end_percent: float,
                 self_max_res: int = DEFAULT_SELF_MAX_RES,
                 blend: Optional[LocalBlend] = None):
        self.plan = plan
        self.sched = schedule
        self.cross_end = float(cross_replace_end_percent)
        self.self_end = float(self_replace_end_percent)
        self.uncond_self_end = float(uncond_self_replace_end_percent)
        self.self_max_tokens = int(self_max_res) ** 2
        self.blend = blend
        self.node = node_name()
        self._key = f"p2plus_{id(self)}"
        self._word_swap = plan.word_swap
        self._device_cache: Dict[tuple, tuple] = {}

    def schedule(self):
        return self.sched.sigmas

    def begin_run(self):
        if self.blend is not None:
            self.blend.reset()

    def _rows(self, ctx: CallContext, which: int) -> List[int]:
        rows = ctx.chunk_rows(which)
        if rows and ctx.rows_per_chunk != 2:
            raise named_error(
                f"{self.node}: expected a 2-row latent (row 0 source, row 1 target), got {ctx.rows_per_chunk} rows "
                f"per branch. Sample the LATENT output of P2Plus Controller as it is, with its positive/negative.")
        return rows

    def active(self, ctx: CallContext) -> bool:
        step = self.sched.step(ctx.step)
        f = self.sched.fraction(step)
        cond, uncond = self._rows(ctx, 0), self._rows(ctx, 1)
        swap, explicit, record = [], False, False
        if ctx.kind == "cross":
            if cond and f < self.cross_end:
                if self._word_swap:
                    swap.append((cond[0], cond[1]))
                else:
                    explicit = True
            record = bool(cond) and self.blend is not None and ctx.layer.level == self.blend.level
        else:
            small = ctx.grid[0] * ctx.grid[1] <= self.self_max_tokens
            if small and cond and f < self.self_end:
                swap.append((cond[0], cond[1]))
            if small and uncond and f < self.uncond_self_end:
                swap.append((uncond[0], uncond[1]))
        if not (swap or explicit or record):
            return False
        ctx.scratch[self._key] = _CallPlan(swap_rows=swap, explicit=explicit, record=record, step=step, cond=cond)
        return True

    def edit_qkv(self, q, k, v, ctx):
        call: _CallPlan = ctx.scratch[self._key]
        if call.swap_rows:
            src = [s for s, _ in call.swap_rows]
            tgt = [t for _, t in call.swap_rows]
            q, k = q.clone(), k.clone()
            q[tgt] = q[src]
            k[tgt] = k[src]
        if call.record and not call.explicit:
            self.blend.record(call.step, ctx.layer.index, attention_probs(q[call.cond], k[call.cond], ctx.heads),
                              ctx.grid)
        return q, k, v

    def needs_probs(self, ctx: CallContext) -> bool:
        return ctx.scratch[self._key].explicit

    def _plan_tensors(self, device, nk: int):
        key = (device, nk)
        if key not in self._device_cache:
            if nk != self.plan.mapper.numel():
                raise named_error(
                    f"{self.node}: the cross-attention has {nk} context tokens, expected {self.plan.mapper.numel()}. "
                    f"Use the positive/negative outputs of P2Plus Controller, not other conditioning.")
            eq = None if self.plan.equalizer is None else self.plan.equalizer.to(device)
            self._device_cache[key] = (self.plan.mapper.to(device), self.plan.aligned.to(device), eq)
        return self._device_cache[key]

    def edit_probs(self, probs, ctx):
        call: _CallPlan = ctx.scratch[self._key]
        if call.explicit:
            s, t = call.cond
            mapper, aligned, eq = self._plan_tensors(probs.device, probs.shape[-1])
            new = probs[s][..., mapper] * aligned + probs[t] * (1 - aligned)
            if eq is not None:
                new = new * eq
            probs = probs.clone()
            probs[t] = new
            if call.record:
                self.blend.record(call.step, ctx.layer.index, probs[call.cond], ctx.grid)
        return probs
