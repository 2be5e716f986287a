"""The source image's image-token K/V in the joint attention of a DiT (Flux, Chroma, Qwen-Image), along its
inversion chain: the DiT counterpart of reference.py's ``ReferenceKV``, kept in the same ``STORE``.

At chain step i the source's K/V are what the model computes on ``inversion.chain[i]`` with the inversion's own
conditioning (and, per CFG half, with the ``negative`` the sampler gets). They are recorded by an ``attn1_patch``
(ComfyUI calls it in every double and single block -- Qwen-Image: every block -- with q, k, v of the joint sequence,
after the QK norm and before RoPE; ``img_slice`` says where the image tokens are), row 0 of each CFG chunk, only the
image tokens' slice, in the dtype the attention computes in: nothing is rounded, so the identity edit and cache ==
recompute are exact.

Keys before RoPE: the rotary embedding is applied inside the attention call, by token position, to whatever k
arrives. ``pe`` comes from the token ids (``txt_ids`` zeros, ``img_ids`` the latent's patch grid), so the image rows
of ``pe`` depend on the latent size only (Qwen-Image: image ids centred on the grid, text ids from max(h, w) / 2 of
the grid on, so again the latent size alone): the source K placed at the same image positions of the target's
sequence get exactly the rotation they had in the source's own pass, whatever the prompts' lengths (the slice moves
with ``img_slice``, the ids do not).

Stored: K and V (no maps), ``2 * heads * head_dim * image tokens`` values per (step, block, CFG half); with
``record_eps`` (RIVAL's normalisation) also the conditional ``(x - denoised) / sigma`` of each chain step (the
velocity on these flow models).
"""
from __future__ import annotations

from typing import Dict, Iterable, Sequence, Tuple

import torch

from ... import compat
from ...artifacts import Inversion, named_error, node_name
from ..core import patching
from ..core.dit_layers import DiTBlock, diffusion_model_of
from ..core.schedule import locate
from .reference import replay_chain

RECORDING_KEY = "inversion_chain_dit_reference"   # transformer_options key: this forward records, nothing edits


