"""A soak run on one headless ComfyUI server (tests/test_soak.py, scripts/soak.py): rounds of prompts mixing every
node of the pack on two test models, the test LoRA at several strengths, interrupts, bad inputs and /free calls,
with the server process's memory, the pack's cache bytes and the files in ComfyUI's folders measured as it goes.

Every round is the same list of prompts in the same order, so that the second half of the run repeats the first
half's work exactly: what the server holds at the end of a round should not depend on how many rounds ran before.
Each prompt is recomputed by ComfyUI (the photo or a strength differs from the previous prompt's, or the workflow
does), and the pack's store sees both new keys and repeats (the same photo and model come back within a round)."""
from __future__ import annotations

import copy
import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

from . import extra_models
from .server import ComfyServer, PHOTOS, for_test_model, load_api_workflow, nodes_of, photo_name

IMAGE_SIZE = 128          # the small test models' photo size (server.TEST_MODELS)
STEPS = 3                 # sampling/inversion steps of every soak prompt (the cost of a prompt is mostly steps)
LORA_STRENGTHS = (0.5, 1.0, 0.5, 0.0)
MARKUP = '<img src=x onerror="window.__ic_xss=1">'


def _cap(graph: dict, **caps) -> dict:
    for node in graph.values():
        for name, cap in caps.items():
            value = node["inputs"].get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > cap:
                node["inputs"][name] = cap
    return graph


def _photo(graph: dict, photo: str) -> dict:
    for nid in nodes_of(graph, "LoadImage"):
        graph[nid]["inputs"]["image"] = photo_name(photo, IMAGE_SIZE)
    return graph


def shipped(name: str, model: str = "small", photo: str = "astronaut", **caps) -> dict:
    """A shipped workflow on a small test model at STEPS steps (every node's step count), refine_iters 1."""
    graph = for_test_model(load_api_workflow(name if model == "small" else f"{name}_sdxl"), model)
    graph = _cap(graph, steps=STEPS, refine_iters=1, inner_steps=2, batch_size=2, **caps)
    return _photo(graph, photo)


def with_lora(graph: dict, strength: float) -> dict:
    """``graph`` with the test LoRA (LoraLoaderModelOnly) between the checkpoint's MODEL and every node using it."""
    graph = copy.deepcopy(graph)
    (loader,) = nodes_of(graph, "CheckpointLoaderSimple")
    for node in graph.values():
        for k, v in node["inputs"].items():
            if v == [loader, 0]:
                node["inputs"][k] = ["90", 0]
    graph["90"] = {"class_type": "LoraLoaderModelOnly",
                   "inputs": {"model": [loader, 0], "lora_name": extra_models.LORA_NAME, "strength_model": strength}}
    return graph


def free_caches_graph() -> dict:
    return {"95": {"class_type": "ICFreeCaches", "inputs": {"disk_cache": False}}}


