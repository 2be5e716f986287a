"""``python -m bench <name> [<name> ...] | all | --list``: run benchmarks, JSON on stdout, logs on stderr."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", help="benchmark names, or 'all'")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)

    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import bench

    if args.list or not args.names:
        listing = {}
        for n in bench.names():
            try:
                listing[n] = bench.description(n)
            except Exception as e:  # a module that does not import is listed with its error
                listing[n] = f"(cannot load: {type(e).__name__}: {e})"
        if not args.list:
            parser.print_usage(sys.stderr)
        print(json.dumps(listing, indent=2), file=sys.stdout if args.list else sys.stderr)
        return 0 if args.list else 2
    todo = bench.names() if args.names == ["all"] else args.names
    unknown = [n for n in todo if n not in bench.names()]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {bench.names()}", file=sys.stderr)
        return 2

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="[bench] %(message)s")
    real_stdout = sys.stdout
    results, failed = {}, False
    # Anything the pack or ComfyUI prints goes to stderr: stdout carries only the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        from bench import common
        env = common.environment()
        for name in todo:
            logging.info("running %s", name)
            t0 = time.perf_counter()
            try:
                result = bench.get(name)()
            except Exception as e:  # one failing benchmark must not hide the others
                failed = True
                traceback.print_exc()
                result = {"error": f"{type(e).__name__}: {e}"}
            result["wall_s"] = round(time.perf_counter() - t0, 2)
            results[name] = result
            logging.info("%s done in %.1fs", name, result["wall_s"])
    out = {"environment": env, "results": results} if len(todo) > 1 else {"environment": env, **results[todo[0]]}
    real_stdout.write(common.to_json(out) + "\n")
    real_stdout.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
