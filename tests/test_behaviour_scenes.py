"""Each technique does what it is for, on a model that has learned where things are: the scenes model
(models/ic_demo_scenes.safetensors, scripts/train_scenes_model.py), a 1 M-parameter UNet trained here on drawn scenes
of coloured shapes, its object words' cross-attention then fine-tuned toward the drawn masks (a grounding loss),
loaded by ComfyUI's stock loader. Since the maps were trained to sit on the objects, the map tests check that every
path of the pack reads them right (no flip, no transposition, no wrong token, no wrong resolution, both branches);
the edits (swap, local blend, reweight, refine, KV Inject, RIVAL, StyleDiffusion) were never trained for. Masks come
from the scene generator (tests/harness/scenes.py), which knows where it drew each object. Every check has a control
that shows it can fail: the same measurement on the photo model (flat attention), on the mirror image of the
object's mask, on another word, or with the edit off.

The figures behind each threshold: `.venv/bin/python scripts/scenes_figures.py` prints them all (JSON); the values
measured on the committed checkpoint are in models/README.md.
"""
from __future__ import annotations

import pytest
import torch

from tests.harness import demo_model
from tests.harness.measure import measured
from tests.harness import scenes_behaviour as sb

# Thresholds, from the committed checkpoint's figures (models/README.md, "Behaviour on the scenes model")
WORD_RATIO = 2.0            # the bar: a word's mass inside its object >= 2x the object's area share
SHAPE_RATIO = 4.0           # shape word measured 7.5-7.8 over four placements, every map path 7.6-8.2: a map one
                            # token off ('red': 2.6-2.7) or at a blurred resolution scores well below
MAX_CONTROL_RATIO = 1.2     # mirrored mask: shape word 0.04-0.09, colour word 0.76-0.79; photo model 0.83-0.96
P2PLUS_VIEWER_CORR = 0.9    # local blend's map vs the viewer's 8x8 map: corr 0.9988-0.9997 (the mirrored map -0.10)


@pytest.fixture(scope="module")
def m():
    with torch.inference_mode():
        return sb.load()


@pytest.fixture(scope="module")
def centre(m):
    """The scene every edit starts from: a red circle in the middle of a yellow background, inverted."""
    with torch.inference_mode():
        return sb.invert(m, sb.scenes.render("yellow", [("red", "circle", (36, 36, 56))]))


@pytest.fixture(scope="module")
def placements(m):
    with torch.inference_mode():
        return {where: sb.localisation(m, where) for where in sb.PLACEMENTS}


def test_shape_word_attention_sits_on_its_object(placements):
    for where, fig in placements.items():
        assert fig["circle"]["ratio"] >= SHAPE_RATIO, (where, fig["circle"])
        # control: the same map scored on the mirror image of the object finds nothing there
        assert fig["circle"]["mirror_ratio"] < MAX_CONTROL_RATIO, (where, fig["circle"])


def test_colour_word_attention_sits_on_its_object(placements):
    """'red' of 'a red circle on a yellow background': measured mass ratio 2.64-2.70 over four placements (the
    shape word's map is sharper: 7.5-7.8); the same map on the mirror image of the object 0.76-0.79."""
    for where, fig in placements.items():
        assert fig["red"]["ratio"] >= WORD_RATIO, (where, fig["red"])
        assert fig["red"]["mirror_ratio"] < MAX_CONTROL_RATIO, (where, fig["red"])


def test_maps_are_neither_flipped_nor_transposed(placements):
    """An object on the left has its word's map left of centre, and so on for each side: a transposed map would put
    the left object's attention at the top, a flipped one on the right."""
    axis = {"left": (0, -1), "right": (0, 1), "top": (1, -1), "bottom": (1, 1)}
    for where, (coord, sign) in axis.items():
        cx = placements[where]["circle"]["centroid"]
        offset, other = cx[coord] - sb.SIZE / 2, cx[1 - coord] - sb.SIZE / 2
        assert sign * offset > 10, (where, cx)         # measured 29-31 px toward the object
        assert sign * offset > abs(other), (where, cx)


