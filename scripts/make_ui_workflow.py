"""Convert every API-format workflow in workflows/api/*.json into the UI (LiteGraph) format that the ComfyUI
frontend loads by drag-and-drop or "Load": workflows/<name>.json.

    .venv/bin/python scripts/make_ui_workflow.py                   # starts a headless ComfyUI for /object_info
    .venv/bin/python scripts/make_ui_workflow.py --url http://127.0.0.1:8188   # ask a running ComfyUI
    .venv/bin/python scripts/make_ui_workflow.py --check           # exit 1 if a UI copy is missing or stale
    .venv/bin/python scripts/make_ui_workflow.py --migrate         # rewrite renamed widgets in workflows/api first

The snapshot is taken on the oldest supported tree (its "_tree"). Run on a newer tree (COMFYUI_PATH=... or
scripts/run_tests.sh's tree), the script only ADDS to it: the definitions, from that tree, of the node types that
the workflows the snapshot's tree cannot run need and the snapshot lacks (the flow-model graphs: UNETLoader,
FluxGuidance, SamplerCustomAdvanced, ...), each recorded in "_added" with its tree; the other definitions stay.

The API copy is the source of truth (tests run it); the UI copy is generated from it. Widget conventions follow
the ComfyUI frontend (checked against the 2024-03 web/ code, unchanged in later frontends):
- a node's inputs are its ``required`` then ``optional`` inputs in /object_info order; an input whose type is a
  list (COMBO), INT, FLOAT, STRING or BOOLEAN is a widget, any other type is a link slot;
- ``widgets_values`` lists every widget's value in that order, including frontend-only widgets that are not sent
  to the server: after an INT named ``seed``/``noise_seed`` (or any input with ``control_after_generate``) comes
  its "control after generate" value (we write "fixed" so that a loaded workflow reproduces the API copy); after
  a COMBO with ``control_after_generate`` also its filter-list value ""; an ``image`` input with
  ``image_upload: true`` (LoadImage) is followed by the upload button's value "image";
- a widget input that the API graph feeds from a link becomes a "converted widget": an input slot carrying
  ``widget: {name}`` (appended after the regular slots), its widget value kept in ``widgets_values``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
API_DIR = REPO_ROOT / "workflows" / "api"
UI_DIR = REPO_ROOT / "workflows"
# /object_info of the node types the workflows use, as the tree the UI copies were made on declares them: the UI
# copies are a function of (API copy, this file), so their staleness can be checked on any tree
SNAPSHOT = REPO_ROOT / "scripts" / "object_info_snapshot.json"

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
SEED_NAMES = ("seed", "noise_seed")


# -- node definitions ------------------------------------------------------------------------------------------
def node_inputs(defn: dict) -> list[tuple[str, object, dict]]:
    """(name, type, options) of a node's inputs in frontend order: required, then optional (hidden ones skipped)."""
    out = []
    for section in ("required", "optional"):
        for name, spec in (defn.get("input", {}).get(section) or {}).items():
            kind = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            out.append((name, kind, options))
    return out


def is_combo(kind) -> bool:
    return isinstance(kind, list) or kind == "COMBO"  # V3 nodes (ComfyUI 0.3x) declare combos as "COMBO"


def is_widget(kind, options: dict) -> bool:
    return (is_combo(kind) or kind in WIDGET_TYPES) and not options.get("forceInput")


def widget_slots(name: str, kind, options: dict) -> list[tuple[str, str]]:
    """The widgets_values entries one widget input occupies: [(role, name)], role 'value' or 'control'."""
    slots = [("value", name)]
    control = options.get("control_after_generate")
    if kind == "INT" and (name in SEED_NAMES or control):
        slots.append(("control", "control_after_generate"))
    elif is_combo(kind) and control:
        slots += [("control", "control_after_generate"), ("control", "control_filter_list")]
    if name == "image" and options.get("image_upload") is True:
        slots.append(("control", "upload"))
    return slots


CONTROL_VALUES = {"control_after_generate": "fixed", "control_filter_list": "", "upload": "image"}


def widget_default(kind, options: dict):
    if "default" in options:
        return options["default"]
    if is_combo(kind):
        choices = kind if isinstance(kind, list) else options.get("options") or []
        return choices[0] if choices else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(kind)


def output_type(defn: dict, slot: int) -> str:
    kind = defn["output"][slot]
    return "COMBO" if isinstance(kind, list) else kind


def output_names(defn: dict) -> list[str]:
    names = defn.get("output_name") or []
    return [names[i] if i < len(names) and names[i] else output_type(defn, i) for i in range(len(defn["output"]))]


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


