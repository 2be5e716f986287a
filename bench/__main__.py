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
    parser.add_argument("--family", default="sd15",
                        help="model layout: sd15 (the 'bench' model), sdxl (the 'sdxl_bench' model) or a comma list, "
                             "e.g. sd15,sdxl (run in one process; a 'summary' table is added)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="at most this many timed rounds per benchmark (default: each benchmark's own)")
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
    families = [f.strip() for f in args.family.split(",") if f.strip()]
    real_stdout = sys.stdout
    per_family, failed = {}, False
    # Anything the pack or ComfyUI prints goes to stderr: stdout carries only the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        from bench import common
        unknown = [f for f in families if f not in common.FAMILY_MODELS]
        if unknown or not families:
            print(f"unknown family {unknown}; available: {list(common.FAMILY_MODELS)}", file=sys.stderr)
            return 2
        env = common.environment()
        common.set_round_cap(args.rounds)
        env["round_cap"] = args.rounds
        for family in families:
            common.set_family(family)
            results = per_family[family] = {}
            for name in todo:
                logging.info("running %s on %s (%s)", name, family, common.model_size())
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
                # each result as soon as it is known (stderr, one line): a run cut short still leaves its numbers
                logging.info("result %s %s %s", family, name, json.dumps(result, default=common.json_default))
    if len(families) > 1:
        out = {"environment": env, "summary": summary(per_family), "families": per_family}
    else:
        results = per_family[families[0]]
        out = ({"environment": env, "family": families[0], "results": results} if len(todo) > 1
               else {"environment": env, "family": families[0], **results[todo[0]]})
    real_stdout.write(common.to_json(out) + "\n")
    real_stdout.flush()
    return 1 if failed else 0


def summary(per_family: dict) -> dict:
    """benchmark -> family -> the headline numbers, side by side."""
    rows = {}
    for family, results in per_family.items():
        for name, r in results.items():
            row = {k: r[k] for k in ("ratio", "ratio_min", "target_ratio", "pass", "ratio_recompute",
                                     "ratio_batch_reference", "pass_batch_reference", "ratios", "cache_bytes",
                                     "cache_bytes_kv_storage", "error")
                   if k in r}
            rows.setdefault(name, {})[family] = row
    return rows


if __name__ == "__main__":
    sys.exit(main())