def test_photo_model_control_has_flat_maps(m):
    """The same measurement on the photo model (which never saw a scene) stays near 1: the check can fail."""
    with torch.inference_mode():
        fig = sb.localisation(sb.load(demo_model.CHECKPOINT_PATH), "left")
    assert fig["circle"]["ratio"] < MAX_CONTROL_RATIO, fig["circle"]


@pytest.fixture(scope="module")
def swaps(m, centre):
    green = "a green circle on a yellow background"
    with torch.inference_mode():
        edit = lambda **kw: sb.swap_figures(m, centre, sb.p2plus_edit(m, centre, cfg=5.0, **kw), "green")
        return {"free": edit(target=green), "blend": edit(target=green, blend_words="circle"),
                "same": edit(target=centre.scene.caption),
                "reweight": edit(target=centre.scene.caption, mode="reweight", reweight="red:-2")}


def test_p2plus_word_swap_recolours_the_circle_and_keeps_the_rest(swaps):
    """Negative-prompt inversion at cfg 5, 'red circle' -> 'green circle': measured distance of the circle's mean
    colour to green 0.73 -> 0.21, change inside the circle 0.27, outside its 12 px neighbourhood 0.029."""
    free, same = swaps["free"], swaps["same"]
    assert free["recon_vs_inversion"] < 1e-3            # row 0 is the reconstruction
    assert free["to_target_after"] < free["to_target_before"] - 0.3, free
    assert free["inside_change"] > 5 * free["outside_change"], free
    assert free["outside_change"] < 0.05, free
    # control: the same prompt changes nothing
    assert same["inside_change"] < 1e-3 and same["outside_change"] < 1e-3, same


def test_p2plus_local_blend_keeps_the_outside_at_the_reconstruction(swaps):
    """The same swap with local blend on 'circle' at the node's defaults: measured change outside the circle's 12 px
    neighbourhood 0.0002 (without blend 0.029), the circle's distance to green 0.73 -> 0.23."""
    blend, free = swaps["blend"], swaps["free"]
    assert blend["outside_change"] < 0.1 * free["outside_change"], swaps
    assert blend["to_target_after"] < blend["to_target_before"] - 0.3, blend


@pytest.mark.xfail(strict=True, reason="not reached: reweighting 'red' changes the background more than the circle "
                                       "though its map sits on the circle (2.6x): at cfg 5 'red:-2' inside 0.10, "
                                       "outside 0.31; 'red:0' 0.059 / 0.14; 'red:2' 0.056 / 0.035")
def test_p2plus_reweight_of_the_colour_word_changes_its_object_most(swaps):
    fig = swaps["reweight"]
    assert fig["inside_change"] > 2 * fig["outside_change"], fig


def test_kv_inject_keeps_the_background_of_the_source_in_a_new_generation(m, centre):
    """'a red circle' -> 'a red square', a new generation from seeded noise with the source's K/V in every layer
    from the first step (start_layer 0, start_percent 0): measured mean distance to the source outside both shapes
    0.22-0.26 vs 0.33-0.36 for plain sampling from the same noises (seeds 0-2; sums 0.74 vs 1.01); at the node's
    defaults (decoder layers from 8 %) 0.28-0.31. This model draws no scene from pure noise (plain sampling paints
    a purple ground: it leans on the scene still visible at its largest noise level, signal-to-noise 0.15 in the
    inverted start), so plain sampling is a weak baseline; the bar asks KV Inject to beat it on every seed."""
    kv, plain = [], []
    with torch.inference_mode():
        for seed in (0, 1, 2):
            fig = sb.kv_inject_figures(m, centre, "a red square on a yellow background", seed=seed, start_layer=0,
                                       start_percent=0.0)
            kv.append(fig["kv_outside"])
            plain.append(fig["plain_outside"])
    assert sum(kv) < 0.85 * sum(plain), (kv, plain)
    assert all(k < p for k, p in zip(kv, plain)), (kv, plain)


