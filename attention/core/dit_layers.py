"""Addressing on Flux-layout DiTs (Flux, Chroma): every joint-attention block, numbered in execution order.

Flux and Chroma run ``double_blocks`` (separate text and image weights, one joint attention) and then
``single_blocks`` (one stream over the concatenated text + image tokens). A block's ``position`` is its place in
that order: double blocks 0..D-1, single blocks D..D+S-1 (FLUX.1 and Chroma: 19 + 38 = 57, positions 0..56, the
numbering Stable Flow uses for its vital layers). ``kind`` / ``index`` are what ComfyUI puts in
``transformer_options["block_type"]`` / ``["block_index"]`` while the block runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

# Stable Flow (Avrahami et al., CVPR 2025): the layers of FLUX.1-dev whose removal changes the image most, in the
# joint numbering above: double blocks 0, 1, 2, 17, 18 and single blocks 6, 9, 34, 35, 37 (positions 25, 28, 53,
# 54, 56). Their attention injection replaces the edited image's image-token K/V by the reference's there only.
FLUX_DEPTHS = (19, 38)
VITAL_FLUX = ((0, 1, 2, 17, 18), (6, 9, 34, 35, 37))


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


def is_flux_layout(model_patcher) -> bool:
    """A Flux-layout DiT whose joint attention calls ``attn1_patch`` (Flux and Chroma in ComfyUI 0.3x)."""
    dm = diffusion_model_of(model_patcher)
    return (dm is not None and (type(dm).__module__, type(dm).__name__) in FLUX_LAYOUT_CLASSES
            and hasattr(dm, "double_blocks") and hasattr(dm, "single_blocks"))


def enumerate_blocks(model_patcher) -> List[DiTBlock]:
    dm = diffusion_model_of(model_patcher)
    blocks: List[DiTBlock] = []
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


def vital_blocks(blocks: Sequence[DiTBlock]) -> List[DiTBlock]:
    """Stable Flow's vital layers: exactly theirs on a 19 + 38 model (FLUX.1, Chroma), at the same relative depth in
    each stack on other depths."""
    doubles, singles = depths(blocks)
    want = {("double", i) for i in _scaled(VITAL_FLUX[0], FLUX_DEPTHS[0], doubles)}
    want |= {("single", i) for i in _scaled(VITAL_FLUX[1], FLUX_DEPTHS[1], singles)}
    return [b for b in blocks if b.key in want]


def select_blocks(blocks: Sequence[DiTBlock], start_layer: int) -> List[DiTBlock]:
    """-1: Stable Flow's vital layers; n >= 0: every block at position >= n (MasaCtrl's "from this layer on")."""
    if start_layer == -1:
        return vital_blocks(blocks)
    return [b for b in blocks if b.position >= start_layer]
