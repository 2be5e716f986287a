"""Addressing: every transformer block of a UNet, numbered in execution order, with its resolution.

SD1.x/SD2.x have 16 (down 0-5, mid 6, up 7-15, MasaCtrl's numbering); SDXL has 70. A layer's ``key`` is the
``(block_name, block_number, index_in_spatial_transformer)`` triple ComfyUI uses for attention replace patches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

from ... import compat

PARTS = ("down", "mid", "up")
_PART_OF_BLOCK = {"input": "down", "middle": "mid", "output": "up"}


@dataclass(frozen=True)
class AttentionLayer:
    index: int                 # execution order, 0-based
    key: Tuple[str, int, int]  # ComfyUI patches_replace key
    part: str                  # down | mid | up
    level: int                 # number of 2x downsamplings before this block (token grid = latent / 2**level)
    channels: int
    heads: int

    def grid(self, latent_h: int, latent_w: int) -> Tuple[int, int]:
        f = 2 ** self.level
        return (latent_h + f - 1) // f, (latent_w + f - 1) // f


def enumerate_layers(unet) -> List[AttentionLayer]:
    """Walk ``input_blocks``, ``middle_block``, ``output_blocks`` in execution order."""
    SpatialTransformer, Downsample, Upsample = compat.unet_block_classes()

    layers: List[AttentionLayer] = []
    level = 0

    def visit(block_name, number, block):
        nonlocal level
        for module in block:
            if isinstance(module, SpatialTransformer):
                for j, tb in enumerate(module.transformer_blocks):
                    layers.append(AttentionLayer(index=len(layers), key=(block_name, number, j),
                                                 part=_PART_OF_BLOCK[block_name], level=level,
                                                 channels=int(tb.attn1.to_q.weight.shape[0]), heads=int(tb.n_heads)))
        for module in block:
            if isinstance(module, Downsample):
                level += 1
            elif isinstance(module, Upsample):
                level -= 1

    for i, block in enumerate(unet.input_blocks):
        visit("input", i, block)
    visit("middle", 0, unet.middle_block)
    for i, block in enumerate(unet.output_blocks):
        visit("output", i, block)
    return layers


# The cross-attention maps a mask is read from (P2Plus's local blend, KV Inject's masked mode), by token grid relative
# to the latent; "auto" is the papers' latent/4 (16x16 maps at 512 px on SD1.x), or the coarsest level a model with
# fewer levels has.
MAP_SIZE_AUTO = "auto"
MAP_SIZE_LEVELS = {"latent/1": 0, "latent/2": 1, "latent/4": 2, "latent/8": 3}
MAP_SIZES = (MAP_SIZE_AUTO,) + tuple(MAP_SIZE_LEVELS)
AUTO_MAP_LEVEL = MAP_SIZE_LEVELS["latent/4"]


def map_size_name(level: int) -> str:
    return f"latent/{2 ** level}"


def map_level(layers: Sequence[AttentionLayer], size: str) -> Optional[int]:
    """The level of a ``MAP_SIZES`` choice on a model with ``layers``: ``auto`` -> min(latent/4, the coarsest level
    with attention); an explicit size -> its level if the model has attention layers there, else None."""
    if size == MAP_SIZE_AUTO:
        return min(AUTO_MAP_LEVEL, max(l.level for l in layers))
    level = MAP_SIZE_LEVELS.get(size)
    return level if level is not None and any(l.level == level for l in layers) else None


def map_sizes_of(layers: Sequence[AttentionLayer]) -> List[str]:
    """The explicit ``MAP_SIZES`` a model offers (levels with attention layers), finest first."""
    return [map_size_name(level) for level in sorted({l.level for l in layers})]


def map_size_problem(layers: Sequence[AttentionLayer], name: str, size: str) -> str:
    """Why ``size`` (given to the input ``name``) has no level on this model, and what it offers."""
    auto = map_size_name(map_level(layers, MAP_SIZE_AUTO))
    return (f"`{name}` is '{size}', but this model has no cross-attention layers at that size. It has maps at "
            f"{', '.join(map_sizes_of(layers))} (of the latent); choose one of those, or {MAP_SIZE_AUTO} "
            f"(here {auto}).")


def self_attention_of(unet, layer: AttentionLayer):
    """The attn1 module (ComfyUI's CrossAttention: to_q, to_k, to_v, to_out) of ``layer`` in ``unet``."""
    SpatialTransformer = compat.unet_block_classes()[0]
    name, number, j = layer.key
    block = {"input": lambda: unet.input_blocks[number], "middle": lambda: unet.middle_block,
             "output": lambda: unet.output_blocks[number]}[name]()
    transformer = next(m for m in block if isinstance(m, SpatialTransformer))
    return transformer.transformer_blocks[j].attn1


def select_layers(layers: Sequence[AttentionLayer], start: int = 0, end: Optional[int] = None,
                  parts: Iterable[str] = PARTS, levels: Optional[Iterable[int]] = None) -> List[AttentionLayer]:
    """Layers with ``start <= index <= end`` in the given parts (down/mid/up) and levels (None = all)."""
    end = len(layers) - 1 if end is None else end
    parts = set(parts)
    levels = None if levels is None else set(levels)
    return [l for l in layers if start <= l.index <= end and l.part in parts and (levels is None or l.level in levels)]


def decoder_start(layers: Sequence[AttentionLayer]) -> int:
    """MasaCtrl's default start layer, defined so that it means the same on every family: the first decoder (up)
    layer at the second-finest resolution level that has attention. SD1.x/SD2.x (attention at levels 0, 1, 2):
    layer 10, MasaCtrl's SD1.5 default (skips the three coarsest decoder layers). SDXL (attention at levels 1 and 2
    only, 70 layers): layer 34, the first decoder layer (its coarsest decoder level is its second-finest)."""
    levels = sorted({l.level for l in layers})
    target = levels[1] if len(levels) > 1 else levels[0]
    ups = [l for l in layers if l.part == "up"]
    for layer in ups:
        if layer.level <= target:
            return layer.index
    return ups[0].index if ups else 0


@dataclass(frozen=True)
class DecoderBlock:
    """One decoder (output) block of the UNet: its ComfyUI number, the level its ResNet block runs at (feature grid =
    latent / 2**level), that ResNet block's output channels and whether the block has attention."""

    number: int
    level: int
    channels: int
    has_attention: bool

    def grid(self, latent_h: int, latent_w: int) -> Tuple[int, int]:
        f = 2 ** self.level
        return (latent_h + f - 1) // f, (latent_w + f - 1) // f


def enumerate_decoder_blocks(unet) -> List[DecoderBlock]:
    """The output blocks in execution order (SD1.x/SD2.x: 12, coarsest first; SDXL: 9)."""
    SpatialTransformer, Downsample, Upsample = compat.unet_block_classes()
    ResBlock = compat.resblock_class()
    level = sum(1 for block in unet.input_blocks for m in block if isinstance(m, Downsample))
    out = []
    for number, block in enumerate(unet.output_blocks):
        res = next((m for m in block if isinstance(m, ResBlock)), None)
        out.append(DecoderBlock(number=number, level=level, channels=int(getattr(res, "out_channels", 0)),
                                has_attention=any(isinstance(m, SpatialTransformer) for m in block)))
        level -= sum(1 for m in block if isinstance(m, Upsample))
    return out


def feature_block_default(blocks: Sequence[DecoderBlock]) -> int:
    """Plug-and-Play's feature layer, defined so that it means the same on every family: the second decoder block at
    the coarsest level that has attention (latent/4). SD1.x/SD2.x: block 4 (diffusers' up_blocks[1].resnets[1], PnP's
    choice); SDXL: block 1 (its decoder starts at latent/4)."""
    with_attention = [b for b in blocks if b.has_attention]
    if not with_attention:
        return blocks[len(blocks) // 2].number
    coarsest = max(b.level for b in with_attention)
    at_level = [b for b in with_attention if b.level == coarsest]
    return at_level[min(1, len(at_level) - 1)].number