def test_rival_keeps_the_palette_and_the_variations_differ(m, centre):
    """Measured (left placement): colour-histogram distance to the source 0.26-0.32 for RIVAL, 1.77-1.96 for plain
    text-to-image with the same prompt and seed; variations' pairwise mean |diff| 0.038-0.046, 16.8-18.4 dB to the
    source (not copies)."""
    with torch.inference_mode():
        fig = sb.rival_figures(m, centre)
    rival, plain = fig["rival_hist"], fig["plain_hist"]
    assert sum(rival) / len(rival) < 0.6 * sum(plain) / len(plain), fig
    assert max(rival) < max(plain), fig
    assert min(fig["pairwise_difference"]) > 0.02, fig
    assert max(fig["to_source_psnr"]) < 30, fig


def test_guidance_inversion_restores_the_reconstruction_at_cfg_7_5(m, centre):
    """Measured: cfg 1 69.8 dB, plain DDIM at cfg 7.5 15.3 dB, null-text 46.9 dB, negative-prompt 69.8 dB."""
    with torch.inference_mode():
        fig = sb.guidance_inversion_figures(m, centre)
    assert fig["cfg1"] > 50, fig
    assert fig["plain"] < fig["cfg1"] - 20, fig            # plain DDIM at cfg 7.5 drifts
    assert fig["null-text"] > fig["plain"] + 20, fig
    assert fig["negative-prompt"] > fig["plain"] + 20, fig


# -- every map path agrees on where the shape word is ----------------------------------------------------------------
@pytest.fixture(scope="module")
def paths(m):
    """'circle' of the left-placed scene from the viewer (cond and uncond branch, MASK and rendered tile), P2Plus's
    local-blend record and KV Inject masked mode's source and target maps, at map size auto and latent/1."""
    with torch.inference_mode():
        return sb.map_path_figures(m, "left", map_sizes=("auto", "latent/1"))


def test_viewer_tile_cond_and_uncond_branches_agree_on_the_shape_word(paths):
    """Measured (left placement; top in brackets), centroids of each map's top 20 %: the tile read back through its
    colour scale is the MASK (corr 0.9999+, centroid 0.5 (1.2) px: the tile's 256 levels tie at the cut); the uncond
    branch (negative prompt 'a circle', cfg 1.5) vs the cond branch: centroid 7.4 (7.2) px, IoU 0.69 (0.72), corr
    0.98, mass ratio 3.0 (2.9). Controls: the cond map mirrored 48.7 (53.4) px / IoU 0.10 (0.03); the word
    'background' IoU 0.02 (0.04). 12 px is half the circle's radius."""
    assert paths["viewer tile"]["corr"] > 0.99 and paths["viewer tile"]["centroid_px"] < 2, paths["viewer tile"]
    uncond = paths["viewer uncond"]
    assert uncond["iou"] > 0.5 and uncond["centroid_px"] < 12, uncond
    assert uncond["ratio"] > WORD_RATIO, uncond
    mirrored, other = paths["viewer cond mirrored (control)"], paths["viewer cond 'background' (control)"]
    assert mirrored["iou"] < 0.2 and mirrored["centroid_px"] > 10, mirrored
    assert other["iou"] < 0.2, other


def test_p2plus_and_kv_masked_maps_are_the_viewers_maps_at_their_resolution(paths):
    """P2Plus's local blend and KV Inject's masked mode read the layers at min(latent/4, the coarsest) = the 8x8
    layers here: their maps are the viewer's 8x8 (latent/2) map of the same word, not transposed or flipped (the
    mirrored map correlates less) and the two paths give the same source map (measured corr 0.9997 both, KV's target
    map 0.9993; mirrored -0.10)."""
    blend, source, target = (paths[k] for k in sb.LATENT4_PATHS)
    mirrored = paths["p2plus local blend mirrored (control)"]
    assert blend["corr"] > P2PLUS_VIEWER_CORR, paths
    assert mirrored["corr"] < blend["corr"] - 0.25, (mirrored, blend)
    assert abs(source["corr"] - blend["corr"]) < 1e-3 and abs(source["ratio"] - blend["ratio"]) < 1e-3, paths
    assert target["corr"] > P2PLUS_VIEWER_CORR, paths


