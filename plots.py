"""Small charts rendered as ComfyUI IMAGEs with Pillow (ComfyUI's own dependency; no plotting library needed)."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 640, 320
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 56, 12, 22, 30
BACKGROUND, AXIS, GRID, LINE, TEXT = (24, 24, 24), (160, 160, 160), (56, 56, 56), (255, 170, 60), (235, 235, 235)


def loss_curve(per_step: Sequence[Sequence[float]], title: str) -> torch.Tensor:
    """Every optimiser iteration's loss in order, log scale, with a tick where each sampling step starts.
    Returns IMAGE (1, H, W, 3)."""
    values = [v for step in per_step for v in step]
    canvas = Image.new("RGB", (WIDTH, HEIGHT), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text((MARGIN_L, 4), title, fill=TEXT, font=font)
    x0, y0, x1, y1 = MARGIN_L, MARGIN_T, WIDTH - MARGIN_R, HEIGHT - MARGIN_B
    draw.rectangle([x0, y0, x1, y1], outline=AXIS)
    finite = [v for v in values if v > 0 and math.isfinite(v)]
    if finite:
        lo, hi = math.floor(math.log10(min(finite))), math.ceil(math.log10(max(finite)))
        hi = max(hi, lo + 1)
        to_y = lambda v: y1 - (math.log10(max(v, 10.0 ** lo)) - lo) / (hi - lo) * (y1 - y0)  # noqa: E731
        for decade in range(lo, hi + 1):
            y = to_y(10.0 ** decade)
            draw.line([x0, y, x1, y], fill=GRID)
            draw.text((4, y - 6), f"1e{decade}", fill=TEXT, font=font)
        n = len(values)
        to_x = lambda i: x0 + (i + 0.5) / n * (x1 - x0)  # noqa: E731
        start = 0
        for k, step in enumerate(per_step):
            draw.line([to_x(start) - 0.5, y1, to_x(start) - 0.5, y1 + 4], fill=AXIS)
            if k % max(1, len(per_step) // 10) == 0:
                draw.text((to_x(start), y1 + 6), str(k), fill=TEXT, font=font)
            start += len(step)
        points = [(to_x(i), to_y(v)) for i, v in enumerate(values) if v > 0 and math.isfinite(v)]
        if len(points) == 1:
            px, py = points[0]
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=LINE)
        elif points:
            draw.line(points, fill=LINE, width=2)
    draw.text((x1 - 170, y1 + 16), "sampling step (ticks) / iteration", fill=TEXT, font=font)
    return torch.from_numpy(np.asarray(canvas).astype(np.float32) / 255.0)[None]