def stock_graph(ckpt: str) -> dict:
    """Stock nodes only: KSampler on an empty latent, decoded and saved. Node ids no soak prompt uses."""
    return {
        "s1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "s2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["s1", 1]}},
        "s3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["s1", 1]}},
        "s4": {"class_type": "EmptyLatentImage", "inputs": {"width": IMAGE_SIZE, "height": IMAGE_SIZE,
                                                            "batch_size": 1}},
        "s5": {"class_type": "KSampler", "inputs": {"model": ["s1", 0], "positive": ["s2", 0], "negative": ["s3", 0],
                                                    "latent_image": ["s4", 0], "seed": 7, "steps": 4, "cfg": 6.0,
                                                    "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "s6": {"class_type": "VAEDecode", "inputs": {"samples": ["s5", 0], "vae": ["s1", 2]}},
        "s7": {"class_type": "SaveImage", "inputs": {"images": ["s6", 0], "filename_prefix": "soak_stock"}},
    }


@dataclass
class Step:
    """One item of a round: a prompt (``graph``) with what must come of it, or a bare server call."""
    kind: str
    graph: dict | None = None
    expect: str = "success"       # "success", "error:<text in the message>", "rejected:<text>", "interrupted"
    call: str | None = None       # "free": POST /free instead of a prompt


def round_plan() -> list[Step]:
    """The prompts of one round (the same every round)."""
    a, c, k = PHOTOS   # astronaut, chelsea, coffee
    bad_mask = shipped("kv_inject_masked")
    (kv,) = nodes_of(bad_mask, "ICKVInject")
    bad_mask[kv]["inputs"]["mask_words"] = f"zebra {MARKUP}"
    bad_cfg = shipped("ddim_invert_reconstruct", photo=c)
    (inv,) = nodes_of(bad_cfg, "ICDDIMInvert")
    bad_cfg[inv]["inputs"]["inversion_cfg"] = 2.0     # without a negative: the pack's own error
    bad_range = shipped("ddim_invert_reconstruct")
    bad_range[nodes_of(bad_range, "ICDDIMInvert")[0]]["inputs"]["steps"] = 0
    long_inv = shipped("ddim_invert_reconstruct", photo=k)
    long_inv[nodes_of(long_inv, "ICDDIMInvert")[0]]["inputs"].update(steps=200, refine_iters=6)
    steps = [
        Step("invert", shipped("ddim_invert_reconstruct", photo=a)),
        Step("kv_inject", shipped("kv_inject_edit", photo=a)),
        Step("kv_inject_lora", with_lora(shipped("kv_inject_edit", photo=a), LORA_STRENGTHS[0])),
        Step("kv_inject_lora", with_lora(shipped("kv_inject_edit", photo=a), LORA_STRENGTHS[1])),
        Step("rival", shipped("rival_variation", photo=c)),
        Step("bad_mask_words", bad_mask, "error:is not in the prompt"),
        Step("kv_inject_masked", shipped("kv_inject_masked", photo=a)),
        Step("p2plus", shipped("p2plus_edit_real", photo=k)),
        Step("attention_capture", shipped("attention_maps", photo=c)),
        Step("interrupt", long_inv, "interrupted"),
        Step("invert_sdxl", shipped("ddim_invert_reconstruct", model="sdxl", photo=a)),
        Step("kv_inject_sdxl", shipped("kv_inject_edit", model="sdxl", photo=a)),
        Step("free", call="free"),
        Step("bad_inversion_cfg", bad_cfg, "error:negative"),
        Step("kv_inject_lora", with_lora(shipped("kv_inject_edit", photo=c), LORA_STRENGTHS[2])),
        Step("rival", shipped("rival_variation", photo=a)),
        Step("bad_steps", bad_range, "rejected:steps"),
        Step("stylediffusion", shipped("stylediffusion_edit", photo=k)),
        Step("kv_inject_lora", with_lora(shipped("kv_inject_edit", photo=a), LORA_STRENGTHS[3])),
        Step("free_caches_node", free_caches_graph()),
        Step("kv_inject", shipped("kv_inject_edit", photo=k)),
    ]
    return steps


# -- measuring the server ---------------------------------------------------------------------------------------
def rss_bytes(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set so far (Linux VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return rss_bytes(pid)


def list_files(root: Path) -> set[str]:
    root = Path(root)
    if not root.is_dir():
        return set()
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def image_pixels_digest(server: ComfyServer, entry: dict) -> str:
    from PIL import Image
    digests = []
    for record in [img for out in entry["outputs"].values() for img in out.get("images", [])]:
        with Image.open(io.BytesIO(server.fetch_image(record))) as im:
            digests.append(hashlib.sha256(im.convert("RGB").tobytes()).hexdigest())
    return ",".join(digests)


def executed_nodes(entry: dict) -> set[str] | None:
    """Node ids not served from ComfyUI's cache in this run (None if the history does not say)."""
    for name, data in entry.get("status", {}).get("messages", []):
        if name == "execution_cached":
            return set(data.get("nodes", [])) if isinstance(data, dict) else None
    return None


def error_shown(status_json: str) -> str:
    """What a frontend shows of an execution error: its exception message and traceback (ComfyUI's own echo of
    the node's inputs, ``current_inputs``, is not shown by either frontend's error dialog)."""
    for name, data in json.loads(status_json).get("messages", []):
        if name == "execution_error":
            return data.get("exception_message", "") + "\n" + "".join(data.get("traceback", []))
    return ""


@dataclass
class SoakResult:
    prompts: int = 0
    by_kind: dict = field(default_factory=dict)
    samples: list = field(default_factory=list)     # per step: round, kind, outcome, seconds, rss, cache bytes
    round_ends: list = field(default_factory=list)  # per round: rss, reference bytes, style bytes
    peak_rss: int = 0
    max_reference_bytes: int = 0
    reference_budget_cpu: int = 0
    max_style_memory_bytes: int = 0
    style_memory_budget: int = 0
    stock_before: str = ""
    stock_after: str = ""
    stray_files: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    interrupts_landed: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        half = len(self.round_ends) // 2
        rss = [r["rss"] for r in self.round_ends]
        ref = [r["reference_bytes"] for r in self.round_ends]
        return {
            "prompts": self.prompts, "rounds": len(self.round_ends), "seconds": round(self.seconds, 1),
            "by_kind": self.by_kind, "interrupts_landed": self.interrupts_landed,
            "peak_rss_mib": round(self.peak_rss / 2 ** 20, 1),
            "round_end_rss_mib": [round(x / 2 ** 20, 1) for x in rss],
            "rss_growth_second_vs_first_half_mib": round((max(rss[half:]) - max(rss[1:half] or rss[:1])) / 2 ** 20, 1)
            if len(rss) >= 2 else None,
            "round_end_reference_bytes": ref,
            "max_reference_bytes": self.max_reference_bytes, "reference_budget_cpu": self.reference_budget_cpu,
            "max_style_memory_bytes": self.max_style_memory_bytes, "style_memory_budget": self.style_memory_budget,
            "stock_identical": bool(self.stock_before) and self.stock_before == self.stock_after,
            "stray_files": self.stray_files, "failures": self.failures,
        }


class Soak:
    def __init__(self, server: ComfyServer, rounds: int, log: Callable[[str], None] = lambda s: None):
        self.server, self.rounds, self.log = server, rounds, log
        self.pid = server.proc.pid
        self.result = SoakResult()
        self.expected_files = {"output": set(), "temp": set()}
        self.user_dir = self._user_dir()

    def _user_dir(self) -> Path:
        from .comfy_env import comfy_tree
        return comfy_tree() / "user"

    def probe(self) -> dict:
        return self.server.get("/ic_test/cache_bytes")

    def free(self, timeout: float = 30):
        """POST /free and wait until it took effect: ComfyUI runs it in its prompt worker, which the 2024-03 tree
        wakes only for the next prompt or its next garbage collection (within 10 s of the last prompt)."""
        status, body = self.server.post("/free", {"unload_models": True, "free_memory": True})
        assert status == 200, (status, body)
        deadline = time.time() + timeout
        while self.probe()["reference_entries"] and time.time() < deadline:
            time.sleep(0.1)

    def _record_outputs(self, entry: dict):
        for out in entry.get("outputs", {}).values():
            for img in out.get("images", []):
                kind = img.get("type", "output")
                if kind in self.expected_files:
                    self.expected_files[kind].add(str(Path(img.get("subfolder", "")) / img["filename"]))

    def stock(self) -> str:
        """The stock graph's pixels, after /free so that ComfyUI recomputes every node."""
        self.free()
        entry = self.server.run(stock_graph(extra_models.models.CHECKPOINT_NAMES["small"]))
        self._record_outputs(entry)
        cached = executed_nodes(entry)
        if cached and "s5" in cached:
            raise AssertionError(f"ComfyUI served the stock KSampler from its cache ({sorted(cached)})")
        return image_pixels_digest(self.server, entry)

    def _interrupt(self, graph: dict) -> str:
        status, body = self.server.submit(graph)
        if status != 200:
            return f"rejected ({status}): {json.dumps(body)[:300]}"
        pid = body["prompt_id"]
        deadline = time.time() + 60
        while time.time() < deadline:   # wait until it runs (not merely queued), then interrupt it
            running = self.server.get("/queue").get("queue_running", [])
            if any(item[1] == pid for item in running):
                time.sleep(0.3)
                self.server.post("/interrupt", {})
                break
            time.sleep(0.05)
        entry = self.server.wait(pid, timeout=300)
        self._record_outputs(entry)
        messages = [m[0] for m in entry["status"].get("messages", [])]
        if "execution_interrupted" in messages:
            self.result.interrupts_landed += 1
            return "interrupted"
        return entry["status"].get("status_str", "?")   # finished before the interrupt reached it

    def run_step(self, step: Step) -> str:
        if step.call == "free":
            self.free()
            return "free"
        if step.expect == "interrupted":
            return self._interrupt(step.graph)
        status, body = self.server.submit(step.graph)
        if status != 200:
            return f"rejected:{json.dumps(body)}"
        entry = self.server.wait(body["prompt_id"], timeout=600)
        self._record_outputs(entry)
        if entry["status"].get("status_str") == "success":
            return "success"
        return f"error:{json.dumps(entry['status'])}"

    def check(self, step: Step, outcome: str) -> str | None:
        """A message when the outcome is not what the step expects."""
        if step.call:
            return None
        if step.expect == "interrupted":
            return None if outcome in ("interrupted", "success") else f"{step.kind}: {outcome[:500]}"
        want_kind, _, want_text = step.expect.partition(":")
        got_kind, _, got_text = outcome.partition(":")
        if want_kind != got_kind or want_text not in got_text:
            return f"{step.kind}: expected {step.expect}, got {outcome[:800]}"
        if want_kind == "error":
            shown = error_shown(got_text)
            if "<img" in shown:
                return f"{step.kind}: the error the frontend shows repeats markup unescaped: {shown[:800]}"
        return None

    def run(self) -> SoakResult:
        r = self.result
        t0 = time.time()
        user_before = list_files(self.user_dir)
        input_before = list_files(self.server.input_dir)
        r.stock_before = self.stock()
        plan = round_plan()
        for n in range(self.rounds):
            for step in plan:
                t = time.time()
                outcome = self.run_step(step)
                problem = self.check(step, outcome)
                if problem:
                    r.failures.append(f"round {n}: {problem}")
                if step.call is None:
                    r.prompts += 1
                    r.by_kind[step.kind] = r.by_kind.get(step.kind, 0) + 1
                probe = self.probe()
                r.max_reference_bytes = max(r.max_reference_bytes, probe["reference_bytes"])
                r.reference_budget_cpu = probe["reference_budget_cpu"] or r.reference_budget_cpu
                r.max_style_memory_bytes = max(r.max_style_memory_bytes, probe.get("style_memory_bytes", 0))
                r.style_memory_budget = probe.get("style_memory_budget", 0)
                r.samples.append({"round": n, "kind": step.kind, "outcome": outcome.split(":")[0],
                                  "s": round(time.time() - t, 2), "rss": rss_bytes(self.pid),
                                  "reference_bytes": probe["reference_bytes"]})
            probe = self.probe()
            r.round_ends.append({"rss": rss_bytes(self.pid), "reference_bytes": probe["reference_bytes"],
                                 "style_memory_bytes": probe.get("style_memory_bytes", 0)})
            self.log(f"round {n + 1}/{self.rounds}: {r.prompts} prompts, rss {r.round_ends[-1]['rss'] / 2 ** 20:.0f} "
                     f"MiB, reference cache {probe['reference_bytes']} B, {time.time() - t0:.0f} s")
        r.stock_after = self.stock()
        r.prompts += 2
        r.by_kind["stock"] = 2
        r.peak_rss = peak_rss_bytes(self.pid)
        r.stray_files = self.stray_files(user_before, input_before)
        self.server.get("/object_info")   # still serves
        r.seconds = time.time() - t0
        return r

    def stray_files(self, user_before: set, input_before: set) -> list[str]:
        """Files in ComfyUI's folders that no history entry names: output/ and temp/ hold only what the prompts'
        output nodes reported, input/ only the harness's photos, user/ nothing new but the StyleDiffusion cache's
        finished files (no *.tmp left behind)."""
        stray = []
        for kind, root in (("output", self.server.output_dir), ("temp", self.server.workdir / "temp" / "temp")):
            stray += [f"{kind}/{p}" for p in sorted(list_files(root) - self.expected_files[kind])]
        stray += [f"input/{p}" for p in sorted(list_files(self.server.input_dir) - input_before)]
        for p in sorted(list_files(self.user_dir) - user_before):
            if "style_cache" in p and not p.endswith(".tmp"):
                continue
            if p.endswith("comfy.settings.json") or "workflows" in p:
                continue
            stray.append(f"user/{p}")
        return stray