def test_p2plus_and_kv_masked_maps_sit_on_the_object(paths):
    """At map size auto (the 8x8 layers here): measured mass ratio in the circle 8.25 (P2Plus and KV's source map,
    the same map) and 8.15 (KV's target map); the P2Plus map mirrored 0.05."""
    for name in sb.LATENT4_PATHS:
        assert paths[name]["ratio"] >= SHAPE_RATIO, (name, paths[name])
    mirrored = paths["p2plus local blend mirrored (control)"]
    assert mirrored["ratio"] < MAX_CONTROL_RATIO, mirrored


def test_p2plus_and_kv_masked_maps_at_latent_1_sit_on_the_object(paths):
    """blend_map_size / mask_map_size latent/1 read the 16x16 layers: measured mass ratio in the circle 7.84 (P2Plus
    and KV's source map, the same map) and 7.84 (KV's target map), top placement 7.62 / 7.72; correlation with the
    viewer's latent/1 map 0.996-1.0. Control: the same map mirrored scores 0.03-0.10."""
    for name in sb.LATENT4_PATHS:
        fig = paths[f"{name} latent/1"]
        measured(f"{name}: mass ratio latent/1 {fig['ratio']:.2f} (corr with the viewer {fig['corr']:.3f}), "
                 f"auto {paths[name]['ratio']:.2f}")
        assert fig["ratio"] >= SHAPE_RATIO and fig["corr"] > P2PLUS_VIEWER_CORR, (name, fig)
    mirrored = paths["p2plus local blend latent/1 mirrored (control)"]
    assert mirrored["ratio"] < MAX_CONTROL_RATIO, mirrored


# -- P2Plus local blend on the object word, reweight, refine ----------------------------------------------------------
@pytest.fixture(scope="module")
def blends(m, centre):
    with torch.inference_mode():
        return sb.local_blend_figures(m, centre, thresholds=(0.3, 0.7), map_sizes=("auto", "latent/1"))


def test_p2plus_local_blend_keeps_the_source_outside_its_mask(blends):
    """Local blend on 'circle', swap 'red' -> 'green', cfg 5: outside the blend mask the edited row equals the
    reconstruction up to the inversion error (measured 0.0017 at blend_threshold 0.3, 0.0014 at 0.7; masks 25 % of
    the picture) where the same edit without blend changed it (control, measured 0.031 there)."""
    for t in (0.3, 0.7):
        fig = blends[sb.blend_key("auto", t)]
        assert fig["blend_mask_share"] < 0.9, (t, fig)
        assert fig["outside_blend_mask"] < 0.005, (t, fig)
        assert fig["no_blend_outside_blend_mask"] > 4 * fig["outside_blend_mask"], (t, fig)


def edit_and_outside_kept(fig: dict, free: dict) -> bool:
    """The local blend keeps the edit inside the circle (> 0.8 of the edit without blend) and the source outside
    its 12 px ring (< 0.5 of the change without blend there)."""
    return fig["inside_change"] > 0.8 * free["inside_change"] and fig["outside_12px"] < 0.5 * free["outside_12px"]


