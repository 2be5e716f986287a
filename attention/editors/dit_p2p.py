"""Prompt-to-Prompt / P2Plus on the joint attention of Flux-layout DiTs (Flux, Chroma).

What is edited: the **image-to-text probabilities** of the joint attention (image queries, text keys), the DiT
counterpart of a UNet's cross-attention maps and what Attention Capture shows (dit_capture.py). Not the text stream:
a DiT's text tokens are queries too, but their rows steer the text stream of later blocks, which no
Prompt-to-Prompt edit defines; the image rows read the prompt, as the UNet's cross-attention does. So, per edited
block call, for the two rows (source s, target t) of a CFG half, every image query's joint softmax row ``P`` (over
text keys, then image keys) becomes:

- text columns: cond half, while ``i / N < cross_replace_end_percent``: the target's are the source's through the
  edit plan, ``P_s[:, mapper] * aligned + P_t * (1 - aligned)`` (replace: same positions; refine: the T5 alignment,
  new tokens keep their own); otherwise each row's own;
- image columns: while the self window lasts (cond: ``self_replace_end_percent``, uncond:
  ``uncond_self_replace_end_percent``, and only when the token grid has at most ``self_max_res`` tokens per side),
  the target's are the source's; otherwise each row's own. They are rescaled so that each row sums to one again
  (``img * (1 - text mass) / img mass``: the row keeps the share of the image keys its text columns leave);
- reweight: then the target's chosen text columns are multiplied by c (within the cross window, not renormalised,
  as Prompt-to-Prompt's equaliser).

Both rows of the half go through the same arithmetic (the source's mapping is the identity), so identical prompts
give bit-identical rows. Text-query rows keep their own softmax. The output is ``P V`` with each row's own values.

Hook: ``transformer_options["optimized_attention_override"]`` (ComfyUI's ``wrap_attn``), called inside Flux's
``attention`` after RoPE with the block's ``block_type`` / ``block_index``, ``cond_or_uncond`` and ``sigmas`` in
``transformer_options``. In a call with nothing to edit it hands the call on untouched (to an earlier override, or
ComfyUI's kernel), so outside the windows sampling is ComfyUI's own bit for bit. In an edited call ComfyUI's kernel
runs for the whole batch and the edited halves' rows are overwritten by this module's attention, computed in chunks
of queries (at most ``CHUNK_BYTES`` of float32 scores at once, never the full matrix of a batch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ... import compat
from ...artifacts import named_error, node_name
from ..core.dit_layers import additive_mask
from ..core.schedule import RunTracker, Schedule, locate

CHUNK_BYTES = 2 ** 26


@dataclass
class HalfEdit:
    """What one CFG half's (source, target) rows get in one block call."""
    cross: bool                          # the target's text columns from the source (through the plan)
    self_: bool                          # the target's image columns from the source
    equalizer: Optional[torch.Tensor]    # (T,) scale of the target's text columns, or None


