"""The soak run on demand: one headless ComfyUI server, N prompts mixing every node of the pack (two test models,
the test LoRA at several strengths, interrupts, bad inputs, /free), and a JSON summary of what the server held.

    OMP_NUM_THREADS=1 nice .venv/bin/python scripts/soak.py --prompts 300 > out/soak.json
    COMFYUI_PATH=$PWD/.comfyui-0.33.0 ... scripts/soak.py --prompts 300      # on the current ComfyUI tree

The prompt list is tests/harness/soak.py's (``round_plan``, repeated); tests/test_soak.py runs a short form and
asserts on the same figures."""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.harness import comfy_env  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=300, help="at least this many prompts (whole rounds)")
    parser.add_argument("--samples", action="store_true", help="also print every prompt's measurements")
    args = parser.parse_args()
    comfy_env.setup_comfy()   # building the test models / LoRA on first use needs ComfyUI in this process
    from tests.harness.server import ComfyServer
    from tests.harness.soak import Soak, round_plan
    per_round = sum(1 for s in round_plan() if s.call is None)
    rounds = max(2, math.ceil((args.prompts - 2) / per_round))
    with tempfile.TemporaryDirectory(prefix="ic_soak_") as tmp:
        server = ComfyServer(Path(tmp), checkpoints=("small", "sdxl"), photo_sizes=(128,))
        with server:
            soak = Soak(server, rounds, log=lambda s: print(s, file=sys.stderr, flush=True))
            result = soak.run()
            summary = dict(result.summary(), tree=server.tree_version())
    if args.samples:
        summary["samples"] = result.samples
    print(json.dumps(summary, indent=1))
    return 0 if not summary["failures"] and summary["stock_identical"] and not summary["stray_files"] else 1


if __name__ == "__main__":
    sys.exit(main())