@pytest.mark.parametrize("map_size", ["auto", "latent/1"])
def test_p2plus_local_blend_on_the_object_word_keeps_the_edit_and_the_outside(blends, map_size):
    """Local blend on 'circle' at blend_threshold 0.3 (the default), swap 'red' -> 'green', cfg 5, per
    blend_map_size. Measured at auto (the default; the 8x8 layers here): mask 25 % of the picture and all of the
    circle, change inside 0.238 (no blend 0.267), outside the 12 px ring 0.0002 (no blend 0.029), outside the mask
    0.0017, distance to green 0.73 -> 0.23; higher thresholds trade the edit away (0.5: inside 0.222, 0.7: 0.211,
    below the 0.8 x bar, 0.9: 0.160, the mask leaves 15 % of the circle). At latent/1 (the 16x16 layers): mask 27 %,
    inside 0.274, outside 0.0005, outside the mask 0.0021, distance to green 0.17 (0.5: 0.229; 0.7: 0.158, the mask
    93 % of the circle). Control: the edit without blend fails the check (its outside is its own); the model before
    the grounding stage failed it at auto too (its 8x8 maps were flat, the mask at 0.3 was the whole picture)."""
    free = blends["no blend"]
    for t in (0.3, 0.7):
        fig = blends[sb.blend_key(map_size, t)]
        measured(f"{map_size} threshold {t}: inside {fig['inside_change']:.3f} outside 12px "
                 f"{fig['outside_12px']:.4f} mask share {fig['blend_mask_share']:.2f}; no blend "
                 f"{free['inside_change']:.3f} / {free['outside_12px']:.4f}")
    fig = blends[sb.blend_key(map_size, 0.3)]
    assert edit_and_outside_kept(fig, free), (fig, free)
    assert fig["blend_mask_covers_object"] > 0.95 and fig["blend_mask_share"] < 0.5, fig
    assert fig["to_target_after"] < fig["to_target_before"] - 0.3, fig
    assert fig["outside_blend_mask"] < 0.005, fig
    assert not edit_and_outside_kept(free, free)        # control: the edit without blend does not pass


@pytest.fixture(scope="module")
def refines(m, centre):
    """The centre scene inverted with 'a circle on a yellow background'; refine adds 'green' to the circle, or to
    the background (the control)."""
    with torch.inference_mode():
        return sb.reweight_refine_figures(m, centre, reweights=("circle:-2", "background:-2"))


@pytest.mark.xfail(strict=True, reason="not reached since the grounding stage: the circle moves toward green (0.73 -> "
                                       "0.63) and the background does not (0.78 -> 0.81), but the background drifts "
                                       "almost as much as the circle changes (inside 0.079, outside the 12 px ring "
                                       "0.046); the model before it: 0.138 / 0.048")
def test_p2plus_refine_adds_the_word_where_it_applies(refines):
    """'a circle' -> 'a green circle' (refine, negative-prompt inversion at cfg 5). Control: 'green' added to the
    background changes the outside most (measured inside 0.097, outside 0.247) and turns it toward green (0.78 ->
    0.75), so the same check fails there."""
    fig = refines["refine 'green' on the circle"]
    assert fig["inside_change"] > 2 * fig["outside_12px"], fig
    assert fig["to_target_after"] < fig["to_target_before"] - 0.1, fig
    control = refines["refine 'green' on the background (control)"]
    assert not control["inside_change"] > 2 * control["outside_12px"], control
    assert control["background_to_green_after"] < control["background_to_green_before"], control


def test_p2plus_reweight_of_the_shape_word_changes_its_object_most(refines):
    """'circle:-2', cfg 5: measured change inside the circle 0.035, outside its 12 px ring 0.0042 ('circle:0'
    0.013 / 0.0013, 'circle:2' 0.013 / 0.0012). Control: reweighting 'background' changes the outside most."""
    fig = refines["reweight circle:-2"]
    assert fig["inside_change"] > 2 * fig["outside_12px"], fig
    control = refines["reweight background:-2"]
    assert not control["inside_change"] > 2 * control["outside_12px"], control


# -- KV Inject masked mode: the object moves and keeps its colours ---------------------------------------------------
KV_MASKED_AUTO = ("not reached at mask_map_size auto, though its masks sit on the circle (8.2x): this model draws no "
                  "scene from pure noise (plain sampling, seeds 0-2, cfg 5: 15827-16077 of 16384 px nearer the "
                  "circle's red than the yellow background, a purple ground), so there is no moved red circle to "
                  "keep. Masked mode (start_layer 0, start_percent 0): 8967-14035 px, their colour 0.43-0.45 from the "
                  "circle's red (plain 0.45-0.47), histogram distance to the source 1.59-1.82 (plain 1.94-1.96); at "
                  "the defaults 10722-13396 px, 0.42-0.47, 1.66-1.71")
KV_MASKED_LATENT1 = ("not reached at mask_map_size latent/1 either (masks 7.8x on the circle), for the same reason: "
                     "13088-15750 px, colour 0.47-0.53 from the circle's red, histogram 1.86-1.93; at the defaults "
                     "14805-15606 px, 0.49-0.53")


