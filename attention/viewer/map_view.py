"""Drawing attention maps as a labelled image grid with a colour scale (PIL's default font), and as raw masks.

Layout (all sizes in pixels): a margin of ``PAD`` around and between cells; each cell is a label band of
``LABEL_LINES`` text lines above a ``tile_h x tile_w`` tile; ``columns`` cells per row (0 = ceil(sqrt(n)));
a colour scale band of ``scale_height()`` under the grid. ``layout`` gives the numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

PAD = 4
LABEL_LINES = 3
BAR_H = 10
OVERLAY_ALPHA = 0.6
NORMALIZE = ("per tile", "shared")
# viridis, sampled at 5 points and interpolated linearly
_ANCHORS = torch.tensor([[0.267, 0.005, 0.329], [0.229, 0.322, 0.546], [0.128, 0.567, 0.551],
                         [0.369, 0.789, 0.383], [0.993, 0.906, 0.144]])


def font():
    return ImageFont.load_default()


def line_height(f=None) -> int:
    f = f or font()
    try:
        box = f.getbbox("Ag|")
        return int(box[3]) + 3
    except AttributeError:  # very old Pillow
        return int(f.getsize("Ag|")[1]) + 3


def scale_height(f=None) -> int:
    return BAR_H + line_height(f) + PAD


@dataclass(frozen=True)
class Layout:
    n: int
    columns: int
    rows: int
    tile_h: int
    tile_w: int
    label_h: int
    width: int
    height: int

    def tile_origin(self, i: int) -> Tuple[int, int]:
        """(x, y) of the top-left corner of tile i (below its label band)."""
        r, c = divmod(i, self.columns)
        return PAD + c * (self.tile_w + PAD), PAD + r * (self.label_h + self.tile_h + PAD) + self.label_h


def layout(n: int, tile_hw: Tuple[int, int], columns: int = 0) -> Layout:
    cols = columns if columns and columns > 0 else max(1, math.ceil(math.sqrt(n)))
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    th, tw = int(tile_hw[0]), int(tile_hw[1])
    label_h = LABEL_LINES * line_height() + 2
    width = PAD + cols * (tw + PAD)
    height = PAD + rows * (label_h + th + PAD) + scale_height()
    return Layout(n=n, columns=cols, rows=rows, tile_h=th, tile_w=tw, label_h=label_h, width=width, height=height)


def colorize(v: torch.Tensor) -> torch.Tensor:
    """(..., ) values in [0, 1] -> (..., 3) RGB with the viridis-like scale."""
    v = v.clamp(0, 1) * (len(_ANCHORS) - 1)
    lo = v.floor().long().clamp(max=len(_ANCHORS) - 2)
    t = (v - lo.float()).unsqueeze(-1)
    return _ANCHORS[lo] * (1 - t) + _ANCHORS[lo + 1] * t


def upsample(m: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    return F.interpolate(m[None, None].float(), size=tuple(hw), mode="bilinear", align_corners=False)[0, 0]


def _fit(draw, text: str, width: int, f) -> str:
    def w(s):
        try:
            return draw.textlength(s, font=f)
        except AttributeError:
            return f.getsize(s)[0]
    if w(text) <= width:
        return text
    while text and w(text + "..") > width:
        text = text[:-1]
    return text + ".."


def render(maps: Sequence[torch.Tensor], labels: Sequence[Sequence[str]], tile_hw: Tuple[int, int],
           background: Optional[torch.Tensor] = None, normalize: str = "per tile", columns: int = 0,
           points: Optional[Sequence[Optional[Tuple[float, float]]]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``maps``: (h, w) tensors; ``labels``: lines per tile; ``background``: (H, W, 3) in [0, 1] at ``tile_hw``
    or None. Returns (IMAGE (1, H, W, 3), MASK (n, tile_h, tile_w) of the raw upsampled maps)."""
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}")
    n = len(maps)
    lay = layout(n, tile_hw, columns)
    raw = torch.stack([upsample(m, tile_hw) for m in maps]).clamp(0, 1) if n else torch.zeros(0, *tile_hw)
    if normalize == "shared":
        top = float(raw.max()) if n else 1.0
        scaled = raw / max(top, 1e-12)
    else:
        top = None
        scaled = raw / raw.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    heat = colorize(scaled)                                                    # (n, th, tw, 3)
    if background is not None:
        bg = background[..., :3].float().clamp(0, 1)
        heat = bg[None] * (1 - OVERLAY_ALPHA) + heat * OVERLAY_ALPHA

    canvas = Image.new("RGB", (lay.width, lay.height), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    f = font()
    lh = line_height(f)
    for i in range(n):
        x, y = lay.tile_origin(i)
        tile = Image.fromarray((heat[i].numpy() * 255).round().astype(np.uint8))
        canvas.paste(tile, (x, y))
        for j, line in enumerate(list(labels[i])[:LABEL_LINES]):
            draw.text((x + 1, y - lay.label_h + 1 + j * lh), _fit(draw, line, lay.tile_w - 2, f),
                      fill=(235, 235, 235), font=f)
        if points is not None and points[i] is not None:
            py, px = points[i]
            cx, cy = x + px * lay.tile_w, y + py * lay.tile_h
            r = max(2, min(lay.tile_w, lay.tile_h) // 40)
            draw.ellipse([cx - r - 1, cy - r - 1, cx + r + 1, cy + r + 1], outline=(0, 0, 0))
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(255, 255, 255), fill=(255, 64, 64))

    # colour scale
    bar_y = lay.height - scale_height(f) + 1
    bar_w = lay.width - 2 * PAD
    ramp = colorize(torch.linspace(0, 1, bar_w))[None].expand(BAR_H, -1, -1)
    canvas.paste(Image.fromarray((ramp.numpy() * 255).round().astype(np.uint8)), (PAD, bar_y))
    left = "0"
    right = f"{top:.3g} (attention)" if top is not None else "1 = each tile's max"
    draw.text((PAD, bar_y + BAR_H + 1), left, fill=(235, 235, 235), font=f)
    right = _fit(draw, right, max(8, bar_w - 12), f)
    try:
        rw = draw.textlength(right, font=f)
    except AttributeError:
        rw = f.getsize(right)[0]
    draw.text((PAD + bar_w - rw, bar_y + BAR_H + 1), right, fill=(235, 235, 235), font=f)

    image = torch.from_numpy(np.asarray(canvas).astype(np.float32) / 255.0)[None]
    return image, raw.float()
