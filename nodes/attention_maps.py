"""Attention Capture and Attention Map Viewer nodes."""
from __future__ import annotations

from ..artifacts import InversionChainError, user_text
from ..attention.core import patching
from ..attention.viewer.capture import (ATTN_MAPS, BRANCHES, DETAILS, KIND_CHOICES, RESOLUTIONS, AttentionCaptureEditor,
                                 AttentionMaps, capture_layers, prompt_tokens)
from ..attention.viewer.map_query import select
from ..attention.viewer.map_view import NORMALIZE, render
from .common import CATEGORY, tip
from .contract import checked

CAPTURE = "Attention Capture"
VIEWER = "Attention Map Viewer"
MAX_GRID_PIXELS = 64 * 2 ** 20  # ~0.8 GB of float RGB: bounds the grid an image size and token list can ask for
DEFAULT_MAX_MB = 4096   # Attention Capture's max_mb default
VIEW_RESOLUTIONS = ("all captured",) + tuple(r for r in RESOLUTIONS if r != "all")


class ICAttentionCapture:
    DESCRIPTION = ("Records cross- and self-attention maps while sampling, without changing the result: connect its "
                   "MODEL to the sampler (after any other attention editor such as KV Inject, or before: it sees "
                   "their effect either way) and its ATTN_MAPS to Attention Map Viewer.")
    CATEGORY = CATEGORY + "/attention"
    FUNCTION = "capture"
    RETURN_TYPES = ("MODEL", ATTN_MAPS)
    RETURN_NAMES = ("model", "attn_maps")
    OUTPUT_TOOLTIPS = ("The model with capture; sampling results are bit-identical to the input MODEL's.",
                       "The maps, filled while the sampler runs; view them with Attention Map Viewer.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": tip("MODEL", "The model to watch (may already carry other attention edits)."),
                "kinds": tip(list(KIND_CHOICES), "cross: per prompt token, where each token is attended; self: the "
                             "self-attention maps of a grid of query points.", default="cross + self"),
                "resolution": tip(list(RESOLUTIONS), "Which attention layers to record, by token grid relative to "
                                  "the latent: latent/4 is 16x16 for SD1.5 at 512 px (P2P's choice; SDXL at 1024 px: "
                                  "32x32), latent/8 is SD1.5's 8x8 middle block, latent/2 and latent/1 are finer "
                                  "and cost more (CPU memory grows with the grid; docs/memory.md has figures).",
                                  default="latent/4"),
                "detail": tip(list(DETAILS), "per layer keeps each layer apart (viewer can filter layers); per "
                              "resolution keeps only the mean over the layers of each resolution (less memory, "
                              "for models with many layers such as SDXL).", default="per layer"),
                "query_grid": tip("INT", "self-attention: maps of query_grid x query_grid query points spread "
                                  "evenly over the image.", default=4, min=1, max=16),
            },
            "optional": {
                "clip": tip("CLIP", "The CLIP that encoded the prompts, to name tokens by words in the viewer."),
                "prompt": tip("STRING", "The positive prompt given to the sampler (cond branch), for token names.",
                              default="", multiline=True),
                "negative_prompt": tip("STRING", "The negative prompt (uncond branch), for token names.",
                                       default="", multiline=True),
                "max_mb": tip("INT", "The most CPU memory the maps may take, in MB. Checked when sampling starts "
                              "(latent size, batch, guidance and steps known): a run that would need more stops "
                              "before storing anything, and the message names the settings that fit. 0 = no limit.",
                              default=DEFAULT_MAX_MB, min=0, max=1 << 24),
            },
        }

    @checked
    def capture(self, model, kinds, resolution, detail, query_grid, clip=None, prompt="", negative_prompt="",
                max_mb=None):
        if kinds not in KIND_CHOICES:
            raise InversionChainError(f"{CAPTURE}: unknown kinds '{user_text(kinds)}'; use one of "
                                      f"{', '.join(KIND_CHOICES)}.")
        if detail not in DETAILS:
            raise InversionChainError(f"{CAPTURE}: unknown detail '{user_text(detail)}'; use one of "
                                      f"{', '.join(DETAILS)}.")
        if not 1 <= int(query_grid) <= 16:
            raise InversionChainError(f"{CAPTURE}: query_grid must be 1..16, got {query_grid}.")
        if clip is None and ((prompt or "").strip() or (negative_prompt or "").strip()):
            raise InversionChainError(f"{CAPTURE}: the prompts name tokens only with the `clip` that encoded them; "
                                      f"connect `clip`.")
        prompts = {}
        if clip is not None:
            prompts[BRANCHES["cond"]] = prompt_tokens(clip, prompt or "")
            prompts[BRANCHES["uncond"]] = prompt_tokens(clip, negative_prompt or "")
        layers = capture_layers(patching.layers_of(model), resolution, CAPTURE)
        maps = AttentionMaps(KIND_CHOICES[kinds], {l.level for l in layers}, detail, int(query_grid), prompts)
        max_mb = DEFAULT_MAX_MB if max_mb is None else int(max_mb)
        maps.max_bytes = max_mb * 2 ** 20 if max_mb > 0 else None
        patched = patching.install(model, AttentionCaptureEditor(maps, layers), CAPTURE)
        return (patched, maps)