@pytest.mark.parametrize("map_size", [
    pytest.param("auto", marks=pytest.mark.xfail(strict=True, reason=KV_MASKED_AUTO)),
    pytest.param("latent/1", marks=pytest.mark.xfail(strict=True, reason=KV_MASKED_LATENT1))])
def test_kv_inject_masked_mode_keeps_the_colours_of_a_moved_object(m, map_size):
    with torch.inference_mode():
        inv = sb.invert(m, sb.placed_scene("left"))
        fig = sb.kv_masked_figures(m, inv, settings=dict(start_layer=0, start_percent=0.0), modes=("masked",),
                                   mask_map_size=map_size)
    area = int(inv.scene.objects[0].mask.sum())
    for row in fig["masked"]:
        assert row["object_px"] > 0.5 * area and row["colour_to_source"] < 0.25, fig


# -- StyleDiffusion keeps the layout ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def styles(m, centre):
    with torch.inference_mode():
        return sb.style_figures(m, centre)


def test_style_diffusion_reconstruction_and_colour_edit_keep_the_layout(styles):
    """StyleDiffusion Mapper (4 inner steps, cfg 5) then P2Plus with the STYLE: measured reconstruction 23.4 dB, IoU
    of the non-background pixels with the circle 0.72; the 'red' -> 'green' edit keeps the layout (IoU 0.73, change
    outside the 12 px ring 0.047). Control: the same without the STYLE (plain DDIM at cfg 5): 18.0 dB, IoU 0.31 and
    0.0 (the edit loses the circle)."""
    style, plain = styles["style"], styles["no style (control)"]
    assert style["recon_psnr"] > plain["recon_psnr"] + 3, styles
    assert style["recon_layout_iou"] > 0.5 and style["edit_layout_iou"] > 0.5, styles
    assert plain["recon_layout_iou"] < style["recon_layout_iou"] - 0.25 and plain["edit_layout_iou"] < 0.3, styles
    assert style["edit_outside_change"] < 0.06, styles


@pytest.mark.xfail(strict=True, reason="not reached: with the STYLE the colour-word swap keeps the circle red (its "
                                       "distance to green 0.71 -> 0.63; the style values replace the swapped word's "
                                       "until style_end_percent 0.5)")
def test_style_diffusion_colour_edit_recolours_the_circle(styles):
    fig = styles["style"]
    assert fig["edit_to_target"] < fig["edit_to_target_before"] - 0.3, fig


# -- two objects: each word on its own object -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two(m):
    with torch.inference_mode():
        return {"circle left": sb.two_object_figures(m), "circle right": sb.two_object_figures(m, swapped=True)}


def test_two_object_scene_puts_each_word_on_its_own_object(two):
    """'a red circle and a blue square on a yellow background', circle left and square right, then the two swapped
    (same caption): each of the four words has more mass on its own object than on the other (measured own
    2.28-5.63, other 0.96-3.42; the smallest margin 'circle' 3.68 vs 3.42), and the circle's map is left of the
    square's exactly when the circle is on the left (the swap is the control: maps that ignored the objects would
    fail one of the two)."""
    for arrangement, fig in two.items():
        for word in ("red", "circle", "blue", "square"):
            assert fig[word]["own"] > fig[word]["other"] + 0.05, (arrangement, word, fig[word])
    left, right = two["circle left"], two["circle right"]
    assert left["circle"]["centroid"][0] < left["square"]["centroid"][0], left
    assert right["circle"]["centroid"][0] > right["square"]["centroid"][0], right


def test_two_object_scene_words_reach_twice_their_area_share(two):
    """Measured own-object mass ratio (circle left; right): red 2.39 (2.28), circle 3.85 (3.68), blue 5.54 (5.63),
    square 4.63 (4.61)."""
    for arrangement, fig in two.items():
        for word in ("red", "circle", "blue", "square"):
            assert fig[word]["own"] >= WORD_RATIO, (arrangement, word, fig[word])
