"""Shared benchmark utilities: a real ComfyUI in-process (tests/harness), models, interleaved A/B timing and
honest UNet call counting.

Everything that touches a model must run under ``torch.inference_mode()`` (ComfyUI runs every node that way);
the helpers here enter it themselves where they call a model.
"""
from __future__ import annotations

import functools
import gc
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Must come before setup_comfy(): the ComfyUI tree ships its own `tests` package that would shadow ours once
# the tree is on sys.path.
from tests.harness import comfy_env, models as harness_models, photos  # noqa: E402

log = logging.getLogger("bench")


# -- environment -----------------------------------------------------------------------------------------------
def setup():
    """ComfyUI on sys.path (CPU), the pack imported as ComfyUI imports it (package ``inversion_chain``)."""
    comfy_env.setup_comfy()
    return comfy_env.load_pack()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict:
    setup()
    import comfy.model_management as mm
    device = mm.get_torch_device()
    info = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "comfyui": comfy_env.comfy_version(),
        "comfyui_tree": str(comfy_env.comfy_tree()),
    }
    return info


def json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def to_json(obj, indent: int = 2, _level: int = 0) -> str:
    """``json.dumps`` with an indent, but lists of scalars (and lists of such lists) kept on one line."""
    def flat(o):
        return not isinstance(o, dict) and (not isinstance(o, (list, tuple)) or all(flat(v) for v in o))
    pad, inner = " " * (indent * _level), " " * (indent * (_level + 1))
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(str(k))}: {to_json(v, indent, _level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)) and obj and not flat(obj):
        items = [f"{inner}{to_json(v, indent, _level + 1)}" for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(obj, default=json_default, separators=(", ", ": "))


# -- models and inputs -----------------------------------------------------------------------------------------
# family -> the harness checkpoint the benchmarks run on (``python -m bench --family``)
FAMILY_MODELS = {"sd15": "bench", "sdxl": "sdxl_bench"}
_family = ["sd15"]


def set_family(family: str):
    if family not in FAMILY_MODELS:
        raise KeyError(f"unknown family '{family}'; available: {', '.join(FAMILY_MODELS)}")
    _family[0] = family


def family() -> str:
    return _family[0]


def model_size() -> str:
    """The harness checkpoint of the selected family: 'bench' (SD1.x layout) or 'sdxl_bench' (SDXL layout)."""
    return FAMILY_MODELS[_family[0]]


def load_models(size: Optional[str] = None):
    """(MODEL, CLIP, VAE) from the harness' seeded random-weight checkpoint (default: the selected family's bench
    model), built once (cached under ~/.cache/comfyui-inversion-chain) and loaded through ComfyUI's own loader."""
    return _load_models(size or model_size())


@functools.lru_cache(maxsize=None)
def _load_models(size: str):
    setup()
    t0 = time.perf_counter()
    out = harness_models.load_checkpoint(size)
    log.info("loaded '%s' checkpoint in %.1fs", size, time.perf_counter() - t0)
    return out


def encode(clip, text: str):
    """CONDITIONING for ``text`` (real CLIP tokenization), as the stock node builds it: CLIPTextEncode, or on the
    SDXL family CLIPTextEncodeSDXL with its defaults (1024 px sizes, no crop)."""
    if family() == "sdxl":
        from comfy_extras.nodes_clip_sdxl import CLIPTextEncodeSDXL
        with torch.inference_mode():
            node = CLIPTextEncodeSDXL()
            return getattr(node, CLIPTextEncodeSDXL.FUNCTION)(clip, 1024, 1024, 0, 0, 1024, 1024, text, text)[0]
    with torch.inference_mode():
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def photo_latent(vae, name: str = "astronaut", size: int = 256) -> dict:
    """LATENT of a scikit-image photo at ``size`` px through the stock VAEEncode node."""
    setup()
    import nodes
    with torch.inference_mode():
        return nodes.VAEEncode().encode(vae, photos.photo(name, size))[0]


# -- timing ----------------------------------------------------------------------------------------------------
def _sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed(fn, cpu: Optional[List[float]] = None) -> float:
    """Wall seconds of one run of ``fn``; its process CPU seconds are appended to ``cpu`` if given."""
    _sync()
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        fn()
    _sync()
    if cpu is not None:
        cpu.append(time.process_time() - c0)
    return time.perf_counter() - t0


def interleaved_timing(fns: Dict[str, Callable[[], object]], reps: int = 5, warmup: int = 1,
                       min_reps: int = 3, budget_s: Optional[float] = None) -> Dict[str, dict]:
    """Time several callables side by side in this process.

    ``warmup`` untimed runs of each first; then rounds of one timed run of each, the order alternating every
    round (A B, B A, A B, ...) so slow drift (thermal, caches, other load) hits all of them alike. Stops after
    ``reps`` rounds, or earlier once ``budget_s`` seconds of timed rounds are spent (never before ``min_reps``).
    Returns ``{name: {"median_s", "min_s", "max_s", "reps", "times_s", "min_cpu_s", "median_cpu_s",
    "cpu_times_s"}}``: wall seconds, and this process's CPU seconds per run (with one torch thread on a CPU shared
    with other jobs, the CPU time is the steadier measure: other processes stretch the wall clock, not it).
    """
    names = list(fns)
    reps, min_reps = capped_rounds(reps, min_reps)
    for name in names:
        for _ in range(warmup):
            t = _timed(fns[name])
            log.info("warm-up %-24s %.3fs", name, t)
    times: Dict[str, List[float]] = {n: [] for n in names}
    cpu: Dict[str, List[float]] = {n: [] for n in names}
    started = time.perf_counter()
    for r in range(reps):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            gc.collect()
            times[name].append(_timed(fns[name], cpu[name]))
        log.info("round %d: %s", r + 1, ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names))
        if budget_s is not None and r + 1 >= min_reps and time.perf_counter() - started > budget_s:
            log.info("timing budget %.0fs spent after %d rounds", budget_s, r + 1)
            break
    return {n: {"median_s": round(statistics.median(t), 4), "min_s": round(min(t), 4), "max_s": round(max(t), 4),
                "reps": len(t), "times_s": [round(x, 4) for x in t], "min_cpu_s": round(min(cpu[n]), 4),
                "median_cpu_s": round(statistics.median(cpu[n]), 4), "cpu_times_s": [round(x, 4) for x in cpu[n]]}
            for n, t in times.items()}


