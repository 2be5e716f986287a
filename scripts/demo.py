"""Run the pack's main job headless on a real photo and write the results to out/.

    .venv/bin/python scripts/demo.py                          # the committed demo model, 128 px
    .venv/bin/python scripts/demo.py --ckpt ~/models/v1-5-pruned-emaonly.safetensors   # your SD1.x model, 512 px

The default models are two 1 M-parameter UNets trained here on a CPU: models/ic_demo_photos.safetensors
(scripts/train_demo_model.py, four photos: its pictures are small and blurry, but real) and, without --ckpt, also
models/ic_demo_scenes.safetensors (scripts/train_scenes_model.py, drawn scenes of coloured shapes whose words it has
learned to put in place), on which each technique's effect is visible: one contact-sheet row per technique.

Starts a headless ComfyUI (tests/harness/server.py: main.py --cpu on 127.0.0.1, this pack, the checkpoint),
submits each workflow of DEMO_STEPS (API format, from workflows/api/) on scikit-image's astronaut photo, copies
the images it saved into out/, prints what it wrote and what each step measured, and writes one labelled
contact sheet (out/contact_sheet.png) of the photo, its reconstruction, the RIVAL variations, the P2Plus edit and
the cross-attention grid.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.harness import demo_model, scenes  # noqa: E402
from tests.harness.scenes_behaviour import SCENES_CHECKPOINT_NAME, scenes_checkpoint  # noqa: E402
from tests.harness.server import ComfyServer, load_api_workflow, photo_name, ui_output, with_checkpoint  # noqa: E402

DEMO_CKPT = demo_model.CHECKPOINT_NAME
WORKFLOW_PROMPT = "a photo of an astronaut"  # the source prompt the committed workflows describe the photo with
PHOTO_PROMPTS = {"astronaut": WORKFLOW_PROMPT, "chelsea": "a photo of a cat", "coffee": "a photo of a cup of coffee"}
# P2Plus edit per photo: (target prompt, blend words). Word-for-word swaps (mode "replace" needs equal token
# counts); the demo model knows only its four subjects, so it swaps in another of them.
DEMO_EDITS = {"astronaut": ("a photo of a cat", "astronaut, cat"),
              "chelsea": ("a photo of an astronaut", "cat, astronaut"),
              "coffee": ("a photo of a cup of cat", "coffee, cat")}
USER_EDITS = {"astronaut": ("a photo of a robot", "astronaut, robot"),
              "chelsea": ("a photo of a dog", "cat, dog"),
              "coffee": ("a photo of a cup of tea", "coffee, tea")}


@dataclass
class Step:
    """One workflow of the demo and what to print about its run."""
    workflow: str                                   # workflows/api/<workflow>.json
    describe: str                                   # one line printed before it runs
    report: Callable[[dict, dict], list[str]]       # (history entry, graph) -> lines to print


def report_reconstruction(entry: dict, graph: dict) -> list[str]:
    ui = ui_output(entry, "ICLatentDifference", graph)
    max_abs = ui["max_abs"][0]
    verdict = ("exact to numerical precision" if max_abs < 1e-2 else
               "approximate (more steps or refine_iters give a closer round trip)")
    return [f"reconstruction error (latent space, Latent Difference): {ui['text'][0]}",
            f"  -> DDIM inversion then sampling back is {verdict}"]


def report_variations(entry: dict, graph: dict) -> list[str]:
    rival = next(n for n in graph.values() if n["class_type"] == "ICRIVALAlignSampler")["inputs"]
    # the time widgets' names are read from the workflow, not assumed
    timing = ", ".join(f"{k} {v}" for k, v in rival.items() if k.endswith("_percent"))
    return [f"{rival['batch_size']} RIVAL variations (cfg {rival['cfg']}, {timing}, init {rival['init']}) "
            f"sharing one reference chain"]


def report_edit(entry: dict, graph: dict) -> list[str]:
    p2p = next(n for n in graph.values() if n["class_type"] == "ICP2PlusController")["inputs"]
    ui = ui_output(entry, "ICLatentDifference", graph)
    return [f"P2Plus edit '{p2p['source_prompt']}' -> '{p2p['target_prompt']}', local blend on "
            f"'{p2p['blend_words']}', null-text inversion; edit vs photo latent: {ui['text'][0]}"]


def report_attention(entry: dict, graph: dict) -> list[str]:
    return ["cross-attention maps per token (and self-attention maps) over the photo, one tile per token"]


# The demo's job, in order: prove the inversion, then make variations of the photo (the headline feature).
DEMO_STEPS = [
    Step("ddim_invert_reconstruct",
         "DDIM Invert the photo, then sample its noise back with SamplerCustom (no added noise, same sigmas)",
         report_reconstruction),
    Step("rival_variation",
         "RIVAL Align Sampler: variations of the photo aligned with its inversion chain",
         report_variations),
    Step("p2plus_edit_real",
         "P2Plus edit of the photo: null-text inversion, word swap, local blend on the subject",
         report_edit),
    Step("attention_maps",
         "Attention Capture while re-sampling the photo, viewed as per-token maps",
         report_attention),
]


# The scene every technique edits on the scenes model, and what each edit asks for.
SCENE = scenes.render("yellow", [("red", "circle", (36, 36, 56))])
SCENE_IMAGE = "ic_scene_red_circle.png"
SCENE_EDITS = {
    "ddim_invert_reconstruct": ("reconstruction", {}),
    "rival_variation": ("RIVAL variations at cfg 2", {"ICRIVALAlignSampler": {"cfg": 2.0}}),
    "p2plus_edit_real": ("P2Plus 'red' -> 'green', local blend on 'circle' (row 1 reconstruction, row 2 edit)",
                         {"ICP2PlusController": {"target_prompt": "a green circle on a yellow background",
                                                 "blend_words": "circle"}}),
    # from the first step in every layer: the settings of the scenes test that keeps the source's background
    "kv_inject_edit": ("KV Inject from step 0 in every layer: target prompt 'a red square ...' with the source's "
                       "self-attention K/V",
                       {"CLIPTextEncode:target": "a red square on a yellow background",
                        "ICKVInject": {"start_layer": 0, "start_percent": 0.0}, "SamplerCustom": {"cfg": 3.0}}),
    "attention_maps": ("cross-attention of 'red', 'circle', 'yellow', every layer",
                       {"ICAttentionMapViewer:cross": {"tokens": "red, circle, yellow"},
                        "KSampler": {"cfg": 1.0}}),
}


def prepare_scene(workflow: str, graph: dict) -> dict:
    """A committed workflow on the scenes model: the drawn scene in LoadImage, its caption for every prompt that
    described the astronaut, and the edit of SCENE_EDITS."""
    graph = with_checkpoint(graph, SCENES_CHECKPOINT_NAME, image_size=scenes.SIZE)
    edits = SCENE_EDITS[workflow][1]
    for node in graph.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "LoadImage":
            inputs["image"] = SCENE_IMAGE
        for key, value in inputs.items():
            if value == WORKFLOW_PROMPT:
                inputs[key] = SCENE.caption
        if kind == "CLIPTextEncode" and inputs["text"] not in (SCENE.caption, "", "blurry"):
            inputs["text"] = edits.get("CLIPTextEncode:target", inputs["text"])
        if kind == "ICAttentionCapture":
            inputs["resolution"] = "all"      # the demo UNet's levels are latent/1 and latent/2
        if kind == "ICAttentionMapViewer" and inputs["kind"] == "cross":
            inputs.update(edits.get("ICAttentionMapViewer:cross", {}))
        inputs.update(edits.get(kind, {}))
    return graph


def prepare(graph: dict, ckpt_name: str, photo: str, size: int, demo: bool) -> dict:
    """The committed workflow with this run's checkpoint, its photos at ``size`` px, and --photo in place of the
    astronaut (every prompt widget that described the astronaut now describes it); P2Plus gets the photo's edit."""
    graph = with_checkpoint(graph, ckpt_name, image_size=size)
    for node in graph.values():
        inputs = node["inputs"]
        if node["class_type"] == "LoadImage" and inputs["image"] == photo_name("astronaut", size):
            inputs["image"] = photo_name(photo, size)
        for key, value in inputs.items():
            if value == WORKFLOW_PROMPT:
                inputs[key] = PHOTO_PROMPTS[photo]
        if node["class_type"] == "ICP2PlusController":
            inputs["target_prompt"], inputs["blend_words"] = (DEMO_EDITS if demo else USER_EDITS)[photo]
        if demo and node["class_type"] == "ICAttentionCapture":
            inputs["resolution"] = "latent/1"   # the demo UNet's two levels are latent/1 and latent/2 (no latent/4)
    return graph