class ICAttentionMapViewer:
    DESCRIPTION = ("Shows captured attention maps as a labelled image grid (token, step range, layer set per tile) "
                   "with a colour scale, plus the raw maps as a MASK batch. Cross-attention maps leave out the start "
                   "token and are renormalised over the other tokens.")
    CATEGORY = CATEGORY + "/attention"
    FUNCTION = "view"
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("grid", "maps")
    OUTPUT_TOOLTIPS = ("The labelled grid of maps.",
                       "One mask per tile: the raw (not rescaled) attention, upsampled to the tile size.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "attn_maps": tip(ATTN_MAPS, "From Attention Capture."),
                "latent": tip("LATENT", "The sampler's output LATENT (makes this node run after sampling; its size "
                              "sets the tile size when no image is given: latent x 8)."),
                "kind": tip(["cross", "self"], "cross: one tile per token; self: one tile per query point.",
                            default="cross"),
                "tokens": tip("STRING", "cross: comma-separated words of the prompt (multi-token words are summed), "
                              "or positions like #5; empty = every token of the prompt. self: query points like "
                              "#0, #5; empty = all.", default=""),
                "start_percent": tip("FLOAT", "First step to average, as a fraction of the sampling steps (step i "
                                     "of N is used when start_percent <= i/N < end_percent; 0 = from the first).",
                                     default=0.0, min=0.0, max=1.0, step=0.01),
                "end_percent": tip("FLOAT", "End of the steps to average, as a fraction of the sampling steps "
                                   "(exclusive; 1 = through the last step).", default=1.0, min=0.0, max=1.0,
                                   step=0.01),
                "layers": tip("STRING", "Layers to average, in execution order (SD1.x: down 0-5, mid 6, up 7-15), "
                              "e.g. '4,5,7-9'; 'all' = every captured layer.", default="all"),
                "resolution": tip(list(VIEW_RESOLUTIONS), "Only layers of this token grid (relative to the latent); "
                                  "maps of coarser layers are upsampled before averaging.", default="all captured"),
                "branch": tip(list(BRANCHES), "cond: the positive prompt's rows; uncond: the negative prompt's rows "
                              "(present only when cfg > 1).", default="cond"),
                "row": tip("INT", "Batch row (image in the batch) to show.", default=0, min=0, max=4096),
                "normalize": tip(list(NORMALIZE), "per tile: each tile's colours span 0..its own max; shared: one "
                                 "scale for all tiles.", default="per tile"),
                "columns": tip("INT", "Tiles per grid row; 0 = about square.", default=0, min=0, max=64),
            },
            "optional": {
                "image": tip("IMAGE", "Draw the maps over this image (e.g. the decoded result or the source photo); "
                             "tiles take its size."),
            },
        }

    @checked
    def view(self, attn_maps, latent, kind, tokens, start_percent, end_percent, layers, resolution, branch, row,
             normalize,              columns, image=None):
        if not hasattr(attn_maps, "steps"):
            raise InversionChainError(f"{VIEWER}: `attn_maps` must come from {CAPTURE}.")
        if kind not in ("cross", "self"):
            raise InversionChainError(f"{VIEWER}: kind must be cross or self, got '{user_text(kind)}'.")
        if normalize not in NORMALIZE:
            raise InversionChainError(f"{VIEWER}: normalize must be one of {', '.join(NORMALIZE)}.")
        if resolution not in VIEW_RESOLUTIONS:
            raise InversionChainError(f"{VIEWER}: resolution must be one of {', '.join(VIEW_RESOLUTIONS)}.")
        sel = select(attn_maps, kind, tokens, float(start_percent), float(end_percent), layers, resolution, branch,
                     int(row),                      VIEWER)
        samples = latent["samples"]
        if image is not None:
            background = image[min(int(row), image.shape[0] - 1)]
            tile_hw = tuple(background.shape[:2])
        else:
            background = None
            tile_hw = (int(samples.shape[-2]) * 8, int(samples.shape[-1]) * 8)
        if len(sel.tiles) * tile_hw[0] * tile_hw[1] > MAX_GRID_PIXELS:
            raise InversionChainError(f"{VIEWER}: {len(sel.tiles)} tiles of {tile_hw[0]}x{tile_hw[1]} px exceed the "
                                      f"grid budget of {MAX_GRID_PIXELS // 2 ** 20} megapixels; pick fewer `tokens` "
                                      f"or connect a smaller `image`.")
        labels = [[t.label, sel.step_label, sel.layer_label] for t in sel.tiles]
        grid, masks = render([t.map for t in sel.tiles], labels, tile_hw, background, normalize, int(columns),
                             [t.point for t in sel.tiles])
        return (grid, masks)


NODE_CLASS_MAPPINGS = {"ICAttentionCapture": ICAttentionCapture, "ICAttentionMapViewer": ICAttentionMapViewer}
NODE_DISPLAY_NAME_MAPPINGS = {"ICAttentionCapture": "Attention Capture", "ICAttentionMapViewer": "Attention Map Viewer"}