# -- layout ----------------------------------------------------------------------------------------------------
# Sizes follow what the 2024-03 frontend draws (litegraph computeSize: 20 px per slot row, 24 per widget, +14;
# title 14 px Arial at ~8.4 px a character; ComfyUI's multiline text widget at least 400 x 200; LoadImage keeps
# 220 px under its widgets for the preview), rounded up so that no frontend has to grow a node on load.
# The checked outcome is in tests/unit/test_workflow_files.py (geometry) and tests/test_browser_workflows.py (live
# sizes).
TITLE_H = 30             # LiteGraph.NODE_TITLE_HEIGHT: drawn above node.pos
GROUP_HEADER = 50        # a group's title bar (font 24) plus a margin above the first node's title
GROUP_PAD = 20
COLUMN_GAP = 50
ROW_GAP = 50             # between one node's bottom and the next node's title bar
STAGE_GAP = 40           # between groups
COLUMN_HEIGHTS = range(700, 1700, 50)  # tried as a stage's column height; the one giving the largest view wins
VIEWPORT = (1920, 1080)  # the window the saved view is made for
VIEW_MARGINS = (70, 90, 250, 40)  # left (0.3x sidebar), top (0.3x tabs + toolbar), right (2024-03 menu), bottom
STAGES = ("inputs", "invert", "edit", "decode")
STAGE_OF = {
    "CheckpointLoaderSimple": "inputs", "LoadImage": "inputs", "ImageScale": "inputs", "CLIPTextEncode": "inputs",
    "CLIPVisionLoader": "inputs", "SolidMask": "inputs", "MaskComposite": "inputs", "ControlNetLoader": "inputs",
    "Canny": "inputs",
    "VAEEncode": "invert", "ICDDIMInvert": "invert", "ICNullTextInversion": "invert",
    "ICStyleDiffusionMapper": "invert",
    "VAEDecode": "decode", "SaveImage": "decode", "PreviewImage": "decode", "ICLatentDifference": "decode",
    "LatentFromBatch": "decode", "ICAttentionMapViewer": "decode",
    "UNETLoader": "inputs", "DualCLIPLoader": "inputs", "CLIPLoader": "inputs", "VAELoader": "inputs",
    "FluxGuidance": "inputs", "ICInvertedNoise": "invert", "EmptySD3LatentImage": "inputs",
}   # every other node (patches, samplers) is in "edit"
STAGE_COLORS = {"inputs": "#3f789e", "invert": "#8A8", "edit": "#b58b2a", "decode": "#a1309b"}
NOTE_W = 400


def depths(graph: dict) -> dict[str, int]:
    """Longest distance from a source node: the data-flow order of the nodes."""
    memo: dict[str, int] = {}

    def depth(nid, stack=()):
        if nid in memo:
            return memo[nid]
        if nid in stack:
            raise ValueError(f"the graph has a cycle through node {nid}")
        parents = [v[0] for v in graph[nid]["inputs"].values() if is_link(v)]
        memo[nid] = 1 + max((depth(p, stack + (nid,)) for p in parents), default=-1)
        return memo[nid]

    for nid in graph:
        depth(nid)
    return memo


def title_width(text: str) -> float:
    return 14 * 0.6 * len(text) + 40   # litegraph's estimate plus the collapse dot and padding


