"""Print, as JSON, every figure the scenes behaviour tests assert (tests/test_behaviour_scenes.py), with controls.

    .venv/bin/python scripts/scenes_figures.py                     # the committed scenes model
    IC_SCENES_CKPT=/tmp/ic_scenes/ic_demo_scenes_step3000.safetensors .venv/bin/python scripts/scenes_figures.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.harness import comfy_env, demo_model  # noqa: E402


def rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items() if k != "images"}
    return value


def main() -> int:
    comfy_env.setup_comfy()
    comfy_env.load_pack()
    from tests.harness import scenes_behaviour as sb
    out = {"checkpoint": str(sb.scenes_checkpoint())}
    with torch.inference_mode():
        m = sb.load()
        photo_model = sb.load(demo_model.CHECKPOINT_PATH)
        out["localisation"] = {w: sb.localisation(m, w) for w in sb.PLACEMENTS}
        out["localisation_photo_model (control)"] = {w: sb.localisation(photo_model, w) for w in ("left", "right")}
        inv = sb.invert(m, sb.placed_scene("left"))
        centre = sb.invert(m, sb.scenes.render("yellow", [("red", "circle", (36, 36, 56))]))
        green = "a green circle on a yellow background"
        for name, kwargs in {"swap, local blend": dict(target=green, blend_words="circle"),
                             "swap, no blend": dict(target=green),
                             "same prompt (control)": dict(target=centre.scene.caption),
                             "reweight red:-2": dict(target=centre.scene.caption, mode="reweight",
                                                     reweight="red:-2")}.items():
            out[f"p2plus {name}"] = sb.swap_figures(m, centre, sb.p2plus_edit(m, centre, **kwargs), "green")
        out["kv_inject circle->square"] = sb.kv_inject_figures(m, centre, "a red square on a yellow background")
        out["rival"] = sb.rival_figures(m, inv)
        out["guidance inversion cfg 7.5"] = sb.guidance_inversion_figures(m, centre)
        out["map paths 'circle' (map size auto and latent/1)"] = {
            w: sb.map_path_figures(m, w, map_sizes=("auto", "latent/1")) for w in ("left", "top")}
        out["p2plus local blend on 'circle' by blend_map_size and threshold, swap red->green, cfg 5"] = \
            sb.local_blend_figures(m, centre, map_sizes=("auto", "latent/1"))
        out["p2plus reweight and refine, cfg 5"] = sb.reweight_refine_figures(m, centre)
        out["kv_inject masked, new generations, defaults"] = sb.kv_masked_figures(m, inv)
        out["kv_inject masked, new generations, start_layer 0 start_percent 0"] = sb.kv_masked_figures(
            m, inv, settings=dict(start_layer=0, start_percent=0.0))
        out["kv_inject masked at mask_map_size latent/1, new generations, defaults"] = sb.kv_masked_figures(
            m, inv, modes=("masked",), mask_map_size="latent/1")
        out["kv_inject masked at mask_map_size latent/1, new generations, start_layer 0 start_percent 0"] = \
            sb.kv_masked_figures(m, inv, settings=dict(start_layer=0, start_percent=0.0), modes=("masked",),
                                 mask_map_size="latent/1")
        out["kv_inject circle->square, defaults, seeds 0-2"] = [
            sb.kv_inject_figures(m, centre, "a red square on a yellow background", seed=s) for s in (0, 1, 2)]
        out["style_diffusion, cfg 5"] = sb.style_figures(m, centre)
        out["two objects"] = {"circle left": sb.two_object_figures(m),
                              "circle right": sb.two_object_figures(m, swapped=True)}
    print(json.dumps(rounded(out), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
