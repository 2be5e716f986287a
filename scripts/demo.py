"""Run the pack's main job headless on a real photo and write the results to out/.

    .venv/bin/python scripts/demo.py                          # random-weight test model, 128 px (images are noise)
    .venv/bin/python scripts/demo.py --ckpt ~/models/v1-5-pruned-emaonly.safetensors   # your SD1.x model, 512 px

Starts a headless ComfyUI (tests/harness/server.py: main.py --cpu on 127.0.0.1, this pack, the checkpoint),
submits each workflow of DEMO_STEPS (API format, from workflows/api/) on scikit-image's astronaut photo, copies
the images it saved into out/ and prints what it wrote and what each step measured.
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

from tests.harness import models  # noqa: E402
from tests.harness.server import ComfyServer, load_api_workflow, photo_name, ui_output, with_checkpoint  # noqa: E402

TEST_CKPT = models.CHECKPOINT_NAMES["small"]
WORKFLOW_PROMPT = "a photo of an astronaut"  # the source prompt the committed workflows describe the photo with
PHOTO_PROMPTS = {"astronaut": WORKFLOW_PROMPT, "chelsea": "a photo of a cat", "coffee": "a photo of a cup of coffee"}


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
    return [f"{rival['batch_size']} RIVAL variations (cfg {rival['cfg']}, replace_end_percent "
            f"{rival['replace_end_percent']}, normalize_end_percent {rival['normalize_end_percent']}, init "
            f"{rival['init']}) sharing one reference chain"]


# The demo's job, in order: prove the inversion, then make variations of the photo (the headline feature).
DEMO_STEPS = [
    Step("ddim_invert_reconstruct",
         "DDIM Invert the photo, then sample its noise back with SamplerCustom (no added noise, same sigmas)",
         report_reconstruction),
    Step("rival_variation",
         "RIVAL Align Sampler: variations of the photo aligned with its inversion chain",
         report_variations),
]


def prepare(graph: dict, ckpt_name: str, photo: str, size: int) -> dict:
    """The committed workflow with this run's checkpoint, its photos at ``size`` px, and --photo in place of the
    astronaut (with a source prompt describing it)."""
    graph = with_checkpoint(graph, ckpt_name, image_size=size)
    for node in graph.values():
        if node["class_type"] == "LoadImage" and node["inputs"]["image"] == photo_name("astronaut", size):
            node["inputs"]["image"] = photo_name(photo, size)
        if node["class_type"] == "CLIPTextEncode" and node["inputs"].get("text") == WORKFLOW_PROMPT:
            node["inputs"]["text"] = PHOTO_PROMPTS[photo]
    return graph


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, help="your SD1.x checkpoint (.safetensors / .ckpt); default: a small "
                                              "random-weight test model (its images are noise)")
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
        ckpt_name, test_model = ckpt.name, False
        size = args.size or 512
    else:
        ckpt_name, test_model = TEST_CKPT, True
        size = args.size or 128
    if size % 8 or size < 64:
        ap.error("--size must be a multiple of 8, at least 64")
    args.out.mkdir(parents=True, exist_ok=True)

    if test_model:
        print(f"No --ckpt given: using the random-weight test checkpoint {TEST_CKPT}.\n"
              f"  Its weights are random, so every image it decodes is NOISE, not a picture. The numbers still\n"
              f"  show the pipeline works (e.g. the inversion round-trip error). For real images run\n"
              f"  scripts/demo.py --ckpt /path/to/an-SD1.5-checkpoint.safetensors")
    workdir = Path(tempfile.mkdtemp(prefix="ic_demo_"))
    server = ComfyServer(workdir, checkpoints=("small",) if test_model else (),
                         extra_checkpoints={} if test_model else {ckpt_name: ckpt}, photo_sizes=(size,))
    print(f"Starting a headless ComfyUI (CPU) in {workdir} ...", flush=True)
    failed = False
    try:
        server.start()
        source = args.out / f"source__{photo_name(args.photo, size)}"
        shutil.copyfile(server.input_dir / photo_name(args.photo, size), source)
        print(f"wrote {source}  (the input photo: scikit-image {args.photo}, {size} px)")
        for step in DEMO_STEPS:
            graph = prepare(load_api_workflow(step.workflow), ckpt_name, args.photo, size)
            print(f"\n[{step.workflow}] {step.describe}\n  checkpoint {ckpt_name}, photo {args.photo} {size} px",
                  flush=True)
            t0 = time.time()
            entry = server.run(graph, timeout=args.timeout)
            print(f"  done in {time.time() - t0:.1f} s")
            for path in copy_images(server, entry, args.out, step.workflow):
                print(f"wrote {path}" + ("  (random test model: noise)" if test_model else ""))
            for line in step.report(entry, graph):
                print(line)
    except Exception as exc:  # noqa: BLE001 - print the server's log with the error
        failed = True
        print(f"\nDemo failed: {exc}\n--- ComfyUI log ({server.log_path}) ---\n{server.log_tail(40)}", file=sys.stderr)
    finally:
        server.stop()
        if not failed:
            shutil.rmtree(workdir, ignore_errors=True)
    if test_model and not failed:
        print(f"\nReminder: {TEST_CKPT} has random weights; the images in {args.out} are noise by design.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