def image_tokens(model_patcher, latent_shape) -> int:
    """Image tokens of a latent of ``latent_shape`` (ComfyUI pads the latent to a multiple of the patch size)."""
    p = int(getattr(diffusion_model_of(model_patcher), "patch_size", 2))
    h, w = int(latent_shape[-2]), int(latent_shape[-1])
    return ((h + p - 1) // p) * ((w + p - 1) // p)


def compute_dtype(model_patcher) -> torch.dtype:
    base = model_patcher.model
    manual = getattr(base, "manual_cast_dtype", None)
    return manual if manual is not None else base.get_dtype()


def step_of(extra_options, sigmas) -> int | None:
    sigma = extra_options.get("sigmas")
    if sigma is None:
        return None
    return locate(float(torch.as_tensor(sigma).flatten()[0]), sigmas)


class DiTReferenceKV:
    """Recorder and store entry: (chain step, block kind, block index, CFG branch) -> (K, V) of the image tokens,
    each ``[1, heads, image tokens, head_dim]``."""

    noun = "reference K/V"
    keep = "kv"

    def __init__(self, inversion: Inversion, blocks: Sequence[DiTBlock], steps: Iterable[int], tokens: int,
                 storage_dtype: torch.dtype, branches: int = 1, repeat_text: bool = True):
        self.inversion = inversion
        self.layers = list(blocks)              # the store's key reads ``layers``
        self.block_keys = {b.key for b in blocks}
        self.steps = sorted(set(int(s) for s in steps))
        self.tokens = int(tokens)
        self.storage_dtype = storage_dtype
        self.branches = int(branches)
        self.node = node_name()
        self.repeat_text = repeat_text   # recompute: batch CFG halves as ComfyUI (compat.text_batches_by_repeat)
        self.store: Dict[Tuple[int, str, int, int], Tuple[torch.Tensor, torch.Tensor]] = {}
        self.storage_device = torch.device("cpu")
        self.mode = "cache"
        self.conds = None            # recompute mode: model-ready conditioning of the source (and of the negative)
        self.conds_uncond = None
        self.recompute_conds = None  # a partial entry: (conds, conds_uncond) for the steps it does not hold
        self.record_eps = False
        self.eps: Dict[int, torch.Tensor] = {}          # filled by ``fill`` when ``record_eps`` (RIVAL)
        self.cross_maps: Dict[int, torch.Tensor] = {}
        self.cross_tokens: list = []
        self.cross_level = 0

    def with_steps(self, steps: Iterable[int]) -> "DiTReferenceKV":
        """An empty entry like this one for other chain steps (partial caching)."""
        entry = DiTReferenceKV(self.inversion, self.layers, steps, self.tokens, self.storage_dtype, self.branches,
                               self.repeat_text)
        entry.node = self.node
        entry.record_eps = self.record_eps
        return entry

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def estimate_bytes(self) -> int:
        itemsize = torch.tensor([], dtype=self.storage_dtype).element_size()
        per_step = sum(2 * b.heads * b.head_dim * self.tokens for b in self.layers) * self.branches * itemsize
        if self.record_eps:
            per_step += 4 * int(torch.Size(self.inversion.latent_shape[1:]).numel())
        return per_step * len(self.steps)

    def nbytes(self) -> int:
        return (sum(t.numel() * t.element_size() for kv in self.store.values() for t in kv)
                + sum(t.numel() * t.element_size() for t in self.eps.values()))

    def usable(self) -> bool:
        return True   # K/V as computed: nothing needs the model to read them back

    # -- recording -----------------------------------------------------------------------------------------
    def record(self, k, v, extra_options):
        i = step_of(extra_options, self.inversion.sigmas)
        key = (extra_options.get("block_type"), extra_options.get("block_index"))
        if i is None or i not in self.steps or key not in self.block_keys:
            return
        s0, s1 = extra_options["img_slice"]
        branches = list(extra_options.get("cond_or_uncond") or [0])
        rows = k.shape[0] // len(branches)
        for chunk, branch in enumerate(branches):
            r = chunk * rows
            self.store[(i, key[0], int(key[1]), int(branch))] = (
                k[r:r + 1, :, s0:s1].detach().to(self.storage_device, self.storage_dtype).clone(),
                v[r:r + 1, :, s0:s1].detach().to(self.storage_device, self.storage_dtype).clone())

    def get(self, step: int, block: DiTBlock, device, dtype, branch: int = 0):
        kept = self.store.get((step, block.kind, block.index, branch))
        if kept is None:
            raise named_error(
                f"{self.node}: no source keys/values for step {step}, {block.describe()}, CFG half {branch}. If "
                f"another node set a model function wrapper after {self.node}, put {self.node} after it or use "
                f"cache mode.")
        return kept[0].to(device, dtype), kept[1].to(device, dtype)

    def fill(self, model, latent_image, negative=None):
        """Cache mode: one forward of the source per needed chain step (batch 1; with ``negative`` both CFG
        halves), through ComfyUI's sampling entry, on a clone that records only."""
        recorder = patching.add_attn1_patch(model.clone(), DiTRecorder())
        to = dict(recorder.model_options.get("transformer_options", {}))
        to[RECORDING_KEY] = self
        recorder.model_options["transformer_options"] = to
        if self.record_eps:
            sigmas = self.inversion.sigmas

            def keep_eps(args):   # the conditional prediction at the chain latent, as a sampler direction
                i = locate(float(args["sigma"].flatten()[0]), sigmas)
                if i is not None and i in self.steps:
                    x, s = args["input"][:1], float(sigmas[i])
                    self.eps[i] = ((x - args["cond_denoised"][:1]) / s).detach().float().cpu().clone()
                return args["denoised"]
            recorder.set_model_sampler_post_cfg_function(keep_eps)
        replay_chain(recorder, self.inversion, self.steps, latent_image, negative)

    def recompute_wrapper(self, previous):
        """Model function wrapper for recompute mode: the source's forward(s) at the chain latent, before each
        sampling call of a needed step (one step held at a time)."""
        self.store.clear()

        def wrapper(apply_model, args):
            t = args["timestep"]
            i = locate(float(t.flatten()[0]), self.inversion.sigmas)
            if i is not None and i in self.steps and not any(key[0] == i for key in self.store):
                self.store.clear()
                x = args["input"]
                x_ref = self.inversion.latent_at(i, x.device, x.dtype)[:1]
                options = dict(args["c"].get("transformer_options", {}))
                options[RECORDING_KEY] = self
                made = list((self.conds, self.conds_uncond)[:self.branches])
                both = patching.stack_conds(made, self.repeat_text) if len(made) == 2 else None
                # both CFG halves in one forward where ComfyUI would batch them (texts of different lengths
                # repeated to a common multiple, as in the cache's fill), else one forward per half
                calls = [([0, 1], both)] if both is not None else list(enumerate(made))
                for branch, conds in calls:
                    rows = len(branch) if isinstance(branch, list) else 1
                    conds = {k: (c.to(x.device) if torch.is_tensor(c) else c) for k, c in conds.items()}
                    x_rows = x_ref.repeat(rows, *([1] * (x_ref.dim() - 1)))   # 4-D, or Qwen-Image's 5-D
                    patching.reference_call(apply_model, x_rows, t[:1].repeat(rows), conds,
                                            options, None, branch)
            return patching.call_unet(apply_model, args, previous)
        return wrapper


class DiTRecorder(compat.PatchObject):
    """attn1_patch: in a forward marked with RECORDING_KEY, hands k and v to that entry; returns nothing to change."""

    def __call__(self, q, k, v, pe=None, attn_mask=None, extra_options=None):
        entry = (extra_options or {}).get(RECORDING_KEY)
        if entry is not None:
            entry.record(k, v, extra_options)
        return {}