def edited_rows(q, k, v, mask, text: int, src: int, tgt: int, edit: HalfEdit, mapper: Optional[torch.Tensor],
                aligned: Optional[torch.Tensor], chunk_bytes: int = CHUNK_BYTES, words=None):
    """Attention output ``(2, heads, N, head_dim)`` of rows (src, tgt) of q, k, v ``(B, heads, N, head_dim)`` (after
    RoPE), the joint sequence being [``text`` text tokens, image tokens, ...], with the edit applied (module notes).
    ``words`` = (source positions, target positions): also return each row's image-to-text probabilities of those
    text tokens after the edit, summed, mean over heads, ``(2, image queries)`` (local blend's maps)."""
    rows = [src, tgt]
    qs, kf, vf = q[rows].float(), k[rows].float().transpose(-1, -2), v[rows].float()
    bias = additive_mask(mask, q.device)
    if bias is not None and bias.shape[0] not in (1,):
        bias = bias[rows]
    n, scale = q.shape[2], q.shape[-1] ** -0.5
    step = max(1, int(chunk_bytes // (2 * q.shape[1] * n * 4 * 2)))
    eq = None if edit.equalizer is None else edit.equalizer.to(q.device)
    outs, found = [], []
    for a in range(0, n, step):
        b = min(n, a + step)
        s = torch.matmul(qs[:, :, a:b], kf) * scale                         # (2, heads, c, N)
        if bias is not None:
            s = s + (bias if bias.shape[-2] == 1 else bias[..., a:b, :])
        p = s.softmax(-1)
        lo = max(a, text) - a                                               # first image query of the chunk
        if lo < b - a:
            img_q = p[:, :, lo:]
            txt = img_q[..., :text]
            own = img_q[..., text:]
            new_txt = txt.clone()
            if edit.cross:
                new_txt[1] = txt[0][..., mapper] * aligned + txt[1] * (1 - aligned)
            new_img = own.clone()
            if edit.self_:
                new_img[1] = own[0]
            left = (1 - new_txt.sum(-1, keepdim=True)).clamp_min(0)
            new_img = new_img * (left / new_img.sum(-1, keepdim=True).clamp_min(1e-30))
            if eq is not None:
                new_txt[1] = new_txt[1] * eq
            if words is not None:
                found.append(torch.stack([new_txt[r][..., words[r]].sum(-1).mean(0) for r in range(2)]))
            p = torch.cat([p[:, :, :lo], torch.cat([new_txt, new_img], -1)], 2)
        outs.append(torch.matmul(p, vf))
    out = torch.cat(outs, 2).to(q.dtype)
    return out if words is None else (out, torch.cat(found, -1))


class DiTP2PlusOverride(compat.PatchObject):
    """``optimized_attention_override`` applying a Prompt-to-Prompt / P2Plus plan on a 2-row batch (row 0 source,
    row 1 target) in every block of a Flux-layout DiT."""

    def __init__(self, plan, schedule: Schedule, cross_end: float, self_end: float, uncond_self_end: float,
                 self_max_tokens: int, text_tokens: int, patch_size: int = 2, previous=None,
                 blend=None, block_positions=None, shape_key: str = ""):
        self.plan = plan
        self.sched = schedule
        self.cross_end, self.self_end, self.uncond_self_end = float(cross_end), float(self_end), float(uncond_self_end)
        self.self_max_tokens = int(self_max_tokens)
        self.text = int(text_tokens)
        self.patch = int(patch_size)
        self.previous = previous
        self._tiled = {}
        self.blend = blend                          # a LocalBlend fed with (2, h, w) word maps of every block
        self.block_positions = dict(block_positions or {})   # (block_type, block_index) -> execution position
        self.runs = RunTracker()
        self.shape_key = shape_key                  # transformer_options key of the latent's shape (a model wrapper)
        self.node = node_name()   # raised inside the sampler: the errors name the node that built the edit

    def _hand_on(self, func, args, kwargs):
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def _halves(self, to, n_img: int):
        """[(src row, tgt row, HalfEdit)] for this call, and the step (None when the call is not on a block)."""
        if to.get("block_type") not in ("double", "single") or to.get("block_index") is None:
            return [], None
        sigma = to.get("sigmas")
        if sigma is None:
            return [], None
        sigma = float(torch.as_tensor(sigma).flatten()[0])
        i = locate(sigma, self.sched.sigmas)
        if i is None or i >= self.sched.steps:
            raise self.sched.off_schedule(sigma)
        if self.runs.new_run(sigma, self) and self.blend is not None:
            self.blend.reset()                       # a new sampling run: drop the previous run's word maps
        f = self.sched.fraction(i)
        small = n_img <= self.self_max_tokens
        halves = []
        chunks = [int(c) for c in (to.get("cond_or_uncond") or [0])]
        for c, branch in enumerate(chunks):
            cross = branch == 0 and f < self.cross_end
            self_ = small and f < (self.self_end if branch == 0 else self.uncond_self_end)
            if cross or self_:
                eq = self.plan.equalizer if cross else None
                halves.append((2 * c, 2 * c + 1, HalfEdit(cross, self_, eq)))
        return halves, i

    def _text_length(self, to, n: int) -> int:
        """Text tokens of this call: the joint sequence minus the latent's image tokens (ComfyUI repeats a context
        to a common length when it batches prompts of different lengths; an uncond half alone has its own)."""
        shape = to.get(self.shape_key)
        if shape is None or to.get("reference_image_num_tokens"):
            raise named_error(f"{self.node}: this call carries no latent shape, or reference-image tokens "
                                      f"(Kontext), which this edit does not support; sample the P2Plus Controller's "
                                      f"MODEL with its own positive/negative.")
        h, w = self._grid(to)
        return n - h * w

    def _check_text(self, text: int):
        """The cond half's text columns are mapped through the plan: the call's text is the plan's, or copies."""
        if text < self.text or text % self.text:
            raise named_error(
                f"{self.node}: the joint attention has {text} text tokens, the edit expects {self.text} (or a "
                f"multiple). Use the positive/negative outputs of P2Plus Controller, not other conditioning.")

    def _plan(self, copies: int, device):
        key = (copies, device)
        if key not in self._tiled:
            t = self.text
            mapper = torch.cat([self.plan.mapper + j * t for j in range(copies)])
            eq = None if self.plan.equalizer is None else self.plan.equalizer.repeat(copies).to(device)
            self._tiled[key] = (mapper.to(device), self.plan.aligned.repeat(copies).to(device), eq)
        return self._tiled[key]

    def __call__(self, func, *args, **kwargs):
        to = kwargs.get("transformer_options") or {}
        q, k, v = args[0], args[1], args[2]
        mask = args[4] if len(args) > 4 else kwargs.get("mask")   # Qwen-Image passes it positionally
        if not kwargs.get("skip_reshape") or q.dim() != 4 or to.get("block_type") not in ("double", "single"):
            return self._hand_on(func, args, kwargs)
        n = q.shape[2]
        text = self._text_length(to, n)
        halves, step = self._halves(to, n - text)
        chunks = [int(c) for c in (to.get("cond_or_uncond") or [0])]
        record = self.blend is not None and step is not None and 0 in chunks
        if not halves and not record:
            return self._hand_on(func, args, kwargs)
        if q.shape[0] != 2 * len(chunks):
            raise named_error(
                f"{self.node}: expected a 2-row latent (row 0 source, row 1 target), got {q.shape[0]} rows for "
                f"{len(chunks)} CFG halves. Sample the LATENT output of P2Plus Controller as it is, with its "
                f"positive/negative.")
        mapper = aligned = eq = None
        if record or any(edit.cross for _s, _t, edit in halves):
            self._check_text(text)
            mapper, aligned, eq = self._plan(text // self.text, q.device)
        words = self._blend_words(text // self.text, q.device) if record else None
        cond = 2 * chunks.index(0) if record else None
        out = self._hand_on(func, args, kwargs)
        if halves:
            out = out.clone()
        heads, maps = q.shape[1], None
        for src, tgt, edit in halves:
            edit = HalfEdit(edit.cross, edit.self_, eq if edit.equalizer is not None else None)
            o = edited_rows(q, k, v, mask, text, src, tgt, edit, mapper, aligned,
                            words=words if src == cond else None)
            if src == cond:
                o, maps = o
            o = o if kwargs.get("skip_output_reshape") else o.transpose(1, 2).reshape(2, n, heads * q.shape[-1])
            out[[src, tgt]] = o.to(out.dtype)
        if record:
            if maps is None:     # the cond half is not edited in this call: its own probabilities
                _o, maps = edited_rows(q, k, v, mask, text, cond, cond + 1,
                                       HalfEdit(False, False, None), mapper, aligned, words=words)
            h, w = self._grid(to)
            position = self.block_positions.get((to["block_type"], int(to["block_index"])), 0)
            self.blend.record_map(step, position, maps.reshape(2, h, w).float())
        return out

    def _grid(self, to):
        shape = to[self.shape_key]
        return -(-int(shape[-2]) // self.patch), -(-int(shape[-1]) // self.patch)

    def _blend_words(self, copies: int, device):
        key = ("words", copies, device)
        if key not in self._tiled:
            self._tiled[key] = tuple(torch.tensor([p + j * self.text for j in range(copies) for p in pos],
                                                  dtype=torch.long, device=device)
                                     for pos in self.blend.positions)
        return self._tiled[key]


class StartCheck(compat.PatchObject):
    """Model function wrapper of a real-image edit on a flow model: at the schedule's first sigma every row must be
    the inversion's x_T (sampler space), as Inverted Noise starts it. A sampler that adds its own noise (KSampler,
    RandomNoise) would otherwise generate a new image in both rows without a word; it is stopped naming the fix."""

    def __init__(self, start: torch.Tensor, sigma0: float, previous=None):
        self.start, self.sigma0, self.previous = start.float().cpu(), float(sigma0), previous
        self.tolerance = 1e-4 * max(1.0, float(self.start.abs().max()))
        self.node = node_name()

    def __call__(self, apply_model, args):
        x, sigma = args["input"], args["timestep"]
        sigma = float(torch.as_tensor(sigma).flatten()[0])
        if abs(sigma - self.sigma0) <= 1e-6 * max(1.0, self.sigma0):
            miss = float((x.float().cpu() - self.start).abs().max())
            if miss > self.tolerance:
                raise named_error(
                    f"{self.node}: the rows do not start at the inversion's latent (max difference {miss:.3g} at "
                    f"sigma {sigma:.4g}): the sampler added its own noise. On flow models sample a real image with "
                    f"SamplerCustomAdvanced, noise = Inverted Noise (the same INVERSION), this node's sigmas and "
                    f"LATENT.")
        if self.previous is not None:
            return self.previous(apply_model, args)
        return apply_model(x, args["timestep"], **args["c"])
