"""RIVAL's cross-image self-attention: generated rows align with the reference row of the same CFG branch."""
from __future__ import annotations

from typing import Callable, List, Tuple

import torch

from ..core.controller import CallContext, Editor
from ..core.schedule import Schedule


class RowPieces:
    """An attention kernel run separately on row ranges ``(start, stop, keys)`` of the batch, each range reading only
    its first ``keys`` keys; outputs are concatenated in row order. Attention is independent per row, so this is
    the single call's result, while each call's score matrix stays as small as the stock call's."""

    def __init__(self, kernel: Callable, pieces: List[Tuple[int, int, int]]):
        self.kernel = kernel
        self.pieces = pieces

    def __call__(self, q, k, v):
        outs = []
        for start, stop, keys in self.pieces:
            k_i, v_i = k[start:stop], v[start:stop]
            if keys < k.shape[1]:
                k_i, v_i = k_i[:, :keys].contiguous(), v_i[:, :keys].contiguous()
            outs.append(self.kernel(q[start:stop], k_i, v_i))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


class RivalAttentionEditor(Editor):
    """In every self-attention layer and both CFG branches, while ``step / N < replace_end_percent`` (RIVAL's
    t > t_align) the generated rows use the reference row's K and V instead of their own; afterwards the
    concatenation [K_ref, K_gen], [V_ref, V_gen]
    (the residual is added after the full attention, as the paper's appendix corrects).

    The reference is row 0 of every chunk of the batch, or (cache mode) comes from a ReferenceKV recorded per
    CFG branch. In the batch the reference row sees [K_ref, K_ref] in the concatenation regime, which gives exactly
    its own attention (duplicated keys keep the softmax weights); editors after this one see that layout, but the
    kernel itself gives the reference row only its own n keys.

    The concatenation regime runs the kernel once per CFG branch: a single call over 2n keys would hold a score
    matrix twice the stock one, which on memory-bound kernels (CPU, sub-quadratic attention) costs more than 2x."""

    order = 10
    kinds = ("self",)

    def __init__(self, replace_end_percent: float, schedule: Schedule, reference=None):
        self.replace_end_percent = float(replace_end_percent)
        self.sched = schedule
        self.reference = reference  # a filled ReferenceKV: the reference row is not in the batch (cache mode)

    def schedule(self):
        return self.sched.sigmas

    def active(self, ctx: CallContext) -> bool:
        return ctx.kind == "self" and (ctx.rows_per_chunk > 1 or self.reference is not None)

    def reference_kv(self, k, v, ctx) -> Tuple[torch.Tensor, torch.Tensor]:
        """The reference row's K and V of every chunk, broadcast over its rows: (chunks, rows, n, c) views."""
        chunks, rows = len(ctx.cond_or_uncond), ctx.rows_per_chunk
        n, c = k.shape[1], k.shape[2]
        if self.reference is None:
            k4, v4 = k.view(chunks, rows, n, c), v.view(chunks, rows, n, c)
            return k4[:, :1].expand(chunks, rows, n, c), v4[:, :1].expand(chunks, rows, n, c)
        step = self.sched.step(ctx.step)
        pairs = [self.reference.get(step, ctx.layer, k.device, k.dtype, int(b)) for b in ctx.cond_or_uncond]
        k_ref, v_ref = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])  # (chunks, 1, n, c)
        return k_ref.expand(chunks, rows, n, c), v_ref.expand(chunks, rows, n, c)

    def pieces(self, ctx: CallContext, n: int) -> List[Tuple[int, int, int]]:
        """Row ranges of the concatenation regime's kernel calls: one per CFG branch; in the batch layout the
        reference row gets its own call over its n keys (the duplicate half would double its cost for nothing)."""
        rows, out = ctx.rows_per_chunk, []
        for chunk in range(len(ctx.cond_or_uncond)):
            start = chunk * rows
            if self.reference is None:
                out.append((start, start + 1, n))
                start += 1
            out.append((start, (chunk + 1) * rows, 2 * n))
        return out

    def edit_qkv(self, q, k, v, ctx):
        chunks, rows = len(ctx.cond_or_uncond), ctx.rows_per_chunk
        n, c = k.shape[1], k.shape[2]
        k_ref, v_ref = self.reference_kv(k, v, ctx)
        if self.sched.fraction(self.sched.step(ctx.step)) < self.replace_end_percent:
            return q, k_ref.reshape(chunks * rows, n, c), v_ref.reshape(chunks * rows, n, c)
        k_cat = torch.cat([k_ref, k.view(chunks, rows, n, c)], dim=2).view(chunks * rows, 2 * n, c)
        v_cat = torch.cat([v_ref, v.view(chunks, rows, n, c)], dim=2).view(chunks * rows, 2 * n, c)
        if ctx.kernel is not None:
            ctx.kernel = RowPieces(ctx.kernel, self.pieces(ctx, n))
        return q, k_cat, v_cat