def node_size(title: str, inputs_def, slot_names, output_labels, n_widget_slots, class_type) -> list[int]:
    """[w, h] of the node body (the title bar is drawn above it)."""
    multiline = any(is_widget(k, o) and k == "STRING" and o.get("multiline") for _, k, o in inputs_def)
    rows = max(len(slot_names), len(output_labels), 1)
    label = lambda names: max((14 * 0.6 * len(n) for n in names), default=0)
    width = max(title_width(title), label(slot_names) + label(output_labels) + 40, 300)
    height = rows * 20 + 24 * n_widget_slots + 14
    if multiline:
        width = max(width, 400)
        height += 200 - 24 + 10
    if class_type == "LoadImage":
        height += 230
    if class_type in ("SaveImage", "PreviewImage"):
        height = max(height, 300)
    if class_type == "ICLatentDifference":
        height += 30   # room for the numbers web/js/latent_difference.js shows after a run
    return [int(-(-width // 10) * 10), int(-(-height // 10) * 10)]


def stage_of(nid: str, graph: dict) -> str:
    node = graph[nid]
    kind = node["class_type"]
    if kind in ("SaveImage", "PreviewImage"):
        src = node["inputs"].get("images")
        if is_link(src) and stage_of(src[0], graph) == "invert":
            return "invert"   # e.g. the mapper's training loss: shown next to what made it
    return STAGE_OF.get(kind, "edit")


def layout(nodes: dict, graph: dict, topo: list[str], notes: list[dict], stage_titles: dict) -> tuple[list, dict]:
    """Place the nodes stage by stage, left to right (one group per stage); within a stage fill columns top-down
    in data-flow order, with the column height that lets the saved view show everything at the largest scale.
    ``notes`` (Note nodes) open the first stage. Returns (groups, extra.ds)."""
    widths = {id(n): n["size"][0] for n in list(nodes.values()) + notes}
    best = None
    for max_h in COLUMN_HEIGHTS:
        for n in list(nodes.values()) + notes:
            n["size"][0] = widths[id(n)]
        groups, ds = layout_with(nodes, graph, topo, notes, stage_titles, max_h)
        if best is None or ds["scale"] > best[0]:
            best = (ds["scale"], max_h)
    for n in list(nodes.values()) + notes:
        n["size"][0] = widths[id(n)]
    return layout_with(nodes, graph, topo, notes, stage_titles, best[1])


def layout_with(nodes, graph, topo, notes, stage_titles, max_column_h):
    members = {s: [] for s in STAGES}
    for nid in topo:
        members[stage_of(nid, graph)].append(nodes[nid])
    members["inputs"] = notes + members["inputs"]
    groups, x = [], 0
    top = 0
    for stage in STAGES:
        items = members[stage]
        if not items:
            continue
        columns, col, col_h = [], [], 0
        for node in items:
            h = TITLE_H + node["size"][1]
            if col and col_h + h > max_column_h:
                columns.append(col)
                col, col_h = [], 0
            col.append(node)
            col_h += h + ROW_GAP
        columns.append(col)
        gx, cx, bottom = x, x + GROUP_PAD, 0
        for col in columns:
            width = max(n["size"][0] for n in col)
            y = top + GROUP_HEADER
            for node in col:
                node["size"][0] = width          # one width per column: tidy edges
                node["pos"] = [cx, y + TITLE_H]
                y += TITLE_H + node["size"][1] + ROW_GAP
            bottom = max(bottom, y - ROW_GAP)
            cx += width + COLUMN_GAP
        right = cx - COLUMN_GAP + GROUP_PAD
        groups.append({"title": stage_titles.get(stage, stage.capitalize()),
                       "bounding": [gx, top, right - gx, bottom + GROUP_PAD - top],
                       "color": STAGE_COLORS[stage], "font_size": 24})
        x = right + STAGE_GAP
    # one common height for the groups: a tidy band
    height = max(g["bounding"][3] for g in groups)
    for g in groups:
        g["bounding"][3] = height
    return groups, view_for(0, 0, x - STAGE_GAP, height)


def view_for(x0, y0, x1, y1) -> dict:
    """extra.ds that shows the box [x0, x1] x [y0, y1] inside VIEWPORT minus its margins (screen = (pos + offset) *
    scale, as LiteGraph's DragAndScale)."""
    left, top, right, bottom = VIEW_MARGINS
    avail_w, avail_h = VIEWPORT[0] - left - right, VIEWPORT[1] - top - bottom
    scale = min(1.0, avail_w / (x1 - x0), avail_h / (y1 - y0))
    scale = int(scale * 1000) / 1000
    return {"scale": scale, "offset": [round(left / scale - x0, 1), round(top / scale - y0, 1)]}


# -- notes: what each graph does, in Note nodes (titles stay short) ---------------------------------------------
STAGE_TITLES = {
    "ddim_invert_reconstruct": {"edit": "Reconstruct"},
    "rival_variation": {"edit": "Variations"},
    "p2plus_edit": {"edit": "Edit (row 0 source, row 1 target)"},
    "rival_text_variation": {"edit": "Variations"},
    "rival_inpainting": {"edit": "Inpaint"},
    "rival_controlnet": {"edit": "Variations"},
    "attention_maps": {"invert": "Encode", "edit": "Sample + capture"},
    "partial_inversion_sdedit": {"edit": "Sample from the level"},
    "stylediffusion_sdedit": {"edit": "Sample from the level"},
}
TECHNIQUE_NOTES = {
    "ddim_invert_reconstruct": (
        "DDIM inversion round trip.\n"
        "DDIM Invert runs the sampler backwards from your photo to the noise it came from (cfg 1, the source "
        "prompt); SamplerCustom then samples that noise forwards with the same sigmas, no added noise, cfg 1. "
        "The result should be your photo again: Reconstruction error shows max/mean |latent difference| "
        "on the node after a run."),
    "rival_variation": (
        "RIVAL: variations of a real photo.\n"
        "DDIM Invert records the photo's inversion chain; RIVAL Align Sampler generates a batch whose "
        "self-attention reads the chain's keys/values and whose noise statistics follow it for the first "
        "40% of the steps (the paper's t = 1000..600), so the variations keep the photo's style and content. "
        "Paper: cfg ~5-7."),
    "rival_text_variation": (
        "RIVAL: text-driven variations.\n"
        "As the plain variation graph, but the batch is generated with a NEW prompt: the photo's look, the "
        "new prompt's content. Paper: cfg 7."),
    "rival_inpainting": (
        "RIVAL: example-based inpainting (the official inpainting config).\n"
        "The mask (1 = regenerate, 0 = keep; here a centre square built with Solid Mask + Mask Composite: "
        "use your own, e.g. Load Image's MASK painted in the mask editor, at the photo's resized size) picks "
        "what is regenerated. Outside it every variation IS the photo: the inversion chain's latent is put "
        "back after every step. Inside it RIVAL generates with the prompt, aligned with the whole photo "
        "(its self-attention keys/values and noise statistics). The photo is inverted with an empty prompt, "
        "cfg 7, t_align = t_early = 600 (0.4). Official masks are white = keep: invert them."),
    "rival_controlnet": (
        "RIVAL under a ControlNet (the official ControlNet config).\n"
        "Apply ControlNet (Advanced) puts the control on both CFG branches of the variations (never on the "
        "photo's reference row, as the official pipeline); here the control image is the photo's own Canny "
        "edges (a variation that keeps the layout): feed another image's edges, depth or pose for a new "
        "layout. Official settings: photo inverted with an empty prompt, cfg 7, t_align 600 (0.4), "
        "t_early 400 (normalize_end_percent 0.6)."),
    "kv_inject_edit": (
        "KV Inject (MasaCtrl mutual self-attention).\n"
        "Sampling from the photo's inverted noise with a target prompt; from step 4 of 50 on, the "
        "self-attention layers from start_layer on attend to the source's keys/values, so the edit keeps the "
        "photo's identity and texture. start_layer -1 = the first decoder layer at the second-finest "
        "resolution: 10 of 16 on SD1.5 (MasaCtrl's), 34 of 70 on SDXL (MasaCtrl's SDXL examples use 44). cfg 7.5. "
        "The sampler's negative prompt goes to KV Inject too: as MasaCtrl, the unconditional half attends to the "
        "source run with it."),
    "kv_inject_masked": (
        "KV Inject, masked (MasaCtrl's mask-auto).\n"
        "As the KV edit graph, for edits that move the object (pose, layout): the source's foreground is its "
        "cross-attention of mask_words, the target's foreground its OWN cross-attention of the same word "
        "(target_words, empty = mask_words) in the target prompt, at every step; target foreground queries "
        "attend only to the source's foreground keys, background to background, so the object does not take "
        "the background's look or the reverse. source_prompt / target_prompt on KV Inject must be the same "
        "texts as the two prompt nodes."),
    "p2plus_edit_real": (
        "Prompt-to-Prompt on a real photo with null-text inversion.\n"
        "DDIM Invert (cfg 1) gives the pivot; Null-Text Inversion (10 inner steps per step, the paper's N) "
        "learns the unconditional embedding so cfg 7.5 retraces the photo; P2Plus Controller returns a "
        "two-row batch: row 0 reconstructs the photo, row 1 is the edit (the source's cross-attention maps "
        "for the first 80% of the steps, its self-attention maps for the first 50%). Edit "
        "source_prompt/target_prompt on the controller; blend_words keeps the rest of the photo unchanged."),
    "stylediffusion_edit": (
        "StyleDiffusion: edit a real photo through the value input of cross-attention.\n"
        "The Mapper learns, per step, how the photo's CLIP vision tokens shift the prompt's values (100 "
        "inner steps, as the paper; the loss is previewed). P2Plus Controller then edits with those values "
        "for the first half of the steps; StyleDiffusion Apply + Reconstruct shows how well the photo is "
        "retraced."),
    "partial_inversion_sdedit": (
        "Partial inversion + SDEdit.\n"
        "DDIM Invert with end_percent 0.5 inverts only the first half of the 50 steps from the photo toward "
        "noise (half the model calls) and stops at the noise level of sampling step 25; its noise, sigmas and "
        "inversion describe those 25 steps. Reconstruct (cfg 1, no added noise, these sigmas) gives the photo "
        "back. Edit from inversion samples the same latent with a new prompt; Plain SDEdit adds fresh noise to "
        "the photo at the same level (SamplerCustom add_noise on, the same sigmas) for comparison. "
        "KSampler Advanced works too: steps 50, start_at_step 25. Lower end_percent keeps more of the photo."),
    "stylediffusion_sdedit": (
        "StyleDiffusion + SDEdit (paper section 5.2.5).\n"
        "DDIM Invert stops at end_percent 0.5 (the noise level of step 25 of 50); the Mapper learns its "
        "per-step values on those 25 steps only. Reconstruct (StyleDiffusion Apply, cfg 7.5) retraces the photo "
        "from that level; P2Plus Controller edits from it with the mapper's values for the first half of the "
        "sampled steps (row 0 the photo, row 1 the edit). Percent inputs count the 25 steps sampled. "
        "Compare with plain SDEdit from the same level: partial_inversion_sdedit.json."),
    "stylediffusion_style_transfer": (
        "StyleDiffusion style transfer (the paper's section 5.2.7; features as Plug-and-Play injects them).\n"
        "The Mapper learns the STYLE image (top Load Image; describe it in the style prompt). The content photo "
        "(second Load Image) is inverted with the empty prompt; Style transfer samples its inverted noise with "
        "the STYLE's values while the content's decoder features replace the sample's own: the ResNet features "
        "of the second decoder block at latent/4 for the first 80% of the steps, the self-attention maps of the "
        "decoder layers from there on for the first 50%. Lower feature_end_percent / attention_end_percent for "
        "more style, less content. cfg 7.5 = the Mapper's cfg. Both photos are example.png until you choose."),
    "ddim_invert_reconstruct_flux": (
        "DDIM inversion round trip on FLUX.1-dev.\n"
        "DDIM Invert runs the sampler backwards from your photo to the noise it came from, at cfg 1 with the "
        "prompt's FluxGuidance (3.5: Flux-dev is guidance-distilled, it has no unconditional branch). Inverted "
        "Noise hands that latent to SamplerCustomAdvanced as its noise (a flow model's sampler would otherwise "
        "start from zeros), which samples it forwards with euler and the same sigmas. The result should be your "
        "photo again: Reconstruction error shows max/mean |latent difference| on the node after a run."),
    "kv_inject_edit_flux": (
        "KV Inject on FLUX.1-dev (mutual, Stable Flow's vital layers).\n"
        "The photo is inverted as in the reconstruction graph; sampling its inverted noise with a target prompt, "
        "the image tokens of the injected blocks attend to the source's image-token keys/values from the first "
        "step (start_percent 0, as Stable Flow). start_layer -1 = Stable Flow's vital layers (block positions "
        "0, 1, 2, 17, 18, 25, 28, 53, 54, 56; 0-18 double, 19-56 single); n injects every block from n on. "
        "cfg 1 with FluxGuidance 3.5 on both prompts."),
    "rival_variation_flux": (
        "RIVAL: variations of a real photo on FLUX.1-dev.\n"
        "DDIM Invert records the photo's inversion chain (cfg 1, FluxGuidance 3.5); RIVAL Align Sampler "
        "generates a batch whose joint attention reads the photo's image-token keys/values (replaced for the "
        "first 40% of the steps, then appended) and whose per-step velocity follows the photo chain's "
        "per-channel statistics for the first 40% (the paper's t = 1000..600, kept as fractions on a flow "
        "schedule). Flux-dev is guidance-distilled: cfg 1, so the negative prompt is not used. "
        "reference_kv cache falls back to running the photo's row in the batch when its keys/values would not "
        "fit the memory budget."),
    "p2plus_edit_flux": (
        "Prompt-to-Prompt on FLUX.1-dev (a generated image: no inversion).\n"
        "P2Plus Controller encodes the source and target prompts (edit them there, not in a text node) and "
        "returns a two-row batch: row 0 generates the source prompt, row 1 the edit, whose joint attention's "
        "image-to-text probabilities are the source's for the first 80% of the steps (cross), its image "
        "columns for the first 40% (self; self_replace_max_res 64 covers the 64x64 token grid of 1024 px). "
        "blend_words keeps the rest of the image unchanged. Its LATENT is zeros with batch_index [0, 0]: "
        "sample it with add_noise ON (RandomNoise here; KSampler works too), so both rows start from the "
        "seed's noise. cfg 1 (BasicGuider) with FluxGuidance 3.5; the sampler uses the controller's sigmas."),
    "p2plus_edit_real_flux": (
        "Prompt-to-Prompt on a real photo on FLUX.1-dev.\n"
        "DDIM Invert (cfg 1, FluxGuidance 3.5) gives the photo's inverted latent; P2Plus Controller with that "
        "inversion returns a two-row batch (row 0 reconstructs the photo, row 1 is the edit) whose LATENT is the "
        "inverted latent twice, the inversion's sigmas and a positive that keeps its FluxGuidance. A flow "
        "sampler drops the LATENT at sigma 1, so Inverted Noise starts both rows (it tiles the one-image start "
        "over the two rows): sample with SamplerCustomAdvanced, euler, the controller's sigmas, cfg 1 "
        "(BasicGuider). A KSampler or RandomNoise would add its own noise: the controller stops that run. Flux "
        "has no unconditional branch, so no null-text here (Chroma takes one). Edit the prompts on the "
        "controller (refine: prompts of different T5 lengths)."),
    "attention_maps_flux": (
        "Attention maps on FLUX.1-dev.\n"
        "Attention Capture records the joint attention of every double and single block while "
        "SamplerCustomAdvanced runs (img2img from your photo, BasicScheduler denoise 0.8): image-to-text maps "
        "per T5 token (cross) and image self-attention at a 4x4 grid of query points (self). Every Flux block "
        "attends on one token grid, so resolution must be latent/2 (or all); latent/4 is the UNets'. Give "
        "it the same prompt as the sampler. A cross map sums to the image's share of attention on the text "
        "(< 1): the viewer shows the probabilities as they are. Viewer layers 0-18 = double blocks, 19-56 = "
        "single blocks."),
    "ddim_invert_reconstruct_qwen": (
        "DDIM inversion round trip on Qwen-Image (true cfg).\n"
        "Qwen-Image has a real unconditional branch: DDIM Invert inverts at inversion_cfg 4 with the negative "
        "prompt, and CFGGuider samples back at the same cfg 4 with the same prompts; Inverted Noise hands the "
        "inverted latent to SamplerCustomAdvanced (euler, DDIM Invert's sigmas). Keep the cfg, the prompts and "
        "the steps equal in both. Reconstruction error shows max/mean |latent difference| after a run."),
    "kv_inject_edit_qwen": (
        "KV Inject on Qwen-Image (mutual, the middle band of blocks).\n"
        "The photo is inverted at true cfg 4 with the negative prompt, as in the reconstruction graph; its "
        "inverted noise is sampled with a target prompt (CFGGuider, cfg 4) while the image tokens of the injected "
        "blocks attend to the source's image-token keys/values from the first step. KV Inject gets the same "
        "negative: each CFG half reads the source run with that half's prompt. start_layer -1 = blocks 15-44 "
        "of 60 (no vital-layer list is published for Qwen-Image; docs/nodes.md says why this band); mode union "
        "appends the source's tokens instead."),
    "p2plus_edit_real_qwen": (
        "Prompt-to-Prompt on a real photo on Qwen-Image (true cfg).\n"
        "DDIM Invert at cfg 1 gives the photo's inverted latent; Null-Text Inversion in negative-prompt mode (no "
        "optimisation: the source prompt becomes the negative) makes row 0 reconstruct at cfg 4; its method "
        "null-text optimises the negative per step instead (slower, closer). P2Plus Controller returns a "
        "two-row batch (row 0 the photo, row 1 the edit) over Qwen2.5 tokens; Inverted Noise starts both rows "
        "and CFGGuider (cfg 4) samples them with the controller's prompts and sigmas."),
    "attention_maps_qwen": (
        "Attention maps on Qwen-Image.\n"
        "Attention Capture records the joint attention of every block while SamplerCustomAdvanced runs "
        "(img2img from your photo, denoise 0.8, CFGGuider cfg 4 with the negative prompt): image-to-text maps "
        "per Qwen2.5 token (cross) and image self-attention at a 4x4 grid of query points (self). Every block "
        "attends on one token grid (latent/2). Give it the prompts the sampler gets."),
    "rival_variation_qwen": (
        "RIVAL: variations of a real photo on Qwen-Image (true cfg).\n"
        "ModelSamplingAuraFlow shift 3.1 (ComfyUI's Qwen-Image template) feeds both nodes: the inversion and the "
        "variations must use the same model. DDIM Invert records the photo's inversion chain at cfg 1 (RIVAL's "
        "setting, as on the UNets); RIVAL Align Sampler generates a batch at true cfg 4 with the negative prompt,"
        " whose joint attention reads the photo's image-token keys/values in every block (replaced for the first "
        "40% of the steps, then appended with their own RoPE positions) and whose per-step velocity follows the "
        "photo chain's per-channel statistics for the first 40%. reference_kv cache records the photo's "
        "keys/values for both CFG halves once per inversion and negative prompt; batch runs the photo as an extra"
        " row (its prompt must then have as many tokens as the positive's)."),
    "attention_maps": (
        "Attention maps.\n"
        "Attention Capture records cross- and self-attention while the KSampler runs (img2img from your "
        "photo, denoise 0.8). Give it the same prompts as the KSampler. The viewers draw per-token "
        "cross-attention maps and self-attention of a 4x4 grid of query points over the result."),
}


FLOW_SUFFIXES = ("_flux", "_qwen")   # graphs for flow models (current ComfyUI only)
FLOW_LOADERS = (("UNETLoader", ("unet_name",), "diffusion_models"),
                ("DualCLIPLoader", ("clip_name1", "clip_name2"), "text_encoders"),
                ("CLIPLoader", ("clip_name",), "text_encoders"), ("VAELoader", ("vae_name",), "vae"))


def technique_of(name: str) -> str:
    for suffix in ("_sdxl",) + FLOW_SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def notes_for(name: str, graph: dict) -> list[str]:
    """The Note texts of a shipped workflow: what it does, then what to put where (read from the graph itself)."""
    text = TECHNIQUE_NOTES.get(name) or TECHNIQUE_NOTES.get(name.removesuffix("_sdxl"))
    if text is None:
        return []
    ckpts = sorted({n["inputs"]["ckpt_name"] for n in graph.values() if n["class_type"] == "CheckpointLoaderSimple"})
    visions = sorted({n["inputs"]["clip_name"] for n in graph.values() if n["class_type"] == "CLIPVisionLoader"})
    controls = sorted({n["inputs"]["control_net_name"] for n in graph.values()
                       if n["class_type"] == "ControlNetLoader"})
    images = sorted({n["inputs"]["image"] for n in graph.values() if n["class_type"] == "LoadImage"})
    sizes = sorted({n["inputs"]["width"] for n in graph.values() if n["class_type"] == "ImageScale"})
    steps = sorted({n["inputs"]["steps"] for n in graph.values() if isinstance(n["inputs"].get("steps"), int)})
    files = [f"models/checkpoints/{c}" for c in ckpts]
    for kind, key, folder in FLOW_LOADERS:   # the flow-model graphs' own loaders
        files += [f"models/{folder}/{n['inputs'][k]}" for n in graph.values() if n["class_type"] == kind
                  for k in key]
    setup = ["Models: " + ", ".join(files)
             + "".join(f", models/clip_vision/{v}" for v in visions)
             + "".join(f", models/controlnet/{c}" for c in controls) + "."]
    if images:
        setup.append(f"Photo: replace {', '.join(images)} with yours (Load Image > choose file) and describe it "
                     f"in the source prompt; it is resized and centre-cropped to {'/'.join(map(str, sizes))} px.")
    kinds = {n["class_type"] for n in graph.values()}
    if steps and name.endswith(FLOW_SUFFIXES) and kinds & {"ICDDIMInvert", "ICP2PlusController"}:
        owner = "DDIM Invert" if "ICDDIMInvert" in kinds else "P2Plus Controller"
        setup.append(f"Steps: {'/'.join(map(str, steps))}; sampling uses {owner}'s sigmas, so the same count.")
    elif steps and name.endswith(FLOW_SUFFIXES):
        setup.append(f"Steps: {'/'.join(map(str, steps))}.")
    elif steps:
        setup.append(f"Steps: {'/'.join(map(str, steps))} (the paper's); keep the same count in every node.")
    return [text + "\n\n" + "\n".join(setup)]


# -- conversion ------------------------------------------------------------------------------------------------
def api_to_ui(graph: dict, object_info: dict, name: str | None = None) -> dict:
    """The UI workflow for API ``graph``; ``name`` (the workflow's file stem) adds its Note and stage titles."""
    workflow_name = name
    missing = sorted({n["class_type"] for n in graph.values()} - set(object_info))
    if missing:
        raise KeyError(f"node types unknown to this ComfyUI: {missing}")
    if not all(str(nid).isdigit() for nid in graph):
        raise ValueError("API node ids must be strings of integers (the UI uses integer ids)")
    order_ids = sorted(graph, key=int)
    depth = depths(graph)
    topo = sorted(order_ids, key=lambda n: (depth[n], int(n)))

    nodes, links = {}, []
    for nid in order_ids:
        api = graph[nid]
        defn = object_info[api["class_type"]]
        inputs_def = node_inputs(defn)
        known = {name for name, _, _ in inputs_def}
        unknown = sorted(set(api["inputs"]) - known)
        if unknown:
            raise KeyError(f"node {nid} ({api['class_type']}): inputs {unknown} are not in its definition")
        slots, converted, widgets_values = [], [], []
        for name, kind, options in inputs_def:
            value = api["inputs"].get(name)
            if is_widget(kind, options):
                linked = is_link(value)
                if linked:
                    converted.append({"name": name, "type": "COMBO" if is_combo(kind) else kind,
                                      "link": value, "widget": {"name": name}})
                    value = widget_default(kind, options)
                elif name not in api["inputs"]:
                    raise KeyError(f"node {nid} ({api['class_type']}): widget input {name!r} has no value; write "
                                   f"every widget value into the API copy (the frontend always sends them)")
                for role, slot_name in widget_slots(name, kind, options):
                    widgets_values.append(value if role == "value" else CONTROL_VALUES[slot_name])
            else:
                if value is None:
                    if name in (defn["input"].get("required") or {}):
                        raise KeyError(f"node {nid} ({api['class_type']}): required input {name!r} is not linked")
                    slots.append({"name": name, "type": kind, "link": None})
                    continue
                if not is_link(value):
                    raise ValueError(f"node {nid} ({api['class_type']}): input {name!r} must be a link, got {value!r}")
                slots.append({"name": name, "type": kind, "link": value})
        node_inputs_ui = slots + converted
        names = output_names(defn)
        outputs = [{"name": names[i], "type": output_type(defn, i), "links": [], "slot_index": i}
                   for i in range(len(defn["output"]))]
        if defn.get("output_is_list"):
            for i, is_list in enumerate(defn["output_is_list"]):
                if is_list:
                    outputs[i]["shape"] = 6  # LiteGraph.GRID_SHAPE, as the frontend draws list outputs
        title = (api.get("_meta") or {}).get("title")
        shown_title = title or defn.get("display_name") or api["class_type"]
        ui = {"id": int(nid), "type": api["class_type"], "pos": [0, 0],
              "size": node_size(shown_title, inputs_def, [i["name"] for i in node_inputs_ui],
                                [o["name"] for o in outputs], len(widgets_values), api["class_type"]),
              "flags": {}, "order": topo.index(nid), "mode": 0}
        if node_inputs_ui:
            ui["inputs"] = node_inputs_ui
        ui["outputs"] = outputs
        if title and title != (defn.get("display_name") or api["class_type"]):
            ui["title"] = title
        ui["properties"] = {"Node name for S&R": api["class_type"]}
        if widgets_values:
            ui["widgets_values"] = widgets_values
        nodes[nid] = ui

    # links, numbered in target node order then input order
    for nid in order_ids:
        for slot_index, inp in enumerate(nodes[nid].get("inputs", [])):
            if inp["link"] is None:
                continue
            src, src_slot = inp["link"]
            if src not in graph:
                raise KeyError(f"node {nid} input {inp['name']!r} links to missing node {src}")
            src_def = object_info[graph[src]["class_type"]]
            if src_slot >= len(src_def["output"]):
                raise IndexError(f"node {nid} input {inp['name']!r} links to output {src_slot} of node {src}, "
                                 f"which has {len(src_def['output'])} outputs")
            link_id = len(links) + 1
            links.append([link_id, int(src), src_slot, int(nid), slot_index, output_type(src_def, src_slot)])
            inp["link"] = link_id
            nodes[src]["outputs"][src_slot]["links"].append(link_id)

    texts = notes_for(workflow_name, graph) if workflow_name else []
    note_nodes = []
    next_id = max((int(n) for n in graph), default=0)
    for text in texts:
        next_id += 1
        lines = sum(1 + len(line) // 52 for line in text.split("\n"))
        note_nodes.append({"id": next_id, "type": "Note", "pos": [0, 0], "size": [NOTE_W, max(220, 18 * lines + 30)],
                           "flags": {}, "order": len(order_ids) + len(note_nodes), "mode": 0,
                           "properties": {"text": ""}, "widgets_values": [text],
                           "color": "#432", "bgcolor": "#653"})
    technique = technique_of(workflow_name or "")
    groups, ds = layout(nodes, graph, topo, note_nodes, STAGE_TITLES.get(technique, {}))

    return {
        "last_node_id": next_id,
        "last_link_id": len(links),
        "nodes": [nodes[nid] for nid in order_ids] + note_nodes,
        "links": links,
        "groups": groups,
        "config": {},
        "extra": {"ds": ds},
        "version": 0.4,
    }


def dumps(workflow: dict) -> str:
    """Indented JSON with short lists of scalars (pos, size, links, widgets_values) kept on one line."""
    def flat(obj, indent=0):
        pad = "  " * indent
        if isinstance(obj, dict):
            if not obj:
                return "{}"
            items = [f'{pad}  {json.dumps(k)}: {flat(v, indent + 1)}' for k, v in obj.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(obj, list):
            def scalars(v):
                return isinstance(v, list) and not any(isinstance(x, (dict, list)) for x in v)
            if scalars(obj):
                return json.dumps(obj)
            if all(scalars(v) for v in obj):
                return "[\n" + ",\n".join(f"{pad}  {json.dumps(v)}" for v in obj) + "\n" + pad + "]"
            return "[\n" + ",\n".join(f"{pad}  {flat(v, indent + 1)}" for v in obj) + "\n" + pad + "]"
        return json.dumps(obj)
    text = flat(workflow) + "\n"
    assert json.loads(text) == workflow
    return text


# -- widget renames (the step-fraction vocabulary): carried into the API copies by --migrate -------------------
# old name -> (new name, value conversion). Applied to a node only when this ComfyUI's definition has the new name
# and lacks the old, so it is a no-op before the rename lands and idempotent after.
def _t_to_percent(t):          # RIVAL's t_align / t_early: a timestep of 1000 -> the fraction of steps before it
    return round((1000 - t) / 1000, 4)


WIDGET_RENAMES = {
    "ICAttentionMapViewer": {"start_at": ("start_percent", None), "end_at": ("end_percent", None)},
    "ICKVInject": {"start_step": ("start_percent", "steps")},   # steps: divided by the graph's sampling steps
    "ICRIVALAlignSampler": {"t_align": ("replace_end_percent", _t_to_percent),
                            "t_early": ("normalize_end_percent", _t_to_percent)},
    "ICP2PlusController": {"cross_replace": ("cross_replace_end_percent", None),
                           "self_replace": ("self_replace_end_percent", None),
                           "uncond_self_replace": ("uncond_self_replace_end_percent", None),
                           "blend_start": ("blend_start_percent", None), "style_until": ("style_end_percent", None)},
    "ICStyleDiffusionApply": {"style_until": ("style_end_percent", None)},
}


def migrate(graph: dict, object_info: dict) -> list[str]:
    """Rename old time widgets in place where this ComfyUI has the new names; returns what changed."""
    changed = []
    steps = [n["inputs"]["steps"] for n in graph.values() if isinstance(n["inputs"].get("steps"), int)]
    for nid, node in graph.items():
        known = {name for name, _, _ in node_inputs(object_info.get(node["class_type"], {}))}
        for old, (new, convert) in WIDGET_RENAMES.get(node["class_type"], {}).items():
            if old not in node["inputs"] or old in known or new not in known:
                continue
            value = node["inputs"].pop(old)
            if convert == "steps":
                value = round(value / max(steps), 4)
            elif convert is not None:
                value = convert(value)
            node["inputs"][new] = value
            changed.append(f"node {nid} {node['class_type']}: {old} -> {new} = {value}")
    return changed


def write_api(path: Path, graph: dict) -> None:
    """The API copy's layout: one node per block, its inputs on one line."""
    blocks = []
    for nid, node in graph.items():
        parts = [f'    "class_type": {json.dumps(node["class_type"])}']
        if "_meta" in node:
            parts.append(f'    "_meta": {json.dumps(node["_meta"])}')
        parts.append(f'    "inputs": {json.dumps(node["inputs"])}')
        blocks.append(f"  {json.dumps(nid)}: {{\n" + ",\n".join(parts) + "\n  }")
    path.write_text("{\n" + ",\n".join(blocks) + "\n}\n")


# -- object_info -----------------------------------------------------------------------------------------------
def fetch_object_info(url: str) -> dict:
    with urllib.request.urlopen(url.rstrip("/") + "/object_info", timeout=60) as r:
        return json.loads(r.read())


def object_info_from_headless_server() -> tuple[dict, str]:
    """(/object_info, the tree's version) of a headless ComfyUI started on the selected tree."""
    sys.path.insert(0, str(REPO_ROOT))
    from tests.harness.server import ComfyServer
    with tempfile.TemporaryDirectory(prefix="ic_ui_workflow_") as tmp:
        server = ComfyServer(Path(tmp), checkpoints=())
        with server:
            return server.object_info, server.tree_version()


def without_choices(defn: dict) -> dict:
    """A node definition with every combo's choices dropped (they list the machine's files: checkpoints,
    images), so the snapshot depends on the tree only."""
    out = json.loads(json.dumps(defn))
    for section in ("required", "optional"):
        for name, spec in (out.get("input", {}).get(section) or {}).items():
            if is_combo(spec[0]):
                options = dict(spec[1]) if len(spec) > 1 and isinstance(spec[1], dict) else {}
                options.pop("options", None)
                out["input"][section][name] = ["COMBO", options]
    return out


def types_by_workflow() -> dict[str, set]:
    return {p.stem: {node["class_type"] for node in json.loads(p.read_text()).values()}
            for p in sorted(API_DIR.glob("*.json"))}


def used_types() -> set:
    return set().union(*types_by_workflow().values())


def snapshot_of(object_info: dict, tree: str, previous: dict | None = None) -> dict:
    """The definitions (without combo choices) of the node types the workflows use, and the tree they came from.
    On the snapshot's own tree (or with no ``previous``): every type of the workflows that tree can run, from it;
    the definitions ``previous`` had added from a newer tree stay. On another tree: ``previous`` plus, from this
    tree, the types it lacks that the workflows ``previous``'s tree cannot run need (recorded in "_added")."""
    if previous is None or previous["_tree"] == tree:
        runnable = [t for t in types_by_workflow().values() if t <= set(object_info)]
        nodes = {t: without_choices(object_info[t]) for t in sorted(set().union(*runnable))}
        added = {t: v for t, v in (previous or {}).get("_added", {}).items() if t not in nodes}
        nodes.update({t: previous["nodes"][t] for t in added})
    else:
        added = dict(previous.get("_added", {}))
        base = {t for t in previous["nodes"] if t not in added}
        newer = set().union(*[t for t in types_by_workflow().values() if not t <= base]) - base
        added.update({t: tree for t in newer if t in object_info and (t not in added or added[t] == tree)})
        nodes = {t: d for t, d in previous["nodes"].items() if t in base}
        nodes.update({t: without_choices(object_info[t]) if added[t] == tree else previous["nodes"][t]
                      for t in added if t in newer})
        added = {t: v for t, v in added.items() if t in nodes}
    out = {"_tree": previous["_tree"] if previous else tree, "nodes": dict(sorted(nodes.items()))}
    if added:
        out["_added"] = dict(sorted(added.items()))
    return out


def convert_all(object_info: dict, names=None) -> dict[str, str | Exception]:
    """{name: UI JSON text, or the error that stopped its conversion} for every API workflow (or just ``names``)."""
    paths = sorted(API_DIR.glob("*.json"))
    if names:
        paths = [p for p in paths if p.stem in names]
    result = {}
    for p in paths:
        try:
            result[p.stem] = dumps(api_to_ui(json.loads(p.read_text()), object_info, p.stem))
        except (KeyError, ValueError, IndexError) as exc:
            result[p.stem] = exc
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="workflow names (default: every workflows/api/*.json)")
    ap.add_argument("--url", help="a running ComfyUI to read /object_info from (default: start a headless one)")
    ap.add_argument("--object-info", type=Path, help="a saved /object_info JSON file (or the snapshot: "
                                                    "scripts/object_info_snapshot.json)")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a UI copy is missing or stale")
    ap.add_argument("--migrate", action="store_true", help="first rename old time widgets in workflows/api/*.json "
                                                            "to the names this ComfyUI's nodes have")
    args = ap.parse_args(argv)
    tree = None
    if args.object_info:
        info = json.loads(args.object_info.read_text())
        info = info.get("nodes", info)  # a snapshot or a plain /object_info
    elif args.url:
        info = fetch_object_info(args.url)
    else:
        info, tree = object_info_from_headless_server()
        previous = json.loads(SNAPSHOT.read_text()) if SNAPSHOT.is_file() else None
        snapshot = snapshot_of(info, tree, previous)
        info = snapshot["nodes"]   # the UI copies are made from the snapshot: its tree's definitions first
    if args.migrate:
        for path in sorted(API_DIR.glob("*.json")):
            graph = json.loads(path.read_text())
            for line in migrate(graph, info):
                print(f"{path.relative_to(REPO_ROOT)}: {line}")
            write_api(path, graph)
    stale = []
    for name, text in convert_all(info, args.names).items():
        target = UI_DIR / f"{name}.json"
        if isinstance(text, Exception):
            stale.append(name)
            print(f"ERROR: workflows/api/{name}.json: {text}", file=sys.stderr)
            continue
        current = target.read_text() if target.is_file() else None
        if current == text:
            print(f"up to date: {target.relative_to(REPO_ROOT)}")
            continue
        if args.check:
            stale.append(name)
            print(f"stale: {target.relative_to(REPO_ROOT)}")
        else:
            target.write_text(text)
            print(f"wrote {target.relative_to(REPO_ROOT)}")
    if tree is not None and not args.check and not args.names:
        SNAPSHOT.write_text(json.dumps(snapshot, indent=1) + "\n")
        print(f"wrote {SNAPSHOT.relative_to(REPO_ROOT)} (node definitions of {snapshot['_tree']}"
              + (f"; added: {snapshot['_added']})" if snapshot.get("_added") else ")"))
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
