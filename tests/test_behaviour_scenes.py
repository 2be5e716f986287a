"""Each technique does what it is for, on a model that has learned where things are: the scenes model
(models/ic_demo_scenes.safetensors, scripts/train_scenes_model.py), a 1 M-parameter UNet trained here on drawn scenes
of coloured shapes, loaded by ComfyUI's stock loader. Masks come from the scene generator (tests/harness/scenes.py),
which knows where it drew each object. Every check has a control that shows it can fail: the same measurement on
the photo model (flat attention), on the mirror image of the object's mask, or with the edit off.

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
SHAPE_RATIO = 1.8           # shape word measured 2.06-2.15 over four placements; 1.8 leaves room for the other tree
MAX_CONTROL_RATIO = 1.2     # mirrored mask 0.79-0.88, photo model 0.83-0.89 (flat: 1.0)
P2PLUS_VIEWER_CORR = 0.65   # local blend's map vs the viewer's 8x8 map: corr 0.81 (the mirrored map 0.38); not 1:
                            # the viewer drops the start token and renormalises each pixel over the others


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


@pytest.mark.xfail(strict=True, reason="not reached: the colour word's map is flat in the viewer (ratio 1.08-1.12 on "
                                       "the committed model); the frozen causal text encoder carries the colour into "
                                       "the later tokens ('circle' 3.6x, 'on' 4.0x in raw maps)")
def test_colour_word_attention_sits_on_its_object(placements):
    for where, fig in placements.items():
        assert fig["red"]["ratio"] >= WORD_RATIO, (where, fig["red"])


def test_maps_are_neither_flipped_nor_transposed(placements):
    """An object on the left has its word's map left of centre, and so on for each side: a transposed map would put
    the left object's attention at the top, a flipped one on the right."""
    axis = {"left": (0, -1), "right": (0, 1), "top": (1, -1), "bottom": (1, 1)}
    for where, (coord, sign) in axis.items():
        cx = placements[where]["circle"]["centroid"]
        offset, other = cx[coord] - sb.SIZE / 2, cx[1 - coord] - sb.SIZE / 2
        assert sign * offset > 3, (where, cx)          # measured 6.2-7.7 px toward the object
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
    colour to green 0.73 -> 0.19, change inside the circle 0.27, outside its 12 px neighbourhood 0.021."""
    free, same = swaps["free"], swaps["same"]
    assert free["recon_vs_inversion"] < 1e-3            # row 0 is the reconstruction
    assert free["to_target_after"] < free["to_target_before"] - 0.3, free
    assert free["inside_change"] > 5 * free["outside_change"], free
    assert free["outside_change"] < 0.05, free
    # control: the same prompt changes nothing
    assert same["inside_change"] < 1e-3 and same["outside_change"] < 1e-3, same


@pytest.mark.xfail(strict=True, reason="not reached at blend_map_size auto: at the default blend_threshold 0.3 the "
                                       "local-blend mask covers the whole latent on this model (the result equals no "
                                       "blend; its maps come from the 8x8 layers, flat here); at 0.6 it removes most "
                                       "of the edit inside the circle and not outside (0.024 vs 0.021). latent/1 "
                                       "reaches it: test_p2plus_local_blend_at_latent_1_keeps_the_edit_and_the_outside")
def test_p2plus_local_blend_keeps_the_outside_at_the_reconstruction(swaps):
    assert swaps["blend"]["outside_change"] < 0.5 * swaps["free"]["outside_change"], swaps


@pytest.mark.xfail(strict=True, reason="not reached: reweighting 'red' changes the background more than the circle "
                                       "(measured inside 0.011, outside 0.039): the colour word's map is flat")
def test_p2plus_reweight_of_the_colour_word_changes_its_object_most(swaps):
    fig = swaps["reweight"]
    assert fig["inside_change"] > 2 * fig["outside_change"], fig


def test_kv_inject_keeps_the_background_of_the_source_in_a_new_generation(m, centre):
    """'a red circle' -> 'a red square', a new generation from seeded noise with the source's K/V in every layer
    from the first step (start_layer 0, start_percent 0): measured mean distance to the source outside both shapes
    0.081 vs 0.161 for plain sampling from the same noises (seeds 0-2). At the node's defaults (decoder layers from
    8 %) it is 0.169: not better than plain sampling, said in models/README.md."""
    kv, plain = [], []
    with torch.inference_mode():
        for seed in (0, 1, 2):
            fig = sb.kv_inject_figures(m, centre, "a red square on a yellow background", seed=seed, start_layer=0,
                                       start_percent=0.0)
            kv.append(fig["kv_outside"])
            plain.append(fig["plain_outside"])
    assert sum(kv) < 0.7 * sum(plain), (kv, plain)
    assert max(kv) < max(plain), (kv, plain)


def test_rival_keeps_the_palette_and_the_variations_differ(m, centre):
    """Measured: colour-histogram distance to the source 0.28-0.39 for RIVAL, 0.47-1.69 (mean 1.07) for plain
    text-to-image with the same prompt and seed; variations' pairwise mean |diff| 0.042-0.051, 15.7-16.7 dB to the
    source (not copies)."""
    with torch.inference_mode():
        fig = sb.rival_figures(m, centre)
    rival, plain = fig["rival_hist"], fig["plain_hist"]
    assert sum(rival) / len(rival) < 0.6 * sum(plain) / len(plain), fig
    assert max(rival) < max(plain), fig
    assert min(fig["pairwise_difference"]) > 0.02, fig
    assert max(fig["to_source_psnr"]) < 30, fig


def test_guidance_inversion_restores_the_reconstruction_at_cfg_7_5(m, centre):
    """Measured: cfg 1 69.5 dB, plain DDIM at cfg 7.5 15.1 dB, null-text 47.8 dB, negative-prompt 69.5 dB."""
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
    """Measured (left placement): the tile read back through its colour scale is the MASK (corr 0.999+, centroid
    0.02 px); the uncond branch (negative prompt 'a circle', cfg 1.5) vs the cond branch: centroid 3.9 px, IoU of
    the top 20 % 0.72 (top placement 5.3 px, 0.79). Controls: the cond map mirrored 13.4 px / IoU 0.035 (top
    14.8 / 0.014); the word 'background' IoU 0.009 (0.026)."""
    assert paths["viewer tile"]["corr"] > 0.99 and paths["viewer tile"]["centroid_px"] < 1, paths["viewer tile"]
    uncond = paths["viewer uncond"]
    assert uncond["iou"] > 0.5 and uncond["centroid_px"] < 8, uncond
    assert uncond["ratio"] > 1.2, uncond                          # measured 1.34-1.36: on the object, not flat
    mirrored, other = paths["viewer cond mirrored (control)"], paths["viewer cond 'background' (control)"]
    assert mirrored["iou"] < 0.2 and mirrored["centroid_px"] > 10, mirrored
    assert other["iou"] < 0.2, other


def test_p2plus_and_kv_masked_maps_are_the_viewers_maps_at_their_resolution(paths):
    """P2Plus's local blend and KV Inject's masked mode read the layers at min(latent/4, the coarsest) = the 8x8
    layers here: their maps are the viewer's 8x8 (latent/2) map of the same word (correlation, see
    models/README.md), not transposed or flipped (the mirrored map correlates less) and the two paths give the same
    source map (measured corr 0.811 both, KV's target map 0.802)."""
    blend, source, target = (paths[k] for k in sb.LATENT4_PATHS)
    mirrored = paths["p2plus local blend mirrored (control)"]
    assert blend["corr"] > P2PLUS_VIEWER_CORR, paths
    assert mirrored["corr"] < blend["corr"] - 0.25, (mirrored, blend)
    assert abs(source["corr"] - blend["corr"]) < 1e-3 and abs(source["ratio"] - blend["ratio"]) < 1e-3, paths
    assert target["corr"] > P2PLUS_VIEWER_CORR, paths


@pytest.mark.xfail(strict=True, reason="not reached: P2Plus's local blend and KV masked mode read this model's 8x8 "
                                       "layers, where 'circle' is not on the object (mass ratio 0.82-0.98; the "
                                       "viewer's 8x8 map 0.73-0.84) while the 16x16 layers localise it (3.5-3.6x)")
def test_p2plus_and_kv_masked_maps_sit_on_the_object(paths):
    for name in sb.LATENT4_PATHS:
        assert paths[name]["ratio"] >= SHAPE_RATIO, (name, paths[name])


def test_p2plus_and_kv_masked_maps_at_latent_1_sit_on_the_object(paths):
    """blend_map_size / mask_map_size latent/1 read the 16x16 layers: measured mass ratio in the circle 3.60 (P2Plus
    and KV's source map, the same map) and 4.72 (KV's target map), top placement 3.63 / 4.67; correlation with the
    viewer's latent/1 map 0.975-0.992. Controls: the same map mirrored scores 0.61-0.63; the same check at the
    default (auto: the 8x8 layers here) fails, 0.82-0.98 (the strict xfail above)."""
    for name in sb.LATENT4_PATHS:
        fig = paths[f"{name} latent/1"]
        measured(f"{name}: mass ratio latent/1 {fig['ratio']:.2f} (corr with the viewer {fig['corr']:.3f}), "
                 f"auto {paths[name]['ratio']:.2f}")
        assert fig["ratio"] >= SHAPE_RATIO and fig["corr"] > P2PLUS_VIEWER_CORR, (name, fig)
        assert paths[name]["ratio"] < SHAPE_RATIO, (name, paths[name])
    mirrored = paths["p2plus local blend latent/1 mirrored (control)"]
    assert mirrored["ratio"] < MAX_CONTROL_RATIO, mirrored


# -- P2Plus local blend on the object word, reweight, refine ----------------------------------------------------------
@pytest.fixture(scope="module")
def blends(m, centre):
    with torch.inference_mode():
        return sb.local_blend_figures(m, centre, thresholds=(0.3, 0.7), map_sizes=("auto", "latent/1"))


def test_p2plus_local_blend_keeps_the_source_outside_its_mask(blends):
    """Local blend on 'circle' at blend_threshold 0.7, swap 'red' -> 'green', cfg 5: outside the blend mask the
    edited row equals the reconstruction up to the inversion error (measured 0.0014) where the same edit without
    blend changed it (control, measured 0.087 there); at 0.3 the mask is the whole picture (measured share 1.0)."""
    fig = blends["blend circle 0.7"]
    assert fig["blend_mask_share"] < 0.9, fig
    assert fig["outside_blend_mask"] < 0.005, fig
    assert fig["no_blend_outside_blend_mask"] > 4 * fig["outside_blend_mask"], fig
    assert blends["blend circle 0.3"]["blend_mask_share"] == 1.0, blends["blend circle 0.3"]


def edit_and_outside_kept(fig: dict, free: dict) -> bool:
    """The local blend keeps the edit inside the circle (> 0.8 of the edit without blend) and the source outside
    its 12 px ring (< 0.5 of the change without blend there)."""
    return fig["inside_change"] > 0.8 * free["inside_change"] and fig["outside_12px"] < 0.5 * free["outside_12px"]


@pytest.mark.xfail(strict=True, reason="not reached at blend_map_size auto: the blend mask comes from the 8x8 maps, "
                                       "which are not on the circle; at threshold 0.7 it covers 49 % of the circle and "
                                       "69 % of the picture, the edit inside drops from 0.27 to 0.012 (0.9: 41 % / "
                                       "33 %, 0.002); at 0.3 and 0.5 it covers everything (outside the 12 px ring "
                                       "0.021 as without blend). latent/1 reaches it (the test below)")
def test_p2plus_local_blend_on_the_object_word_keeps_the_edit_and_the_outside(blends):
    free = blends["no blend"]
    assert any(edit_and_outside_kept(fig, free)
               for name, fig in blends.items() if name != "no blend" and "latent/" not in name), blends


def test_p2plus_local_blend_at_latent_1_keeps_the_edit_and_the_outside(blends):
    """blend_map_size latent/1 (the 16x16 layers, where 'circle' is on the circle), swap 'red' -> 'green', cfg 5.
    Measured: threshold 0.3 (the default) mask 39 % of the picture and all of the circle, change inside 0.268 (no
    blend 0.272), outside the 12 px ring 0.0022 (no blend 0.021), outside its mask 0.0011, distance to green 0.73 ->
    0.18; threshold 0.7: mask 23 %, inside 0.263, outside 0.0004 (0.5: the same; 0.9: the mask covers 87 % of the
    circle and the edit inside drops to 0.097). Control: the same check at blend_map_size auto fails at both
    thresholds (the strict xfail above)."""
    free = blends["no blend"]
    for t in (0.3, 0.7):
        fig = blends[f"blend circle latent/1 {t}"]
        auto = blends[f"blend circle {t}"]
        measured(f"threshold {t}: latent/1 inside {fig['inside_change']:.3f} outside 12px {fig['outside_12px']:.4f} "
                 f"mask share {fig['blend_mask_share']:.2f}; auto inside {auto['inside_change']:.3f} outside 12px "
                 f"{auto['outside_12px']:.4f}; no blend {free['inside_change']:.3f} / {free['outside_12px']:.4f}")
        assert edit_and_outside_kept(fig, free), (t, fig, free)
        assert fig["blend_mask_covers_object"] > 0.95 and fig["blend_mask_share"] < 0.6, (t, fig)
        assert fig["to_target_after"] < fig["to_target_before"] - 0.3, (t, fig)
        assert not edit_and_outside_kept(auto, free), auto
    assert blends["blend circle latent/1 0.3"]["outside_blend_mask"] < 0.005, blends["blend circle latent/1 0.3"]


@pytest.fixture(scope="module")
def refines(m, centre):
    """The centre scene inverted with 'a circle on a yellow background'; refine adds 'green' to the circle, or to
    the background (the control)."""
    with torch.inference_mode():
        return sb.reweight_refine_figures(m, centre, reweights=("circle:-2",))


def test_p2plus_refine_adds_the_word_where_it_applies(refines):
    """'a circle' -> 'a green circle' (refine, negative-prompt inversion at cfg 5): measured change inside the circle
    0.138, outside its 12 px ring 0.048, circle's distance to green 0.73 -> 0.58. Control: 'green' added to the
    background changes the outside most (inside 0.102, outside 0.227), so the same check fails there."""
    fig = refines["refine 'green' on the circle"]
    assert fig["inside_change"] > 2 * fig["outside_12px"], fig
    assert fig["to_target_after"] < fig["to_target_before"] - 0.1, fig
    control = refines["refine 'green' on the background (control)"]
    assert not control["inside_change"] > 2 * control["outside_12px"], control
    assert control["background_to_green_after"] < control["background_to_green_before"], control


@pytest.mark.xfail(strict=True, reason="not reached: reweighting the shape word changes the background more than the "
                                       "circle (cfg 5: 'circle:-2' inside 0.015, outside 0.045; 'circle:0' 0.006 / "
                                       "0.015; 'circle:2' 0.007 / 0.011; 'red:-2' 0.070 / 0.25)")
def test_p2plus_reweight_of_the_shape_word_changes_its_object_most(refines):
    fig = refines["reweight circle:-2"]
    assert fig["inside_change"] > 2 * fig["outside_12px"], fig


# -- KV Inject masked mode: the object moves and keeps its colours ---------------------------------------------------
KV_MASKED_AUTO = ("not reached at mask_map_size auto: new generations (seeds 0-2, the source caption, cfg 5) with the "
                  "left circle's K/V in masked mode (start_layer 0, start_percent 0) are washed out: 396-412 px near "
                  "the circle's red (the source: 1812), at distance 0.46-0.47 from it (plain sampling 0.49-0.52); the "
                  "palette is the source's (histogram distance 0.36-0.43 vs plain 1.26-1.87) but no red object is "
                  "drawn. At the defaults (decoder layers from 8 %) 392-517 px, 0.51-0.56, histogram 1.84-1.91: no "
                  "better than plain. Masked equals mutual here (the 8x8 masks are flat)")
KV_MASKED_LATENT1 = ("not reached at mask_map_size latent/1 either, though its masks sit on the circle (mass ratio "
                     "3.6-4.7): the same generations draw 505-1853 px near red at distance 0.47-0.50 from it, "
                     "histogram distance 1.48-1.90 (no longer washed out, no nearer the source's palette than plain); "
                     "at the defaults 511-640 px, 0.52-0.54 (mutual 190-511 px, 0.53-0.59)")


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
    """StyleDiffusion Mapper (4 inner steps, cfg 5) then P2Plus with the STYLE: measured reconstruction 24.1 dB, IoU
    of the non-background pixels with the circle 0.72; the 'red' -> 'green' edit keeps the layout (IoU 0.73, change
    outside the 12 px ring 0.031). Control: the same without the STYLE (plain DDIM at cfg 5): 18.0 dB, IoU 0.04 and
    0.0 (the circle is lost)."""
    style, plain = styles["style"], styles["no style (control)"]
    assert style["recon_psnr"] > plain["recon_psnr"] + 3, styles
    assert style["recon_layout_iou"] > 0.5 and style["edit_layout_iou"] > 0.5, styles
    assert plain["recon_layout_iou"] < 0.3 and plain["edit_layout_iou"] < 0.3, styles
    assert style["edit_outside_change"] < 0.06, styles


@pytest.mark.xfail(strict=True, reason="not reached: with the STYLE the colour-word swap keeps the circle red (its "
                                       "distance to green 0.71 -> 0.65; the style values replace the swapped word's "
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
    1.09-1.91, other 0.90-1.21; the smallest margin 'circle' 1.16 vs 1.01), and the circle's map is left of the
    square's exactly when the circle is on the left (the swap is the control: maps that ignored the objects would
    fail one of the two)."""
    for arrangement, fig in two.items():
        for word in ("red", "circle", "blue", "square"):
            assert fig[word]["own"] > fig[word]["other"] + 0.05, (arrangement, word, fig[word])
    left, right = two["circle left"], two["circle right"]
    assert left["circle"]["centroid"][0] < left["square"]["centroid"][0], left
    assert right["circle"]["centroid"][0] > right["square"]["centroid"][0], right


@pytest.mark.xfail(strict=True, reason="not reached: in the two-object scene the words' mass on their own object is "
                                       "1.09-1.18 ('red', 'circle'), 1.31 ('square'), 1.89-1.91 ('blue'), below 2x")
def test_two_object_scene_words_reach_twice_their_area_share(two):
    for arrangement, fig in two.items():
        for word in ("red", "circle", "blue", "square"):
            assert fig[word]["own"] >= WORD_RATIO, (arrangement, word, fig[word])
