"""RIVAL's cross-image attention in the joint attention of DiTs whose joint attention calls ``attn1_patch`` (Flux,
Chroma, Qwen-Image).

In every block (Flux/Chroma: double and single; Qwen-Image: its one stack of joint blocks), for the generated rows
of each CFG half:
- while ``step / N < replace_end_percent`` (RIVAL's t > t_align): their image-token keys/values are replaced by the
  reference's at the same step and half (text tokens keep their own), every query attending over the joint
  sequence as usual (KV Inject's mutual mode);
- afterwards: the reference's image-token keys/values are appended to their own joint sequence, so every query
  attends over [own text ; own image ; reference image] (RIVAL's concatenation).

RoPE: ComfyUI rotates q and k after this patch with the ``pe`` the patch returns. Appending the reference's rows of
``pe`` (``pe[:, :, img_slice]``) to it gives the appended keys the rotation of their own image positions, the one they
had in the reference's pass; q (shorter than the new ``pe``) is rotated with its leading rows, which ComfyUI's RoPE
trims to q's length (the same layout ComfyUI's own Flux KV cache node relies on for reference-image tokens).

The reference comes from row 0 of every CFG chunk (``reference=None``: the photo's row runs in the batch) or from a
DiTReferenceKV recorded along the inversion chain (cache). In the batch layout the reference row must keep its own
attention: its appended columns are masked out (an additive -inf mask on the extended keys only; the reference row's
result then equals its unmasked attention up to float rounding, ~1e-7 per call).

Qwen-Image (comfy/ldm/qwen_image/model.py): its joint attention calls the same ``attn1_patch`` (q, k, v before RoPE,
``pe`` = its 3-axis RoPE table over [text ; image] in that order, ``img_slice``), so the keys/values and ``pe`` rows are
extended as above. But it builds the kernel's mask before the patch and ignores the ``attn_mask`` a patch returns;
the mask of the appended columns is set in the kernel call instead, by ``DiTRivalKernelMask`` (an
``optimized_attention_override``, which Qwen-Image's attention passes its transformer_options to).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ... import compat
from ...artifacts import named_error, node_name
from ..core.dit_layers import DiTBlock, additive_mask
from ..store.dit_reference import RECORDING_KEY, step_of


def extended_mask(attn_mask: Optional[torch.Tensor], rows: int, length: int, extra: int, hidden_rows: Sequence[int],
                  dtype, device) -> Optional[torch.Tensor]:
    """The attention mask for ``extra`` keys appended to ``length`` keys: any mask the model had, widened (the new
    columns open), and the new columns closed for ``hidden_rows``. None when nothing needs masking."""
    if attn_mask is None and not hidden_rows:
        return None
    mask = torch.zeros((rows, 1, 1, length + extra), dtype=dtype, device=device)
    if hidden_rows:
        mask[list(hidden_rows), :, :, length:] = float("-inf")
    if attn_mask is None:
        return mask
    return torch.nn.functional.pad(additive_mask(attn_mask, device, dtype), (0, extra)) + mask


class DiTRival(compat.PatchObject):
    def __init__(self, sigmas: torch.Tensor, blocks: Sequence[DiTBlock], replace_end_percent: float, tokens: int,
                 reference=None, steps: Optional[Sequence[int]] = None, mask_in_kernel: bool = False):
        self.sigmas = sigmas.detach().float().cpu()
        self.total = int(self.sigmas.numel()) - 1
        self.blocks = {b.key: b for b in blocks}
        self.replace_end = float(replace_end_percent)
        self.tokens = int(tokens)
        self.reference = reference       # None: row 0 of each CFG chunk (batch layout); else a filled DiTReferenceKV
        self.steps = set(range(self.total)) if steps is None else set(int(s) for s in steps)
        self.mask_in_kernel = bool(mask_in_kernel)   # Qwen-Image: DiTRivalKernelMask masks, not this patch
        self.node = node_name()   # raised inside the sampler: the errors name the node that built the patch

    def reference_kv(self, k, v, step, block, branches, s0, s1):
        """The reference's image-token K and V per CFG chunk: ``(chunks, 1, heads, tokens, head_dim)``."""
        if self.reference is None:
            rows = k.shape[0] // len(branches)
            k5 = k.view(len(branches), rows, *k.shape[1:])
            v5 = v.view(len(branches), rows, *v.shape[1:])
            return k5[:, :1, :, s0:s1], v5[:, :1, :, s0:s1]
        pairs = [self.reference.get(step, block, k.device, k.dtype, int(b)) for b in branches]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def __call__(self, q, k, v, pe=None, attn_mask=None, extra_options=None):
        options = extra_options or {}
        if options.get(RECORDING_KEY) is not None:   # the reference's own forward (cache fill): record, never edit
            return {}
        block = self.blocks.get((options.get("block_type"), options.get("block_index")))
        step = step_of(options, self.sigmas)
        if block is None or step is None or step not in self.steps:
            return {}
        s0, s1 = options["img_slice"]
        if s1 - s0 != self.tokens:
            raise named_error(
                f"{self.node}: the sampled latent has {s1 - s0} image tokens, the inversion's latent has "
                f"{self.tokens}; sample at the inverted image's size, without reference latents (Flux Kontext, "
                f"Qwen-Image-Edit).")
        branches = list(options.get("cond_or_uncond") or [0])
        if self.reference is not None and 1 in branches and self.reference.branches < 2:
            raise named_error(
                f"{self.node}: the sampler runs an unconditional half but the reference was recorded for the "
                f"conditional half only (cfg 1); sample at the cfg the reference was recorded for.")
        chunks = len(branches)
        rows = k.shape[0] // chunks
        k_ref, v_ref = self.reference_kv(k, v, step, block, branches, s0, s1)
        if step / self.total < self.replace_end:    # replacement: the reference's image K/V instead of their own
            k, v = k.clone(), v.clone()
            k.view(chunks, rows, *k.shape[1:])[:, :, :, s0:s1] = k_ref
            v.view(chunks, rows, *v.shape[1:])[:, :, :, s0:s1] = v_ref
            return {"k": k, "v": v}
        n = s1 - s0
        shape = (chunks, rows) + tuple(k_ref.shape[2:])
        k_ext = torch.cat([k, k_ref.expand(shape).reshape(chunks * rows, *k_ref.shape[2:])], dim=2)
        v_ext = torch.cat([v, v_ref.expand(shape).reshape(chunks * rows, *v_ref.shape[2:])], dim=2)
        out = {"k": k_ext, "v": v_ext}
        if pe is not None:
            out["pe"] = torch.cat([pe, pe[:, :, s0:s1]], dim=2)
        if self.mask_in_kernel:
            return out
        hidden = [c * rows for c in range(chunks)] if self.reference is None else []
        mask = extended_mask(attn_mask, k.shape[0], k.shape[2], n, hidden, q.dtype, q.device)
        if mask is not None:
            out["attn_mask"] = mask
        return out


class DiTRivalKernelMask(compat.PatchObject):
    """``optimized_attention_override`` for Qwen-Image: on a joint-attention call whose keys RIVAL extended (more
    keys than queries), the kernel's mask widened by the appended columns and, in the batch layout
    (``batch_layout``), those columns closed for the photo's row (row 0 of each CFG chunk). Other calls pass
    through unchanged (to ``previous``, an override already installed, if any)."""

    def __init__(self, batch_layout: bool, previous=None):
        self.batch_layout = bool(batch_layout)
        self.previous = previous

    def __call__(self, func, q, k, v, heads, mask=None, *args, **kwargs):
        extra = k.shape[-2] - q.shape[-2]
        if kwargs.get("skip_reshape") and extra > 0:
            options = kwargs.get("transformer_options") or {}
            chunks = len(options.get("cond_or_uncond") or [0])
            rows = k.shape[0] // chunks
            hidden = [c * rows for c in range(chunks)] if self.batch_layout else []
            mask = extended_mask(mask, k.shape[0], q.shape[-2], extra, hidden, q.dtype, q.device)
        if self.previous is not None:
            return self.previous(func, q, k, v, heads, mask, *args, **kwargs)
        return func(q, k, v, heads, mask, *args, **kwargs)
