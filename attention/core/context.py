"""Per-step context patches: the text embedding that one CFG branch's cross-attention reads, step by step.

Stock samplers take one CONDITIONING for every step, so a per-step embedding has to enter inside the UNet: an attn2
pre-projection patch ``(n, context, value, extra_options) -> (n, context, value)`` replaces the rows' inputs right
before ComfyUI projects them to K and V, so every layer sees exactly what ``apply_model(c_crossattn=embedding)``
would. Two uses, one class:
- null-text inversion: the uncond rows' context and value input (K and V) become the step's optimised embedding;
- StyleDiffusion: the cond rows' value input only (keys keep the prompt, so the attention maps stay the prompt's),
  optionally through a token alignment per row (P2Plus refine: a target token takes the source token it is aligned
  to, new tokens keep their own value input).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from ...artifacts import named_error, node_name
from ...compat import PatchObject
from .controller import REFERENCE_PASS_KEY
from .schedule import Schedule
from ...logs import log

RowMap = Optional[Tuple[torch.Tensor, torch.Tensor]]   # (source token per target token, 1 = aligned / 0 = own)
COND, UNCOND = 0, 1


class ContextPatch(PatchObject):
    """The rows of CFG branch ``branch`` (0 cond, 1 uncond) read ``embeddings[step]`` while ``step / N <
    end_percent``: as value input only (``keys=False``), or as context and value input (``keys=True``).

    ``row_maps[r]`` (optional, per row of the chunk) aligns the embedding's tokens to another prompt's.
    ``override`` (training): a tensor used at every step instead of the stored embeddings. ``mismatch`` says what
    to connect when the embedding's (tokens, dim) differ from the context's."""

    def __init__(self, embeddings: Optional[torch.Tensor], schedule: Schedule, branch: int, keys: bool,
                 end_percent: float = 1.0, row_maps: Sequence[RowMap] = (), mismatch: str = ""):
        self.embeddings = embeddings          # (steps, 1, tokens, dim) or None (training only)
        self.schedule = schedule
        self.branch = int(branch)
        self.keys = bool(keys)
        self.end_percent = float(end_percent)
        self.row_maps = list(row_maps)
        self.mismatch = mismatch
        self.override: Optional[torch.Tensor] = None
        self._cache: Dict[tuple, torch.Tensor] = {}

    def embedding(self, step: int, device, dtype) -> torch.Tensor:
        key = (step, device, dtype)
        if key not in self._cache:
            if len(self._cache) > 4 * len(self.embeddings):
                self._cache.clear()
            self._cache[key] = self.embeddings[step].to(device=device, dtype=dtype)
        return self._cache[key]

    def _fill(self, t: torch.Tensor, rows, per: int, emb: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        for row in rows:
            row_map = self.row_maps[row % per] if row % per < len(self.row_maps) else None
            if row_map is None:
                out[row] = emb[0]
            else:
                source_token, aligned = (x.to(out.device) for x in row_map)
                a = aligned.to(out.dtype)[:, None]
                out[row] = a * emb[0][source_token] + (1 - a) * out[row]
        return out

    def __call__(self, n, context, value, extra_options):
        order = extra_options.get("cond_or_uncond") or []
        # a reference pass records a real image's own forward (its inversion's conditioning), never an edited one
        if self.branch not in order or context is None or extra_options.get(REFERENCE_PASS_KEY) is not None:
            return n, context, value
        if self.override is not None:
            emb = self.override.to(context.dtype)
        elif self.embeddings is None:
            return n, context, value
        else:
            step = self.schedule.index(float(extra_options["sigmas"].flatten()[0]))
            if self.schedule.fraction(step) >= self.end_percent:
                return n, context, value
            emb = self.embedding(step, context.device, context.dtype)
        if tuple(context.shape[1:]) != tuple(emb.shape[1:]):
            raise named_error(
                f"{self.schedule.node}: the context is {tuple(context.shape[1:])} (tokens, dim) but the per-step "
                f"embeddings are {tuple(emb.shape[1:])}. {self.mismatch}")
        per = context.shape[0] // len(order)
        rows = [c * per + r for c, kind in enumerate(order) if kind == self.branch for r in range(per)]
        if not self.keys:
            return n, context, self._fill(context if value is None else value, rows, per, emb)
        new_context = self._fill(context, rows, per, emb)
        if value is None or value is context:
            return n, new_context, None if value is None else new_context
        if tuple(value.shape) == tuple(context.shape):
            return n, new_context, self._fill(value, rows, per, emb)
        return n, new_context, value


class CfgCheck(PatchObject):
    """Post-CFG observer: warns once when sampling runs at another cfg than the NULL_TEXT was optimised for."""

    def __init__(self, cfg: float):
        self.cfg = float(cfg)
        self.node = node_name()
        self.warned = False

    def __call__(self, args):
        denoised = args["denoised"]
        if self.warned:
            return denoised
        cond, uncond = args.get("cond_denoised"), args.get("uncond_denoised")
        if cond is None or uncond is None or not torch.is_tensor(uncond):
            return denoised
        diff = (cond - uncond).float()
        norm = float((diff * diff).sum())
        if norm > 1e-12:
            scale = float(((denoised - uncond).float() * diff).sum()) / norm
            if abs(scale - self.cfg) > 0.05 * max(1.0, self.cfg):
                log.warning("[Inversion Chain] %s: sampling at cfg %.2f but the NULL_TEXT was optimised at cfg %.2f; "
                            "row 0 will not reconstruct the image exactly.", self.node, scale, self.cfg)
            self.warned = True
        return denoised