SHEET_ITEMS = [("photo", "source__"), ("reconstruction", "ddim_invert_reconstruct__"),
               ("RIVAL variation", "rival_variation__"), ("P2Plus edit", "p2plus_edit_real__"),
               ("cross-attention", "attention_maps__ic_attention_cross")]


def sheet_row(paths: list[Path], items, title: str, tile: int):
    """(title, [(label, image)]) for the pictures whose names start with each item's prefix, at ``tile`` px height."""
    from PIL import Image
    row = []
    for label, prefix in items:
        found = sorted(p for p in paths if p.name.startswith(prefix))
        for n, path in enumerate(found, 1):
            img = Image.open(path).convert("RGB")
            width = max(1, round(img.width * tile / img.height))
            row.append((f"{label} {n}" if len(found) > 1 else label, img.resize((width, tile), Image.LANCZOS)))
    return title, row


def contact_sheet(rows, out_path: Path) -> Path:
    """One PNG: each row a title line and its pictures side by side, each labelled underneath."""
    from PIL import Image, ImageDraw
    pad, band, head = 6, 16, 18
    heights = [head + max(i.height for _, i in images) + band for _, images in rows]
    width = max(sum(i.width for _, i in images) + pad * (len(images) + 1) for _, images in rows)
    sheet = Image.new("RGB", (width, sum(heights) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for (title, images), row_h in zip(rows, heights):
        draw.text((pad, y + 3), title, fill="black")
        x = pad
        for label, img in images:
            sheet.paste(img, (x, y + head))
            draw.text((x + 2, y + head + img.height + 2), label, fill="black")
            x += img.width + pad
        y += row_h
    sheet.save(out_path)
    return out_path


def copy_images(server: ComfyServer, entry: dict, out_dir: Path, workflow: str) -> list[Path]:
    """Copy every image the run saved to out/<workflow>__<prefix>.png (the SaveImage counter dropped); a batch
    (e.g. RIVAL's variations) gets _1, _2, ... so no image overwrites another."""
    written = []
    paths = server.output_images(entry)
    for n, path in enumerate(paths, 1):
        stem = re.sub(r"_\d{5}_$", "", path.stem)
        suffix = f"_{n}" if len(paths) > 1 else ""
        target = out_dir / f"{workflow}__{stem}{suffix}{path.suffix}"
        shutil.copyfile(path, target)
        written.append(target)
    return written


def run_scenes(server: ComfyServer, out: Path, timeout: float) -> list:
    """Every technique on the drawn scene with the scenes model; one contact-sheet row per technique."""
    from PIL import Image
    Image.fromarray((SCENE.image * 255).round().astype("uint8")).save(server.input_dir / SCENE_IMAGE)
    source = out / f"scene__source__{SCENE_IMAGE}"
    Image.fromarray((SCENE.image * 255).round().astype("uint8")).save(source)
    print(f"\n--- the scenes model {SCENES_CHECKPOINT_NAME} on a drawn scene: '{SCENE.caption}' ---\nwrote {source}")
    rows = []
    for workflow, (title, _edits) in SCENE_EDITS.items():
        graph = prepare_scene(workflow, load_api_workflow(workflow))
        print(f"\n[{workflow} on the scene] {title}", flush=True)
        t0 = time.time()
        entry = server.run(graph, timeout=timeout)
        print(f"  done in {time.time() - t0:.1f} s")
        written = copy_images(server, entry, out, f"scene__{workflow}")
        for path in written:
            print(f"wrote {path}")
        items = [("scene", "scene__source__"), (workflow.split("_")[0], f"scene__{workflow}__ic_")]
        if workflow == "attention_maps":
            items = [("scene", "scene__source__"), ("result", f"scene__{workflow}__ic_attention_result"),
                     ("maps", f"scene__{workflow}__ic_attention_cross")]
        # the map grid holds several 128 px tiles: shown larger so each tile stays 128 px
        tile = 256 if workflow == "attention_maps" else 128
        rows.append(sheet_row([source] + written, items, f"{SCENES_CHECKPOINT_NAME}: {title}", tile))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, help="your SD1.x checkpoint (.safetensors / .ckpt); default: the "
                                              "committed demo model (trained here on four photos, 128 px)")
    ap.add_argument("--size", type=int, help="photo size in px (default 512 with --ckpt, 128 without)")
    ap.add_argument("--photo", default="astronaut", choices=["astronaut", "chelsea", "coffee"],
                    help="scikit-image photo (default astronaut)")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "out", help="output folder (default out/)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds allowed per workflow")
    args = ap.parse_args(argv)

    if args.ckpt is not None:
        ckpt = args.ckpt.expanduser().resolve()
        if not ckpt.is_file():
            ap.error(f"--ckpt {ckpt}: no such file")
        ckpt_name, demo = ckpt.name, False
        size = args.size or 512
    else:
        ckpt, ckpt_name, demo = demo_model.CHECKPOINT_PATH, DEMO_CKPT, True
        if not ckpt.is_file():
            ap.error(f"the demo model {ckpt} is missing: restore it (git checkout models/) or train it "
                     f"(scripts/train_demo_model.py)")
        size = args.size or demo_model.SIZE
    if size % 8 or size < 64:
        ap.error("--size must be a multiple of 8, at least 64")
    args.out.mkdir(parents=True, exist_ok=True)

    if demo:
        print(f"No --ckpt given: using the demo model {DEMO_CKPT}, a 1 M-parameter UNet trained here on four\n"
              f"  photos (astronaut, cat, coffee, rocket) at 128 px: small, blurry pictures. For your own model run\n"
              f"  scripts/demo.py --ckpt /path/to/an-SD1.5-checkpoint.safetensors")
    workdir = Path(tempfile.mkdtemp(prefix="ic_demo_"))
    extra = {ckpt_name: ckpt}
    with_scenes = demo and scenes_checkpoint().is_file()
    if with_scenes:
        extra[SCENES_CHECKPOINT_NAME] = scenes_checkpoint()
    server = ComfyServer(workdir, checkpoints=(), extra_checkpoints=extra, photo_sizes=(size,))
    print(f"Starting a headless ComfyUI (CPU) in {workdir} ...", flush=True)
    failed = False
    try:
        server.start()
        source = args.out / f"source__{photo_name(args.photo, size)}"
        shutil.copyfile(server.input_dir / photo_name(args.photo, size), source)
        print(f"wrote {source}  (the input photo: scikit-image {args.photo}, {size} px)")
        written = [source]
        for step in DEMO_STEPS:
            graph = prepare(load_api_workflow(step.workflow), ckpt_name, args.photo, size, demo)
            print(f"\n[{step.workflow}] {step.describe}\n  checkpoint {ckpt_name}, photo {args.photo} {size} px",
                  flush=True)
            t0 = time.time()
            entry = server.run(graph, timeout=args.timeout)
            print(f"  done in {time.time() - t0:.1f} s")
            for path in copy_images(server, entry, args.out, step.workflow):
                print(f"wrote {path}")
                written.append(path)
            for line in step.report(entry, graph):
                print(line)
        rows = [sheet_row(written, SHEET_ITEMS, f"{ckpt_name}, scikit-image {args.photo} {size} px", 128)]
        if with_scenes:
            rows += run_scenes(server, args.out, args.timeout)
        sheet = contact_sheet(rows, args.out / "contact_sheet.png")
        print(f"\nwrote {sheet}  (contact sheet: every picture above side by side, labelled)")
    except Exception as exc:  # noqa: BLE001 - print the server's log with the error
        failed = True
        print(f"\nDemo failed: {exc}\n--- ComfyUI log ({server.log_path}) ---\n{server.log_tail(40)}", file=sys.stderr)
    finally:
        server.stop()
        if not failed:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
