"""Attention Capture's assembly (``capture_maps``: the layers to record, the token names, the memory budget, the
capture editor on a patched clone) and Attention Map Viewer's (``view_maps``: the selection rendered as a grid)."""
from __future__ import annotations

from .. import compat
from ..artifacts import InversionChainError, node_name, user_text
from ..attention.core import dit_layers, mmdit_bridge, patching
from ..attention.core import tokens as tokens_mod
from ..attention.viewer import dit_capture
from ..attention.viewer.capture import (BRANCHES, KIND_CHOICES, RESOLUTIONS, AttentionCaptureEditor, AttentionMaps,
                                        capture_layers, prompt_tokens, resolution_name)
from ..attention.viewer.map_query import select
from ..attention.viewer.map_view import render

MAX_GRID_PIXELS = 64 * 2 ** 20  # ~0.8 GB of float RGB: bounds the grid an image size and token list can ask for
DEFAULT_MAX_MB = 4096   # Attention Capture's max_mb default


def capture_maps(model, kinds: str, resolution: str, detail: str, query_grid: int, clip=None, prompt: str = "",
                 negative_prompt: str = "", max_mb=None):
    """(the model with the capture editor, the AttentionMaps it fills while sampling). Flux-layout DiTs (Flux,
    Chroma) and Qwen-Image: ``capture_dit``."""
    if clip is None and ((prompt or "").strip() or (negative_prompt or "").strip()):
        raise InversionChainError("the prompts name tokens only with the `clip` that encoded them; "
                                  "connect `clip`.")
    if compat.is_flow_family(compat.model_sampling(model)):
        return capture_dit(model, kinds, resolution, detail, query_grid, clip, prompt, negative_prompt, max_mb)
    prompts = {}
    if clip is not None:
        prompts[BRANCHES["cond"]] = prompt_tokens(clip, prompt or "")
        prompts[BRANCHES["uncond"]] = prompt_tokens(clip, negative_prompt or "")
    layers = capture_layers(patching.layers_of(model), resolution)
    maps = AttentionMaps(KIND_CHOICES[kinds], {l.level for l in layers}, detail, int(query_grid), prompts)
    max_mb = DEFAULT_MAX_MB if max_mb is None else int(max_mb)
    maps.max_bytes = max_mb * 2 ** 20 if max_mb > 0 else None
    return patching.install(model, AttentionCaptureEditor(maps, layers)), maps


def capture_dit(model, kinds: str, resolution: str, detail: str, query_grid: int, clip=None, prompt: str = "",
                negative_prompt: str = "", max_mb=None):
    """Capture on a Flux-layout DiT, Qwen-Image or SD3.5: an attn1_patch observer of every block's joint attention
    (dit_capture.py), the prompts named by their T5 / Qwen2.5 / CLIP + T5 tokens."""
    family = compat.family_name(model)
    qwen, sd3 = dit_capture.is_qwen_image(model), mmdit_bridge.is_mmdit(model)
    if not (dit_layers.is_flux_layout(model) or qwen or sd3):
        raise InversionChainError(f"the model family '{family}' is not supported yet by this node (its blocks are "
                                  f"not wired to the capture yet). Attention Capture runs on SD1.x, SD2.x, SDXL, "
                                  f"Flux, Chroma, Qwen-Image and SD3.5.")
    # SD3 / SD3.5 reach the attn1 patches through the attention override (attention/core/mmdit_bridge.py)
    missing = compat.missing_feature_message("attention-override" if sd3 else "dit-attention-patches", node_name())
    if missing:
        raise InversionChainError(missing)
    layers = dit_capture.dit_layers(model)
    grid = resolution_name(layers[0].level)
    if resolution not in ("all", grid):
        raise InversionChainError(
            f"every block of this {family} model attends on one token grid, {grid} ({len(layers)} blocks: "
            f"layers 0-{len(layers) - 1} in execution order, double blocks first); got resolution "
            f"'{user_text(resolution)}'. Set resolution to {grid} or all ({RESOLUTIONS[0]} is the UNet default).")
    prompts = {}
    if clip is not None:
        ours = tokens_mod.qwen_tokenizer(clip) if qwen else tokens_mod.t5_tokenizer(clip)
        if ours is None:
            raise InversionChainError(f"{family} reads the prompt as {'Qwen2.5' if qwen else 'T5'} tokens, and "
                                      f"this `clip` has no such tokenizer; connect the CLIP that encoded the prompts "
                                      f"(Flux: CLIP-L + T5, Chroma: T5, Qwen-Image: Qwen2.5-VL, SD3.5: CLIP-L + "
                                      f"CLIP-G + T5).")
        prompts[BRANCHES["cond"]] = dit_capture.prompt_tokens_for(clip, prompt or "", sd3)
        prompts[BRANCHES["uncond"]] = dit_capture.prompt_tokens_for(clip, negative_prompt or "", sd3)
    maps = AttentionMaps(KIND_CHOICES[kinds], {layers[0].level}, detail, int(query_grid), prompts)
    max_mb = DEFAULT_MAX_MB if max_mb is None else int(max_mb)
    maps.max_bytes = max_mb * 2 ** 20 if max_mb > 0 else None
    patched = patching.add_attn1_patch(model.clone(), dit_capture.DiTCaptureObserver(maps, layers, text_mask=qwen))
    patching.add_unet_wrapper(patched, dit_capture.shape_wrapper)
    return patched, maps


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
