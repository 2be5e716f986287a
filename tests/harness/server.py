"""A real headless ComfyUI server on 127.0.0.1 for end-to-end tests and the demo."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from .comfy_env import REPO_ROOT, comfy_tree
from . import models, photos

PACK_NODES = ("ICDDIMInvert",)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """Starts ``main.py --cpu --listen 127.0.0.1 --port P`` with the pack (linked into the tree's custom_nodes by
    the setup script), the test checkpoints and a test-only node registering their configs."""

    def __init__(self, workdir: Path, checkpoints=("small", "sd15"), extra_checkpoints=None, python=sys.executable):
        self.workdir = Path(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.python = python
        self.checkpoints = checkpoints
        self.extra_checkpoints = dict(extra_checkpoints or {})
        self.proc = None
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
        for d in (ckpt_dir, nodes_dir, self.output_dir, self.input_dir):
            d.mkdir(parents=True, exist_ok=True)
        for size in self.checkpoints:
            target = ckpt_dir / models.CHECKPOINT_NAMES[size]
            if not target.exists():
                target.symlink_to(models.checkpoint_path(size))
        for name, path in self.extra_checkpoints.items():
            target = ckpt_dir / name
            if not target.exists():
                target.symlink_to(Path(path).resolve())
        test_node = nodes_dir / "ic_test_models"
        if not test_node.exists():
            test_node.symlink_to(REPO_ROOT / "tests" / "comfy_test_node")
        for name in ("astronaut", "chelsea", "coffee"):
            for size in (64, 128, 256):
                photos.save_png(name, self.input_dir / f"{name}_{size}.png", size)
        extra = self.workdir / "extra_model_paths.yaml"
        extra.write_text(f"ic_test:\n  base_path: {self.workdir}\n  checkpoints: checkpoints\n"
                         f"  custom_nodes: test_nodes\n")
        env = dict(os.environ, IC_REPO_ROOT=str(REPO_ROOT), PYTHONUNBUFFERED="1")
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--output-directory", str(self.output_dir), "--input-directory", str(self.input_dir),
               "--temp-directory", str(self.workdir / "temp"), "--extra-model-paths-config", str(extra)]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=str(tree), stdout=self._log, stderr=subprocess.STDOUT, env=env)
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
            return self
        raise RuntimeError(f"ComfyUI did not answer within {timeout}s:\n{self.log_tail()}")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if getattr(self, "_log", None):
            self._log.close()

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    # -- HTTP --------------------------------------------------------------------------------------------------
    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict):
        """Returns (status, json body); HTTP errors are returned, not raised."""
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body)
            except ValueError:
                return e.code, {"raw": body.decode(errors="replace")}

    def submit(self, graph: dict):
        return self.post("/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})

    def wait(self, prompt_id: str, timeout: float = 900) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None \
                    and (hist[prompt_id]["status"].get("completed") or hist[prompt_id]["status"].get("status_str")):
                return hist[prompt_id]
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s:\n{self.log_tail()}")

    def run(self, graph: dict, timeout: float = 900) -> dict:
        """Submit and wait; raises with the server's message when validation or execution fails."""
        status, body = self.submit(graph)
        if status != 200:
            raise RuntimeError(f"/prompt rejected the graph ({status}): {json.dumps(body)[:2000]}")
        entry = self.wait(body["prompt_id"], timeout)
        if entry["status"].get("status_str") != "success":
            raise RuntimeError(f"execution failed: {json.dumps(entry['status'])[:3000]}")
        return entry

    def error_of(self, graph: dict, timeout: float = 300) -> str:
        """Submit a graph expected to fail; return the error text (validation or execution)."""
        status, body = self.submit(graph)
        if status != 200:
            return json.dumps(body)
        entry = self.wait(body["prompt_id"], timeout)
        if entry["status"].get("status_str") == "success":
            raise AssertionError("the graph was expected to fail but succeeded")
        return json.dumps(entry["status"])


def load_api_workflow(name: str) -> dict:
    return json.loads((REPO_ROOT / "workflows" / "api" / f"{name}.json").read_text())
