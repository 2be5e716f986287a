"""RIVAL's cross-image self-attention: generated rows align with the reference row of the same CFG branch."""
from __future__ import annotations

import torch

from .controller import CallContext, Editor


class RivalAttentionEditor(Editor):
    """In every self-attention layer and both CFG branches, for timestep t > t_align the generated rows use the
    reference row's K and V instead of their own; for t <= t_align the concatenation [K_ref, K_gen], [V_ref, V_gen]
    (the residual is added after the full attention, as the paper's appendix corrects).

    The reference is row 0 of every chunk of the batch. The reference row itself sees [K_ref, K_ref] in the
    concatenation regime, which gives exactly its own attention (duplicated keys keep the softmax weights), so
    all rows stay in one batched attention call."""

    order = 10
    kinds = ("self",)

    def __init__(self, t_align: float):
        self.t_align = float(t_align)

    def active(self, ctx: CallContext) -> bool:
        return ctx.kind == "self" and ctx.rows_per_chunk > 1

    def edit_qkv(self, q, k, v, ctx):
        chunks, rows = len(ctx.cond_or_uncond), ctx.rows_per_chunk
        n, c = k.shape[1], k.shape[2]
        k4, v4 = k.view(chunks, rows, n, c), v.view(chunks, rows, n, c)
        k_ref, v_ref = k4[:, :1].expand(chunks, rows, n, c), v4[:, :1].expand(chunks, rows, n, c)
        if ctx.step.timestep > self.t_align:
            return q, k_ref.reshape(chunks * rows, n, c), v_ref.reshape(chunks * rows, n, c)
        k_cat = torch.cat([k_ref, k4], dim=2).reshape(chunks * rows, 2 * n, c)
        v_cat = torch.cat([v_ref, v4], dim=2).reshape(chunks * rows, 2 * n, c)
        return q, k_cat, v_cat
