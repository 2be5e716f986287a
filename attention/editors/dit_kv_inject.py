"""KV injection in the joint attention of DiTs (Flux, Chroma, Qwen-Image, SD3.5): in the chosen double/single blocks,
from the chosen step on, the source's image-token keys and values at the same step and CFG half either replace the
target's (``mutual``: Stable Flow's attention injection, MasaCtrl's mutual self-attention) or are appended to the
joint sequence (``union``: every query attends over [own text ; own image ; source image], the appended keys with
the rotary rows of their own image positions, as RIVAL's concatenation in dit_rival.py). Text tokens keep their own
K/V.

Installed as an ``attn1_patch`` (ComfyUI's hook in comfy/ldm/flux/layers.py and comfy/ldm/qwen_image/model.py): it
returns a new k and v, never edits the tensors it is given; ComfyUI applies RoPE afterwards by position, so the
source's keys at the same image positions are rotated exactly as in the source's own pass (dit_reference.py says
why).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from ... import compat
from ...artifacts import named_error, node_name
from ..core.dit_layers import DiTBlock
from ..store.dit_reference import RECORDING_KEY, step_of
from .dit_rival import extended_mask

DIT_MODES = ("mutual", "union")


class DiTKVInject(compat.PatchObject):
    def __init__(self, reference, blocks: Sequence[DiTBlock], steps: Iterable[int], tokens: int,
                 mode: str = "mutual", text_mask: bool = False):
        self.reference = reference    # a DiTReferenceKV, or a PartialReference of one
        self.blocks = {b.key: b for b in blocks}
        self.tokens = int(tokens)
        self.steps = set(int(s) for s in steps)
        self.mode = mode
        self.text_mask = text_mask   # Qwen-Image hands the patch its text mask, not the joint mask it attends with
        self.node = node_name()

    def __call__(self, q, k, v, pe=None, attn_mask=None, extra_options=None):
        options = extra_options or {}
        if options.get(RECORDING_KEY) is not None:   # the source's own forward (recompute mode): record, not edit
            return {}
        key = (options.get("block_type"), options.get("block_index"))
        if key not in self.blocks:
            return {}
        step = step_of(options, self.reference.inversion.sigmas)
        if step is None or step not in self.steps:
            return {}
        s0, s1 = options["img_slice"]
        if options.get("reference_image_num_tokens"):
            raise named_error(
                f"{self.node}: the sampler's conditioning carries reference latents (Flux Kontext / Qwen-Image-Edit "
                f"style, {list(options['reference_image_num_tokens'])} extra image tokens in the joint sequence); KV "
                f"Inject replaces the generated image's tokens only and does not support reference latents yet: "
                f"sample without them.")
        if s1 - s0 != self.tokens:
            h, w = self.reference.inversion.latent_shape[-2:]
            raise named_error(
                f"{self.node}: the sampled latent has {s1 - s0} image tokens, the inversion's latent ({w * 8}x{h * 8} "
                f"px) has {self.tokens}; sample at the inverted image's size.")
        branches = list(options.get("cond_or_uncond") or [0])
        if 1 in branches and self.reference.branches < 2:
            raise named_error(
                f"{self.node}: the sampler runs classifier-free guidance (an unconditional half) but `negative` is "
                f"not connected. Each CFG half attends to the source run with that half's prompt: connect the same "
                f"negative conditioning the sampler gets (or sample at cfg 1, as guidance-distilled Flux does).")
        rows = k.shape[0] // len(branches)
        if self.mode == "union":
            if self.text_mask and attn_mask is not None:
                raise named_error(
                    f"{self.node}: mode union on Qwen-Image with an attention mask in the conditioning: ComfyUI's "
                    f"Qwen-Image attention builds its mask before the patch and takes none back, so the appended "
                    f"source tokens cannot be given their mask columns. Use mode mutual, or conditioning without a "
                    f"mask.")
            refs = [self.reference.get(step, self.blocks[key], k.device, k.dtype, int(b)) for b in branches]
            out = {"k": torch.cat([k, torch.cat([r[0].expand(rows, -1, -1, -1) for r in refs])], dim=2),
                   "v": torch.cat([v, torch.cat([r[1].expand(rows, -1, -1, -1) for r in refs])], dim=2)}
            if pe is not None:
                out["pe"] = torch.cat([pe, pe[:, :, s0:s1]], dim=2)
            mask = extended_mask(attn_mask, k.shape[0], k.shape[2], s1 - s0, [], q.dtype, q.device)
            if mask is not None:
                out["attn_mask"] = mask
            return out
        k, v = k.clone(), v.clone()
        for chunk, branch in enumerate(branches):
            k_ref, v_ref = self.reference.get(step, self.blocks[key], k.device, k.dtype, int(branch))
            r = chunk * rows
            k[r:r + rows, :, s0:s1] = k_ref
            v[r:r + rows, :, s0:s1] = v_ref
        return {"k": k, "v": v}
