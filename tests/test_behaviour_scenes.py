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
from tests.harness import scenes_behaviour as sb

# Thresholds, from the committed checkpoint's figures (models/README.md, "Behaviour on the scenes model")
WORD_RATIO = 2.0            # the bar: a word's mass inside its object >= 2x the object's area share
SHAPE_RATIO = 1.8           # shape word measured 2.06-2.15 over four placements; 1.8 leaves room for the other tree
MAX_CONTROL_RATIO = 1.2     # mirrored mask 0.79-0.88, photo model 0.83-0.89 (flat: 1.0)


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


@pytest.mark.xfail(strict=True, reason="not reached: at the default blend_threshold 0.3 the local-blend mask covers "
                                       "the whole 16x16 latent on this model (the result equals no blend); at 0.6 it "
                                       "removes most of the edit inside the circle and not outside (0.024 vs 0.021)")
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
