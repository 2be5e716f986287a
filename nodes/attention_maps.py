"""Attention Capture and Attention Map Viewer nodes."""
from __future__ import annotations

from ..attention.viewer.capture import ATTN_MAPS, BRANCHES, DETAILS, KIND_CHOICES, RESOLUTIONS
from ..attention.viewer.map_view import NORMALIZE
from ..pipelines.attention_maps import DEFAULT_MAX_MB, capture_maps, view_maps
from .common import CATEGORY, tip
from .contract import checked

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
                                  "and cost more (CPU memory grows with the grid; docs/memory.md has figures). "
                                  "Flux, Chroma, Qwen-Image: every block attends at latent/2, so latent/2 or all.",
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
        return capture_maps(model, kinds, resolution, detail, query_grid, clip, prompt, negative_prompt, max_mb)


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
                "tokens": tip("STRING", "cross: comma-separated words of the prompt (multi-token words are summed; "
                              "DiT models: T5 / Qwen tokens, positions from #0), "
                              "or positions like #5; empty = every token of the prompt. self: query points like "
                              "#0, #5; empty = all.", default=""),
                "start_percent": tip("FLOAT", "First step to average, as a fraction of the sampling steps (step i "
                                     "of N is used when start_percent <= i/N < end_percent; 0 = from the first).",
                                     default=0.0, min=0.0, max=1.0, step=0.01),
                "end_percent": tip("FLOAT", "End of the steps to average, as a fraction of the sampling steps "
                                   "(exclusive; 1 = through the last step).", default=1.0, min=0.0, max=1.0,
                                   step=0.01),
                "layers": tip("STRING", "Layers to average, in execution order (SD1.x: down 0-5, mid 6, up 7-15; "
                              "DiT models: block positions, Flux/Chroma double blocks 0-18 then single 19-56), "
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
             normalize, columns, image=None):
        return view_maps(attn_maps, latent, kind, tokens, start_percent, end_percent, layers, resolution, branch,
                         row, normalize, columns, image)


NODE_CLASS_MAPPINGS = {"ICAttentionCapture": ICAttentionCapture, "ICAttentionMapViewer": ICAttentionMapViewer}
NODE_DISPLAY_NAME_MAPPINGS = {"ICAttentionCapture": "Attention Capture", "ICAttentionMapViewer": "Attention Map Viewer"}
