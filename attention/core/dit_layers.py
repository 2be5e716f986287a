"""Addressing on DiTs whose joint attention calls ``attn1_patch`` (Flux, Chroma, Qwen-Image): every joint-attention
block, numbered in execution order.

Flux and Chroma run ``double_blocks`` (separate text and image weights, one joint attention) and then
``single_blocks`` (one stream over the concatenated text + image tokens). A block's ``position`` is its place in
that order: double blocks 0..D-1, single blocks D..D+S-1 (FLUX.1 and Chroma: 19 + 38 = 57, positions 0..56, the
numbering Stable Flow uses for its vital layers). ``kind`` / ``index`` are what ComfyUI puts in
``transformer_options["block_type"]`` / ``["block_index"]`` while the block runs.

Qwen-Image runs one stack of ``transformer_blocks`` (60 in the 20B model), each a double-stream block (its own text
and image weights, one joint attention); ComfyUI reports them as ``block_type`` "double", so positions = indices.
SD3 / SD3.5 (ComfyUI's MMDiT) likewise run one stack of ``joint_blocks`` (38 in SD3.5 Large, 24 in Medium), named
"double" by mmdit_bridge.py, which also makes their joint attention call ``attn1_patch``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from . import mmdit_bridge

# Stable Flow (Avrahami et al., CVPR 2025): the layers of FLUX.1-dev whose removal changes the image most, in the
# joint numbering above: double blocks 0, 1, 2, 17, 18 and single blocks 6, 9, 34, 35, 37 (positions 25, 28, 53,
# 54, 56). Their attention injection replaces the edited image's image-token K/V by the reference's there only.
FLUX_DEPTHS = (19, 38)
VITAL_FLUX = ((0, 1, 2, 17, 18), (6, 9, 34, 35, 37))
# Qwen-Image (one stack of 60 joint blocks): no published vital-layer list. AttnRouter (Li and Ye, arXiv 2605.01480,
# on Qwen-Image-Edit-2511, the same 60 blocks) finds K/V injection in the early (L0-15) or late (L45-60) bands does
# not drive the edit; the middle band does. Default here: blocks [15, 45) of 60, the same relative band elsewhere.
QWEN_DEPTH = 60
QWEN_BAND = (15, 45)


@dataclass(frozen=True)
class DiTBlock:
    kind: str          # "double" | "single" (ComfyUI's block_type)
    index: int         # within its kind (ComfyUI's block_index)
    position: int      # execution order over both kinds
    heads: int
    head_dim: int

    @property
    def key(self) -> Tuple[str, int]:
        return self.kind, self.index

    def describe(self) -> str:
        return f"{self.kind} block {self.index} (position {self.position})"


def diffusion_model_of(model_patcher):
    base = getattr(model_patcher, "model", None)
    return getattr(base, "diffusion_model", None)


# the diffusion-model classes this addressing is for (HunyuanVideo reuses Flux's blocks on video latents: not here)
FLUX_LAYOUT_CLASSES = {("comfy.ldm.flux.model", "Flux"), ("comfy.ldm.chroma.model", "Chroma")}
QWEN_IMAGE_CLASSES = {("comfy.ldm.qwen_image.model", "QwenImageTransformer2DModel")}


def is_flux_layout(model_patcher) -> bool:
    """A Flux-layout DiT whose joint attention calls ``attn1_patch`` (Flux and Chroma in ComfyUI 0.3x)."""
    dm = diffusion_model_of(model_patcher)
    return (dm is not None and (type(dm).__module__, type(dm).__name__) in FLUX_LAYOUT_CLASSES
            and hasattr(dm, "double_blocks") and hasattr(dm, "single_blocks"))


def is_qwen_image(model_patcher) -> bool:
    """Qwen-Image's MMDiT (one stack of double-stream blocks whose joint attention calls ``attn1_patch``)."""
    dm = diffusion_model_of(model_patcher)
    return (dm is not None and (type(dm).__module__, type(dm).__name__) in QWEN_IMAGE_CLASSES
            and hasattr(dm, "transformer_blocks"))


def is_joint_attention_dit(model_patcher) -> bool:
    """A DiT this addressing covers: Flux layout (Flux, Chroma), Qwen-Image, or SD3 / SD3.5 (through the bridge)."""
    return is_flux_layout(model_patcher) or is_qwen_image(model_patcher) or mmdit_bridge.is_mmdit(model_patcher)