_round_cap = [None]


def set_round_cap(rounds: Optional[int]):
    """At most ``rounds`` timed rounds per benchmark (``python -m bench --rounds``): on a busy shared machine the
    CPU-time ratios settle in a couple of rounds while each round's wall time is stretched many times."""
    _round_cap[0] = rounds


def capped_rounds(reps: int, min_reps: int):
    cap = _round_cap[0]
    return (reps, min_reps) if cap is None else (min(reps, cap), min(min_reps, cap))


def ratio(timings: Dict[str, dict], ours: str, stock: str) -> float:
    """median(ours) / median(stock): the headline ratio."""
    return round(timings[ours]["median_s"] / timings[stock]["median_s"], 4)


def min_ratio(timings: Dict[str, dict], ours: str, stock: str, key: str = "min_s") -> float:
    """min(ours) / min(stock): on a shared machine other processes only ever add time, so the fastest run of each
    side is the least disturbed one. ``key="min_cpu_s"``: the same on process CPU time."""
    return round(timings[ours][key] / timings[stock][key], 4)


def ratios(timings: Dict[str, dict], ours: str, stock: str) -> dict:
    """Every ratio of ``ours`` over ``stock``: medians and minima of wall and CPU time."""
    return {"median_wall": ratio(timings, ours, stock), "min_wall": min_ratio(timings, ours, stock),
            "median_cpu": min_ratio(timings, ours, stock, "median_cpu_s"),
            "min_cpu": min_ratio(timings, ours, stock, "min_cpu_s")}


def paired_ratio(timings: Dict[str, dict], ours: str, stock: str) -> float:
    """Median over rounds of ours_i / stock_i (the two runs of a round ran back to back): a cross-check of
    ``ratio`` that is less sensitive to load that changes between rounds."""
    pairs = [a / b for a, b in zip(timings[ours]["times_s"], timings[stock]["times_s"])]
    return round(statistics.median(pairs), 4)


# -- UNet call counting ----------------------------------------------------------------------------------------
class UNetCallCounter:
    """A ``model_function_wrapper`` (``ModelPatcher.set_model_unet_function_wrapper``) that counts every UNet
    forward. One batched forward is one call however many rows it carries (cond and uncond batched together
    count once); the rows are counted separately. A wrapper already on the model is kept and called through.

    Survives ``ModelPatcher.clone()`` (2024-03 deep-copies ``model_options``) by returning itself from
    ``__deepcopy__``, so clones made inside the code under test still count here.
    """

    def __init__(self, previous=None):
        self.previous = previous
        self.calls: List[dict] = []

    def __deepcopy__(self, memo):
        return self

    def reset(self):
        self.calls = []

    def __call__(self, apply_model, args):
        x, t = args["input"], args["timestep"]
        self.calls.append({"rows": int(x.shape[0]), "timestep": round(float(t.flatten()[0]), 3),
                           "cond_or_uncond": list(args.get("cond_or_uncond") or [])})
        if self.previous is not None:
            return self.previous(apply_model, args)
        return apply_model(x, t, **args["c"])

    def summary(self, steps: int) -> dict:
        """Counts for a run of ``steps`` sampler steps; ``calls_per_timestep`` lists how many forwards ran at
        each distinct timestep, in the order first seen."""
        n = len(self.calls)
        rows = sum(c["rows"] for c in self.calls)
        per_t: Dict[float, int] = {}
        for c in self.calls:
            per_t[c["timestep"]] = per_t.get(c["timestep"], 0) + 1
        return {
            "unet_calls": n,
            "steps": steps,
            "calls_per_step": round(n / steps, 3) if steps else None,
            "batch_rows": rows,
            "rows_per_call": round(rows / n, 3) if n else None,
            "calls_per_timestep": list(per_t.values()),
            "cond_or_uncond_patterns": sorted({tuple(c["cond_or_uncond"]) for c in self.calls}),
        }


def with_call_counter(model):
    """``(clone, counter)``: a clone of MODEL whose UNet forwards are counted (the original stays untouched)."""
    m = model.clone()
    counter = UNetCallCounter(previous=m.model_options.get("model_function_wrapper"))
    m.set_model_unet_function_wrapper(counter)
    return m, counter


def count_calls(model, run: Callable[[object], object], steps: int):
    """Run ``run(counted_model)`` once under inference mode; returns ``(counter summary, run's result)``."""
    m, counter = with_call_counter(model)
    with torch.inference_mode():
        result = run(m)
    return counter.summary(steps), result
