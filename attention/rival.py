"""RIVAL's cross-image self-attention: generated rows align with the reference row of the same CFG branch."""
from __future__ import annotations

import torch

from .controller import CallContext, Editor


class RivalAttentionEditor(Editor):
    """In every self-attention layer and both CFG branches, for timestep t > t_align the generated rows use the
    reference row's K and V instead of their own; for t <= t_align the concatenation [K_ref, K_gen], [V_ref, V_gen]
    (the residual is added after the full attention, as the paper's appendix corrects).

    The reference is row 0 of every chunk of the batch, or (cache mode) comes from a ReferenceKV recorded per
    CFG branch. In the batch the reference row sees [K_ref, K_ref] in the concatenation regime, which gives exactly
    its own attention (duplicated keys keep the softmax weights), so all rows stay in one batched attention call."""

    order = 10
    kinds = ("self",)

    def __init__(self, t_align: float, reference=None):
        self.t_align = float(t_align)
        self.reference = reference  # a filled ReferenceKV: the reference row is not in the batch (cache mode)

    def active(self, ctx: CallContext) -> bool:
        return ctx.kind == "self" and (ctx.rows_per_chunk > 1 or self.reference is not None)

    def reference_kv(self, k, v, ctx):
        chunks, rows = len(ctx.cond_or_uncond), ctx.rows_per_chunk
        n, c = k.shape[1], k.shape[2]
        if self.reference is None:
            k4, v4 = k.view(chunks, rows, n, c), v.view(chunks, rows, n, c)
            return k4[:, :1], v4[:, :1]
        step = self.reference.chain_index(ctx.step.sigma, "RIVAL Align Sampler")
        pairs = [self.reference.get(step, ctx.layer, k.device, k.dtype, int(b)) for b in ctx.cond_or_uncond]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])  # (chunks, 1, n, c)

    def edit_qkv(self, q, k, v, ctx):
        chunks, rows = len(ctx.cond_or_uncond), ctx.rows_per_chunk
        n, c = k.shape[1], k.shape[2]
        k4, v4 = k.view(chunks, rows, n, c), v.view(chunks, rows, n, c)
        k_ref, v_ref = self.reference_kv(k, v, ctx)
        k_ref, v_ref = k_ref.expand(chunks, rows, n, c), v_ref.expand(chunks, rows, n, c)
        if ctx.step.timestep > self.t_align:
            return q, k_ref.reshape(chunks * rows, n, c), v_ref.reshape(chunks * rows, n, c)
        k_cat = torch.cat([k_ref, k4], dim=2).reshape(chunks * rows, 2 * n, c)
        v_cat = torch.cat([v_ref, v4], dim=2).reshape(chunks * rows, 2 * n, c)
        return q, k_cat, v_cat