def calls_attn1_patch(model_patcher) -> bool:
    """Whether this model's own module reads ``attn1_patch`` (ComfyUI added it per family; Qwen-Image's module holds its
    attention, Flux/Chroma's is in comfy/ldm/flux/layers.py)."""
    import inspect
    import sys
    if mmdit_bridge.is_mmdit(model_patcher):
        return mmdit_bridge.has_hooks(model_patcher)
    dm = diffusion_model_of(model_patcher)
    names = ["comfy.ldm.flux.layers"] if is_flux_layout(model_patcher) else [type(dm).__module__]
    try:
        return all("attn1_patch" in inspect.getsource(sys.modules[n]) for n in names if n in sys.modules)
    except (OSError, TypeError):
        return False


def enumerate_blocks(model_patcher) -> List[DiTBlock]:
    dm = diffusion_model_of(model_patcher)
    blocks: List[DiTBlock] = []
    if mmdit_bridge.is_mmdit(model_patcher):
        for block in dm.joint_blocks:
            attn = block.x_block.attn
            heads = int(attn.num_heads)
            blocks.append(DiTBlock("double", len(blocks), len(blocks), heads, int(attn.head_dim)))
        return blocks
    if is_qwen_image(model_patcher):
        for block in dm.transformer_blocks:
            heads = int(block.num_attention_heads)
            blocks.append(DiTBlock("double", len(blocks), len(blocks), heads, int(block.attention_head_dim)))
        return blocks
    for block in dm.double_blocks:
        heads = int(block.num_heads)
        blocks.append(DiTBlock("double", len(blocks), len(blocks), heads, int(block.hidden_size) // heads))
    for i, block in enumerate(dm.single_blocks):
        heads = int(block.num_heads)
        blocks.append(DiTBlock("single", i, len(blocks), heads, int(block.hidden_dim) // heads))
    return blocks


def depths(blocks: Sequence[DiTBlock]) -> Tuple[int, int]:
    return sum(b.kind == "double" for b in blocks), sum(b.kind == "single" for b in blocks)


def _scaled(indices: Sequence[int], full: int, have: int) -> List[int]:
    """Indices of a ``full``-deep stack mapped to the same relative depth in a ``have``-deep one."""
    if have <= 0:
        return []
    if have == full:
        return list(indices)
    return sorted({round(i * (have - 1) / max(1, full - 1)) for i in indices})


def qwen_band(blocks: Sequence[DiTBlock]) -> List[DiTBlock]:
    """Qwen-Image's default: the middle band of joint blocks [15, 45) of 60 (QWEN_BAND), the same relative band on
    other depths (at least one block)."""
    n = len(blocks)
    lo = round(QWEN_BAND[0] * n / QWEN_DEPTH)
    hi = max(lo + 1, round(QWEN_BAND[1] * n / QWEN_DEPTH))
    return [b for b in blocks if lo <= b.position < hi]


def vital_blocks(blocks: Sequence[DiTBlock]) -> List[DiTBlock]:
    """Stable Flow's vital layers: exactly theirs on a 19 + 38 model (FLUX.1, Chroma), at the same relative depth in
    each stack on other depths. A single stack of double blocks (Qwen-Image, SD3 / SD3.5, for which no vital-layer
    list is published): ``qwen_band``."""
    doubles, singles = depths(blocks)
    if singles == 0:
        return qwen_band(blocks)
    want = {("double", i) for i in _scaled(VITAL_FLUX[0], FLUX_DEPTHS[0], doubles)}
    want |= {("single", i) for i in _scaled(VITAL_FLUX[1], FLUX_DEPTHS[1], singles)}
    return [b for b in blocks if b.key in want]


def select_blocks(blocks: Sequence[DiTBlock], start_layer: int) -> List[DiTBlock]:
    """-1: the family default (Stable Flow's vital layers; Qwen-Image's middle band); n >= 0: every block at
    position >= n (MasaCtrl's "from this layer on")."""
    if start_layer == -1:
        return vital_blocks(blocks)
    return [b for b in blocks if b.position >= start_layer]


def additive_mask(mask, device, dtype=torch.float32) -> Optional[torch.Tensor]:
    """ComfyUI's attention mask of a joint-attention call as an additive bias of 4 dims (a boolean mask: True =
    attend), None for none."""
    if mask is None:
        return None
    mask = mask.to(device)
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, device=device, dtype=dtype).masked_fill(~mask, float("-inf"))
    mask = mask.to(dtype)
    while mask.dim() < 4:
        mask = mask.unsqueeze(0 if mask.dim() == 2 else 1)
    return mask
