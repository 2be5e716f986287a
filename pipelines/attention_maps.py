"""Attention Capture's assembly (``capture_maps``: the layers to record, the token names, the memory budget, the
capture editor on a patched clone) and Attention Map Viewer's (``view_maps``: the selection rendered as a grid)."""
from __future__ import annotations

from ..artifacts import InversionChainError
from ..attention.core import patching
from ..attention.viewer.capture import (BRANCHES, KIND_CHOICES, AttentionCaptureEditor, AttentionMaps, capture_layers,
                                        prompt_tokens)
from ..attention.viewer.map_query import select
from ..attention.viewer.map_view import render

MAX_GRID_PIXELS = 64 * 2 ** 20  # ~0.8 GB of float RGB: bounds the grid an image size and token list can ask for
DEFAULT_MAX_MB = 4096   # Attention Capture's max_mb default


def capture_maps(model, kinds: str, resolution: str, detail: str, query_grid: int, clip=None, prompt: str = "",
                 negative_prompt: str = "", max_mb=None):
    """(the model with the capture editor, the AttentionMaps it fills while sampling)."""
    if clip is None and ((prompt or "").strip() or (negative_prompt or "").strip()):
        raise InversionChainError("the prompts name tokens only with the `clip` that encoded them; "
                                  "connect `clip`.")
    prompts = {}
    if clip is not None:
        prompts[BRANCHES["cond"]] = prompt_tokens(clip, prompt or "")
        prompts[BRANCHES["uncond"]] = prompt_tokens(clip, negative_prompt or "")
    layers = capture_layers(patching.layers_of(model), resolution)
    maps = AttentionMaps(KIND_CHOICES[kinds], {l.level for l in layers}, detail, int(query_grid), prompts)
    max_mb = DEFAULT_MAX_MB if max_mb is None else int(max_mb)
    maps.max_bytes = max_mb * 2 ** 20 if max_mb > 0 else None
    return patching.install(model, AttentionCaptureEditor(maps, layers)), maps


def view_maps(attn_maps, latent, kind: str, tokens: str, start_percent: float, end_percent: float, layers: str,
              resolution: str, branch: str, row: int, normalize: str, columns: int, image=None):
    """(the labelled grid IMAGE, one MASK per tile) of the selected maps, tiles the image's size or latent x 8."""
    sel = select(attn_maps, kind, tokens, float(start_percent), float(end_percent), layers, resolution, branch,
                 int(row))
    samples = latent["samples"]
    if image is not None:
        background = image[min(int(row), image.shape[0] - 1)]
        tile_hw = tuple(background.shape[:2])
    else:
        background = None
        tile_hw = (int(samples.shape[-2]) * 8, int(samples.shape[-1]) * 8)
    if len(sel.tiles) * tile_hw[0] * tile_hw[1] > MAX_GRID_PIXELS:
        raise InversionChainError(f"{len(sel.tiles)} tiles of {tile_hw[0]}x{tile_hw[1]} px exceed the "
                                  f"grid budget of {MAX_GRID_PIXELS // 2 ** 20} megapixels; pick fewer `tokens` "
                                  f"or connect a smaller `image`.")
    labels = [[t.label, sel.step_label, sel.layer_label] for t in sel.tiles]
    return render([t.map for t in sel.tiles], labels, tile_hw, background, normalize, int(columns),
                  [t.point for t in sel.tiles])
