"""A real headless ComfyUI server on 127.0.0.1 for end-to-end tests and the demo."""
from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from .comfy_env import REPO_ROOT, comfy_tree
from . import extra_models, flow_models, flow_models_more, models, photos

PACK_NODES = ("ICDDIMInvert", "ICLatentDifference")
PHOTOS = ("astronaut", "chelsea", "coffee")
PHOTO_SIZES = (64, 128, 256)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def photo_name(name: str, size: int) -> str:
    """The input file name the harness writes for a scikit-image photo at ``size`` px (e.g. astronaut_128.png)."""
    return f"{name}_{size}.png"


class ComfyServer:
    """Starts ``main.py --cpu --listen 127.0.0.1 --port P`` with the pack (linked into the tree's custom_nodes by
    the setup script), the test checkpoints and a test-only node registering their configs.

    ``checkpoints``: test models (TEST_MODELS) to offer, built and cached on first use: a checkpoint in the
    checkpoints folder, or for the flow test models ("flux", "qwen_image") the diffusion model in diffusion_models
    and the VAE in vae, on trees that have the family (elsewhere they are left out; their graphs skip).
    ``extra_checkpoints``: {file name: path} of user checkpoints to link in as well.
    ``photo_sizes``: sizes at which astronaut/chelsea/coffee are written into the input folder.
    ``shipped_names``: also offer the model and photo names the shipped workflows use (SHIPPED_CHECKPOINTS,
    SHIPPED_CLIP_VISION, SHIPPED_IMAGE), each standing in for a test file, so that a shipped workflow loads in the
    frontend with every file it names present (the SDXL name stands in with the small SD1.5-layout model until an
    SDXL test model exists: enough to load the graph, not to run it)."""

    def __init__(self, workdir: Path, checkpoints=("small", "sd15", "sdxl", "flux", "qwen_image"),
                 extra_checkpoints=None, python=sys.executable, photo_sizes=PHOTO_SIZES, shipped_names=False):
        self.workdir = Path(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.python = python
        self.checkpoints = tuple(checkpoints)
        self.extra_checkpoints = dict(extra_checkpoints or {})
        self.photo_sizes = tuple(sorted(set(photo_sizes)))
        self.shipped_names = shipped_names
        self.proc = None
        self._log = None
        self.object_info = None
        self._runs = {}
        self.log_path = self.workdir / "server.log"
        self.output_dir = self.workdir / "output"
        self.input_dir = self.workdir / "input"

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self, timeout: float = 300):
        tree = comfy_tree()
        link = tree / "custom_nodes" / "comfyui-inversion-chain"
        if not link.exists():
            raise RuntimeError(f"the pack is not linked into {tree}/custom_nodes: run scripts/setup_env.sh")
        ckpt_dir = self.workdir / "checkpoints"
        nodes_dir = self.workdir / "test_nodes"
        vision_dir = self.workdir / "clip_vision"
        control_dir = self.workdir / "controlnet"
        lora_dir = self.workdir / "loras"
        for d in (ckpt_dir, nodes_dir, vision_dir, control_dir, lora_dir, self.output_dir, self.input_dir):
            d.mkdir(parents=True, exist_ok=True)
        flow_folders = set()
        for size in self.checkpoints:
            if "unet" in TEST_MODELS[size]:
                flow_folders |= self._link_flow_test_model(size)
            else:
                self._link(ckpt_dir / models.CHECKPOINT_NAMES[size], models.checkpoint_path(size))
        for name, path in self.extra_checkpoints.items():
            path = Path(path).expanduser().resolve()
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint {path} does not exist")
            self._link(ckpt_dir / name, path)
        self._link(nodes_dir / "ic_test_models", REPO_ROOT / "tests" / "comfy_test_node")
        self._link(vision_dir / models.CLIP_VISION_NAME, models.clip_vision_path())
        for size, name in extra_models.CONTROLNET_NAMES.items():
            if size in self.checkpoints:
                self._link(control_dir / name, extra_models.controlnet_path(size))
        if "small" in self.checkpoints:   # the small model's test LoRA (Load LoRA, its strengths)
            self._link(lora_dir / extra_models.LORA_NAME, extra_models.lora_path())
        if self.shipped_names:
            for name, family in SHIPPED_CHECKPOINTS.items():
                stand_in = (FAMILY_TEST_MODELS[family] or ("small",))[0]
                self._link(ckpt_dir / name, models.checkpoint_path(stand_in))
            self._link(vision_dir / SHIPPED_CLIP_VISION, models.clip_vision_path())
            for name, family in SHIPPED_CONTROLNETS.items():
                stand_in = next(s for s in FAMILY_TEST_MODELS[family] if s in extra_models.CONTROLNET_NAMES)
                self._link(control_dir / name, extra_models.controlnet_path(stand_in))
            for folder, names in SHIPPED_FLOW_FILES.items():   # names only: the flow graphs load, never run here
                (self.workdir / folder).mkdir(exist_ok=True)
                flow_folders.add(folder)
                for name in names:
                    (self.workdir / folder / name).touch()
            if not (self.input_dir / SHIPPED_IMAGE).exists():
                photos.save_png("astronaut", self.input_dir / SHIPPED_IMAGE, 512)
        for name in PHOTOS:
            for size in self.photo_sizes:
                target = self.input_dir / photo_name(name, size)
                if not target.exists():
                    photos.save_png(name, target, size)
        extra = self.workdir / "extra_model_paths.yaml"
        extra.write_text(f"ic_test:\n  base_path: {json.dumps(str(self.workdir))}\n  checkpoints: checkpoints\n"
                         f"  clip_vision: clip_vision\n  controlnet: controlnet\n  loras: loras\n"
                         f"  custom_nodes: test_nodes\n"
                         + "".join(f"  {folder}: {folder}\n" for folder in sorted(flow_folders)))
        env = dict(os.environ, IC_REPO_ROOT=str(REPO_ROOT), PYTHONUNBUFFERED="1")
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--output-directory", str(self.output_dir), "--input-directory", str(self.input_dir),
               "--temp-directory", str(self.workdir / "temp"), "--extra-model-paths-config", str(extra)]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=str(tree), stdout=self._log, stderr=subprocess.STDOUT, env=env)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _link_flow_test_model(self, size: str) -> set:
        """Diffusion model and VAE files of flow test model ``size``, where the server's diffusion_models and vae
        folders find them; the folders used (none on a tree without the family)."""
        spec = TEST_MODELS[size]
        if flow_models.missing_family(spec["clip_family"]):
            return set()
        files = {("diffusion_models", spec["unet"]): flow_models.model_path(spec["clip_family"]),
                 ("vae", spec["vae"]): (flow_models_more.wan_vae_path() if spec["vae"] == flow_models_more.WAN_VAE_NAME
                                        else flow_models.vae_path())}
        for (folder, name), source in files.items():
            (self.workdir / folder).mkdir(exist_ok=True)
            self._link(self.workdir / folder / name, source)
        return {folder for folder, _ in files}

    @staticmethod
    def _link(target: Path, source: Path):
        if target.is_symlink() or target.exists():
            if target.resolve() == Path(source).resolve():
                return
            target.unlink()
        target.symlink_to(source)

    def _wait_ready(self, timeout: float):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                info = self.get("/object_info")
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
                continue
            missing = [n for n in PACK_NODES if n not in info]
            if missing:
                raise RuntimeError(f"ComfyUI started without the pack's nodes {missing} (import error?):\n"
                                   f"{self.log_tail()}")
            self.object_info = info
            return
        raise RuntimeError(f"ComfyUI did not answer within {timeout}s:\n{self.log_tail()}")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def tree_version(self) -> str:
        """ComfyUI's version as /system_stats reports it ("2024-03" for the CI tree, which predates the field)."""
        return self.get("/system_stats").get("system", {}).get("comfyui_version") or "2024-03"

    # -- HTTP --------------------------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 120):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict):
        """Returns (status, json body); HTTP errors are returned, not raised."""
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                body = r.read()
                try:
                    return r.status, json.loads(body or b"{}")
                except ValueError:
                    return r.status, {"raw": body.decode(errors="replace")}
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body)
            except ValueError:
                return e.code, {"raw": body.decode(errors="replace")}

    def submit(self, graph: dict):
        """POST /prompt; returns (status, body). 200 means the graph validated and was queued."""
        return self.post("/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})

    def wait(self, prompt_id: str, timeout: float = 900) -> dict:
        """Poll /history until the prompt finished (success or error); returns its history entry."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                hist = self.get(f"/history/{prompt_id}", timeout=30)
            except (TimeoutError, urllib.error.URLError) as e:  # a busy server (loaded CI machine): poll again
                if not self.alive():
                    raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}") from e
                continue
            entry = hist.get(prompt_id)
            if entry is not None:
                status = entry.get("status") or {}
                if status.get("completed") or status.get("status_str") in ("success", "error"):
                    return entry
            if not self.alive():
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s:\n{self.log_tail()}")

    def run(self, graph: dict, timeout: float = 900) -> dict:
        """Submit and wait; raises with the server's message when validation or execution fails.
        Returns the /history entry (``outputs`` per output node, ``status``)."""
        status, body = self.submit(graph)
        if status != 200:
            raise RuntimeError(f"/prompt rejected the graph ({status}): {json.dumps(body)[:2000]}")
        entry = self.wait(body["prompt_id"], timeout)
        if entry["status"].get("status_str") != "success":
            raise RuntimeError(f"execution failed: {json.dumps(entry['status'])[:3000]}\n{self.log_tail(30)}")
        return entry

    def run_once(self, graph: dict, timeout: float = 900) -> dict:
        """``run``, but an identical graph submitted again on this server returns the first run's entry.
        (ComfyUI caches only the last prompt per node id, so alternating graphs would recompute.)"""
        key = json.dumps(graph, sort_keys=True)
        if key not in self._runs:
            self._runs[key] = self.run(graph, timeout)
        return self._runs[key]

    def error_of(self, graph: dict, timeout: float = 300) -> str:
        """Submit a graph expected to fail; return the error text (validation or execution)."""
        status, body = self.submit(graph)
        if status != 200:
            return json.dumps(body)
        entry = self.wait(body["prompt_id"], timeout)
        if entry["status"].get("status_str") == "success":
            raise AssertionError("the graph was expected to fail but succeeded")
        return json.dumps(entry["status"])

    # -- results -----------------------------------------------------------------------------------------------
    def output_images(self, entry: dict, node_id: str | None = None) -> list[Path]:
        """Paths of the images that SaveImage nodes (all, or ``node_id``) wrote for a history entry."""
        base = {"output": self.output_dir, "temp": self.workdir / "temp" / "temp", "input": self.input_dir}
        paths = []
        for nid, out in entry.get("outputs", {}).items():
            if node_id is not None and str(nid) != str(node_id):
                continue
            for img in out.get("images", []):
                paths.append(base.get(img.get("type", "output"), self.output_dir) / img.get("subfolder", "")
                             / img["filename"])
        return paths

    def fetch_image(self, image: dict) -> bytes:
        """GET /view for one {filename, subfolder, type} record of a history entry."""
        query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
        with urllib.request.urlopen(f"{self.url}/view?{query}", timeout=30) as r:
            return r.read()


# -- workflows ---------------------------------------------------------------------------------------------------
WORKFLOWS_DIR = REPO_ROOT / "workflows"


def api_workflow_names() -> list[str]:
    return sorted(p.stem for p in (WORKFLOWS_DIR / "api").glob("*.json"))


def load_api_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS_DIR / "api" / f"{name}.json").read_text())


def nodes_of(graph: dict, class_type: str) -> list[str]:
    return [nid for nid, node in graph.items() if node["class_type"] == class_type]


def set_inputs(graph: dict, class_type: str, **values) -> dict:
    """A copy of ``graph`` with widget inputs of every ``class_type`` node set to ``values``."""
    graph = copy.deepcopy(graph)
    ids = nodes_of(graph, class_type)
    if not ids:
        raise KeyError(f"no {class_type} node in the graph")
    for nid in ids:
        graph[nid]["inputs"].update(values)
    return graph


def with_checkpoint(graph: dict, ckpt_name: str, image_size: int | None = None, photo: str = "astronaut") -> dict:
    """A copy of ``graph`` using ``ckpt_name`` in every checkpoint loader and, if ``image_size`` is given, the
    scikit-image ``photo`` at that size (``with_image_size``)."""
    graph = set_inputs(graph, "CheckpointLoaderSimple", ckpt_name=ckpt_name)
    return graph if image_size is None else with_image_size(graph, image_size, photo)


EMPTY_LATENTS = ("EmptyLatentImage", "EmptySD3LatentImage")


def with_image_size(graph: dict, image_size: int, photo: str = "astronaut") -> dict:
    """A copy of ``graph`` with the scikit-image ``photo`` at ``image_size`` in every LoadImage
    (``photo_name(photo, size)``, written by the server) and that size in every ImageScale and empty latent."""
    graph = copy.deepcopy(graph)
    for nid in nodes_of(graph, "LoadImage"):
        graph[nid]["inputs"]["image"] = photo_name(photo, image_size)
    for nid in [n for kind in ("ImageScale",) + EMPTY_LATENTS for n in nodes_of(graph, kind)]:
        graph[nid]["inputs"].update(width=image_size, height=image_size)
    return graph


def with_flow_test_model(graph: dict, size: str) -> dict:
    """A copy of a shipped flow graph on flow test model ``size``: UNETLoader and VAELoader read its files (which the
    server puts in diffusion_models and vae), and the test-only "IC Test Flow CLIP Loader" (tests/comfy_test_node)
    builds its shrunk text encoders in place of DualCLIPLoader / CLIPLoader, whose outputs keep their links."""
    spec = TEST_MODELS[size]
    graph = set_inputs(graph, "UNETLoader", unet_name=spec["unet"], weight_dtype="default")
    graph = set_inputs(graph, "VAELoader", vae_name=spec["vae"])
    for nid in nodes_of(graph, "DualCLIPLoader") + nodes_of(graph, "CLIPLoader"):
        graph[nid] = {"class_type": FLOW_CLIP_LOADER, "inputs": {"family": spec["clip_family"]},
                      "_meta": {"title": f"IC Test Flow CLIP Loader ({spec['clip_family']})"}}
    return graph


def ui_output(entry: dict, class_type_or_id: str, graph: dict | None = None) -> dict:
    """The ``ui`` dict an output node returned, by node id or (with ``graph``) by class_type."""
    outputs = entry.get("outputs", {})
    if class_type_or_id in outputs:
        return outputs[class_type_or_id]
    if graph is not None:
        ids = [nid for nid in nodes_of(graph, class_type_or_id) if nid in outputs]
        if len(ids) == 1:
            return outputs[ids[0]]
        if len(ids) > 1:
            raise KeyError(f"several {class_type_or_id} nodes in the graph: {ids}")
    raise KeyError(f"no outputs for {class_type_or_id!r}; have {sorted(outputs)}")


def copy_outputs(server: ComfyServer, entry: dict, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for path in server.output_images(entry):
        target = dest / path.name
        shutil.copyfile(path, target)
        written.append(target)
    return written


# -- the shipped workflows on the test models --------------------------------------------------------------------
# The ONE place where the shipped workflows (real model names, the papers' 50 steps, 512/1024 px) become test
# runs. Shipped names, each with the test files that stand in for it:
SHIPPED_CHECKPOINTS = {
    "v1-5-pruned-emaonly-fp16.safetensors": "sd15",   # SD1.5 layout: test models "small" and "sd15"
    "sd_xl_base_1.0.safetensors": "sdxl",             # SDXL layout: test model "sdxl"
}
SHIPPED_CLIP_VISION = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
# ControlNets (canny, the official RIVAL ControlNet example's), each standing in with the test ControlNet of its
# family's test model (tests/harness/extra_models.py)
SHIPPED_CONTROLNETS = {"control_v11p_sd15_canny.pth": "sd15", "diffusers_xl_canny_full.safetensors": "sdxl"}
SHIPPED_IMAGE = "example.png"  # ComfyUI's own input/example.png; the user puts a photo in its place
# The flow-model graphs (current ComfyUI only) load diffusion model, text encoders and VAE by their own loaders: the
# files of Comfy-Org's Flux and Qwen-Image repackages (ComfyUI's own templates name the same), by folder. They run on
# the flow test models (TEST_MODELS "flux", "qwen_image": with_flow_test_model); the browser server offers the
# shipped names as empty files, so the graphs load in the frontend with every file they name present.
SHIPPED_DIFFUSION_MODELS = {"flux1-dev.safetensors": "flux", "qwen_image_fp8_e4m3fn.safetensors": "qwen"}
SHIPPED_FLOW_FILES = {
    "diffusion_models": tuple(SHIPPED_DIFFUSION_MODELS),
    "text_encoders": ("t5xxl_fp16.safetensors", "clip_l.safetensors", "qwen_2.5_vl_7b_fp8_scaled.safetensors"),
    "vae": ("ae.safetensors", "qwen_image_vae.safetensors"),
}
# Test models that run each family's workflows.
FAMILY_TEST_MODELS = {"sd15": ("small", "sd15"), "sdxl": ("sdxl",), "flux": ("flux",), "qwen": ("qwen_image",)}
FLOW_CLIP_LOADER = "ICTestFlowCLIPLoader"    # tests/comfy_test_node: the flow test layouts' shrunk text encoders
# Per test model: the checkpoint file, the photo size, and caps on step-like inputs (the full-size SD1.5 UNet
# costs seconds per call on 2 CPU cores). "small" keeps the step counts the test suite measured its numbers at.
STEPS_FLOW = 28
TEST_MODELS = {
    "small": {"ckpt": models.CHECKPOINT_NAMES["small"], "image_size": 128,
              "caps": {"steps": 10, "inner_steps": 20}},
    "sd15": {"ckpt": models.CHECKPOINT_NAMES["sd15"], "image_size": 64,
             "caps": {"steps": 3, "refine_iters": 2, "inner_steps": 1, "batch_size": 2}},
    "sdxl": {"ckpt": models.CHECKPOINT_NAMES["sdxl"], "image_size": 128,   # the small SDXL-layout test model
             "caps": {"steps": 10, "inner_steps": 20}},
    # the small random-weight flow layouts (tests/harness/flow_models*.py): diffusion model, VAE, text encoders
    "flux": {"unet": flow_models.FILE_NAMES["flux"], "vae": flow_models.VAE_NAME, "clip_family": "flux",
             "image_size": 64, "caps": {"steps": STEPS_FLOW}},
    "qwen_image": {"unet": flow_models.FILE_NAMES["qwen_image"], "vae": flow_models_more.WAN_VAE_NAME,
                   "clip_family": "qwen_image", "image_size": 64, "caps": {"steps": STEPS_FLOW}},
}


def workflow_family(graph: dict) -> str:
    """"sd15", "sdxl", "flux" or "qwen": the family of the checkpoint or diffusion model the (shipped) graph loads."""
    names = {graph[nid]["inputs"]["ckpt_name"] for nid in nodes_of(graph, "CheckpointLoaderSimple")}
    names |= {graph[nid]["inputs"]["unet_name"] for nid in nodes_of(graph, "UNETLoader")}
    families = {{**SHIPPED_CHECKPOINTS, **SHIPPED_DIFFUSION_MODELS}.get(n) for n in names}
    if len(families) != 1 or None in families:
        raise ValueError(f"the graph loads {sorted(names)}; a shipped workflow loads one of "
                         f"{sorted(SHIPPED_CHECKPOINTS) + sorted(SHIPPED_DIFFUSION_MODELS)}")
    return families.pop()


def workflow_test_models(graph: dict) -> tuple:
    """The test models a shipped graph runs on: its family's, less those without a test part the graph loads (a
    ControlNet exists for "small" and "sdxl", not for the full-size "sd15")."""
    sizes = FAMILY_TEST_MODELS[workflow_family(graph)]
    if nodes_of(graph, "ControlNetLoader"):
        sizes = tuple(s for s in sizes if s in extra_models.CONTROLNET_NAMES)
    return sizes


def for_test_model(graph: dict, size: str) -> dict:
    """A copy of the shipped ``graph`` set up to run on test model ``size`` within CPU budgets: test checkpoint (or
    the flow test model's files and text encoders), test CLIP vision and ControlNet, the astronaut photo at the
    model's size, capped step counts."""
    spec = TEST_MODELS[size]
    if "unet" in spec:
        graph = with_image_size(with_flow_test_model(graph, size), spec["image_size"])
    else:
        graph = with_checkpoint(graph, spec["ckpt"], spec["image_size"])
    for nid in nodes_of(graph, "CLIPVisionLoader"):
        graph[nid]["inputs"]["clip_name"] = models.CLIP_VISION_NAME
    for nid in nodes_of(graph, "ControlNetLoader"):
        graph[nid]["inputs"]["control_net_name"] = extra_models.CONTROLNET_NAMES[size]
    caps = dict(spec["caps"])
    if nodes_of(graph, "ICStyleDiffusionStyleTransfer"):
        caps["inner_steps"] = min(caps.get("inner_steps", 2), 2)   # its STYLE only feeds the transfer path
    for node in graph.values():
        for name, cap in caps.items():
            value = node["inputs"].get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > cap:
                node["inputs"][name] = cap
    return graph
