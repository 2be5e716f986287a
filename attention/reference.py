"""Self-attention keys/values (and cross-attention maps) of a real image along its inversion chain.

At step i the reference image's K/V are the projections of its chain latent ``inversion.chain[i]`` run through the
UNet with the inversion's own conditioning. Two ways to have them:
- ``cache``: one reference pass per INVERSION (one UNet call per needed step, batch 1) stores them, fp16, on the
  GPU or offloaded to CPU; every later run (new seeds!) reuses them at no UNet cost.
- ``recompute``: a UNet function wrapper runs the reference forward next to every sampling call (no storage).
``auto`` caches where it fits and falls back to recompute with a warning where it would not.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Tuple

import psutil
import torch

from .. import compat
from ..artifacts import Inversion, InversionChainError
from .controller import CallContext, attention_probs
from .layers import AttentionLayer
from .schedule import locate
from . import patching
from ..logs import log

POLICIES = ("auto", "gpu", "cpu", "recompute")


class ReferenceKV:
    """Recorder and store of one inversion's reference K/V for chosen (chain step, layer) pairs."""

    def __init__(self, inversion: Inversion, layers: Sequence[AttentionLayer], steps: Iterable[int],
                 storage_dtype=torch.float16, cross_tokens: Optional[Sequence[int]] = None, cross_level: int = 2):
        self.inversion = inversion
        self.layer_ids = {l.index for l in layers}
        self.layers = list(layers)
        self.steps = sorted(set(int(s) for s in steps))
        self.storage_dtype = storage_dtype
        self.store: Dict[Tuple[int, int, int], Tuple[torch.Tensor, torch.Tensor]] = {}  # (step, layer, branch)
        self.eps: Dict[int, torch.Tensor] = {}  # step -> the reference's conditional noise prediction
        self.cross_tokens = list(cross_tokens or [])
        self.cross_level = cross_level
        self.cross_maps: Dict[int, torch.Tensor] = {}   # step -> (tokens, h, w) mean over heads and layers
        self._cross_count: Dict[int, int] = {}
        self.storage_device = torch.device("cpu")
        self.mode = "cache"
        self.conds = None           # model-ready conditioning of the inversion (recompute mode)
        self.filled = False

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def estimate_bytes(self) -> int:
        h, w = self.inversion.latent_shape[-2:]
        per_step = 0
        for layer in self.layers:
            gh, gw = layer.grid(h, w)
            per_step += 2 * gh * gw * layer.channels
        itemsize = torch.tensor([], dtype=self.storage_dtype).element_size()
        return per_step * len(self.steps) * itemsize

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.store.values())

    # -- recording (called by the Controller during a reference pass) ----------------------------------------
    def record(self, ctx: CallContext, q, k, v):
        i = ctx.step.index
        if i is None or ctx.step.total != self.inversion.steps or i not in self.steps:
            return
        if ctx.kind == "self" and ctx.layer.index in self.layer_ids:
            for chunk, branch in enumerate(ctx.cond_or_uncond):  # 0 = cond, 1 = uncond; row 0 of each chunk
                row = chunk * ctx.rows_per_chunk
                self.store[(i, ctx.layer.index, int(branch))] = (
                    k[row:row + 1].detach().to(self.storage_device, self.storage_dtype),
                    v[row:row + 1].detach().to(self.storage_device, self.storage_dtype))
        elif ctx.kind == "cross" and self.cross_tokens and ctx.layer.level == self.cross_level:
            probs = attention_probs(q[:1], k[:1], ctx.heads)[0].mean(0)  # (Nq, 77)
            maps = probs[:, self.cross_tokens].T.reshape(len(self.cross_tokens), *ctx.grid).float().cpu()
            n = self._cross_count.get(i, 0)
            self.cross_maps[i] = maps if n == 0 else self.cross_maps[i] * (n / (n + 1)) + maps / (n + 1)
            self._cross_count[i] = n + 1

    def get(self, step: int, layer: AttentionLayer, device, dtype,
            branch: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        kv = self.store.get((step, layer.index, branch))
        if kv is None:
            raise InversionChainError(
                f"KV Inject: no reference keys/values for step {step}, layer {layer.index}. If another node set a "
                f"UNet function wrapper after KV Inject, put KV Inject after it or use cache mode.")
        return kv[0].to(device, dtype), kv[1].to(device, dtype)

    # -- filling ---------------------------------------------------------------------------------------------
    def choose_storage(self, policy: str, model) -> str:
        """Pick cache device or recompute; never risk an out-of-memory crash for the cache."""
        if policy not in POLICIES:
            raise InversionChainError(f"unknown cache policy '{policy}'; use one of {', '.join(POLICIES)}.")
        need = self.estimate_bytes()
        if policy == "recompute":
            return "recompute"
        gpu = model.load_device
        gpu_ok = gpu.type != "cpu" and compat.free_memory(gpu) > need * 2 + 2 ** 30
        cpu_ok = psutil.virtual_memory().available > need * 2 + 2 ** 30
        if policy in ("auto", "gpu") and gpu_ok:
            self.storage_device = gpu
            return "cache"
        if policy in ("auto", "cpu", "gpu") and cpu_ok:
            self.storage_device = torch.device("cpu")
            if policy == "gpu":
                log.warning("[Inversion Chain] reference K/V (%.1f MB) do not fit on %s; keeping them in CPU memory",
                            need / 2 ** 20, gpu)
            return "cache"
        log.warning("[Inversion Chain] reference K/V would need %.1f MB, more than is free; recomputing them at "
                    "every step instead (slower, same result)", need / 2 ** 20)
        return "recompute"

    def fill(self, model, latent_image, negative=None):
        """Cache mode: one reference pass over the needed steps (batch 1, the inversion's conditioning). With a
        ``negative`` both CFG branches are recorded, and the reference's conditional noise prediction too."""
        inv = self.inversion
        recorder_model = patching.with_reference_pass(model, self)
        eps = self.eps

        def observe(args):
            sigma = args["sigma"].flatten()[:1]
            i = locate(float(sigma), inv.sigmas)
            if i is not None:
                eps[i] = ((args["input"][:1] - args["cond_denoised"][:1]) / sigma.view(1, 1, 1, 1)).to(
                    self.storage_device)
            return args["denoised"]

        patching.add_post_cfg_function(recorder_model, observe)
        pbar = compat.progress_bar(len(self.steps))
        steps = self.steps

        def reference_pass(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
            for i in steps:
                compat.check_interrupt()
                x_i = inv.latent_at(i, x.device, x.dtype)[:1]
                model_k(x_i, x_i.new_ones([1]) * float(inv.sigmas[i]), **(extra_args or {}))
                pbar.update(1)
            return x

        positive = [[c[0][:1], c[1]] for c in inv.positive]
        # any cfg != 1 makes ComfyUI evaluate the uncond branch; the guided result itself is not used
        compat.sample_with_function(recorder_model, reference_pass, inv.sigmas, positive,
                                    negative if negative is not None else positive,
                                    1.0 if negative is None else 2.0, latent_image[:1])
        self.filled = True

    def recompute_wrapper(self, previous):
        """UNet function wrapper for recompute mode: a reference forward before each sampling call."""
        def wrapper(apply_model, args):
            t = args["timestep"]
            i = locate(float(t.flatten()[0]), self.inversion.sigmas)
            if i is not None and i in self.steps and not any(key[0] == i for key in self.store):
                self.store.clear()
                x = args["input"]
                x_ref = self.inversion.latent_at(i, x.device, x.dtype)[:1]
                conds = {k: (v.to(x.device) if torch.is_tensor(v) else v) for k, v in self.conds.items()}
                patching.reference_call(apply_model, x_ref, t[:1], conds,
                                        args["c"].get("transformer_options", {}), self)
            return patching.call_unet(apply_model, args, previous)
        return wrapper
