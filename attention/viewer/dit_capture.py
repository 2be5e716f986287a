"""Attention Capture on Flux-layout DiTs (Flux, Chroma): image-to-text and image self-attention maps of the joint
attention, into the same ATTN_MAPS the UNet capture fills (capture.py), read by the same viewer.

Hook: an ``attn1_patch`` (ComfyUI calls it in every double and single block with q, k, v of the joint sequence
[text tokens, image tokens] after the QK norm and before RoPE, plus ``pe``, ``attn_mask`` and ``img_slice``),
kept after every other attn1 patch so it sees what they (KV Inject) hand on, whichever node came first. It
rotates q and k with the block's own ``pe`` (``compat.flux_rope``, the call the block's attention makes), so the
logits are the block's; it returns nothing to change, so sampling is bit-identical. (``optimized_attention_override``
would see q and k after RoPE too, but it replaces the attention kernel and in double blocks does not get
``img_slice``.)

Per captured block call, never the full joint matrix: the image queries go in chunks of rows (at most
``CHUNK_BYTES`` of float32 scores at once); each row's softmax runs over every key, text and image (the joint
normaliser: the row's log-sum-exp over all keys), and only the columns kept leave the chunk:
- cross: the text-key columns of every image query, ``P(image query attends text token t)`` in the joint
  attention, mean over heads: ``(rows, T, h, w)``. A map over t sums to the query's text share (< 1), so the
  viewer shows these probabilities as they are (no start token to drop, no renormalisation);
- self: the image-key columns of the ``query_grid x query_grid`` query points, mean over heads: ``(rows, P, h, w)``
  (sums to 1 minus the point's text share).
Units are blocks in execution order (capture.py's layers: index = block position, double blocks first, as KV
Inject's ``start_layer``); every block works on one token grid, latent / patch size (latent/2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from ... import compat
from ..core import tokens as tokens_mod
from ..core.dit_layers import additive_mask, diffusion_model_of, enumerate_blocks
from ..core.layers import AttentionLayer
from ..core.schedule import RunTracker, locate
from ..store.dit_reference import RECORDING_KEY
from . import capture_budget
from .capture import SIZES, AttentionMaps, query_points

CHUNK_BYTES = 2 ** 26          # float32 scores of one chunk of image queries (64 MiB), freed after each chunk
SHAPE_KEY = "inversion_chain_latent_shape"   # transformer_options: the latent's shape (set by ``shape_wrapper``)


QWEN_IMAGE_CLASS = ("comfy.ldm.qwen_image.model", "QwenImageTransformer2DModel")


def is_qwen_image(model_patcher) -> bool:
    """Qwen-Image: one stack of joint blocks (ComfyUI's block_type "double"), text tokens first, as Flux's."""
    dm = diffusion_model_of(model_patcher)
    return dm is not None and (type(dm).__module__, type(dm).__name__) == QWEN_IMAGE_CLASS


def dit_layers(model_patcher) -> List[AttentionLayer]:
    """Every joint-attention block as a capture layer: index = block position, key = (block_type, block_index, 0),
    level = log2(patch size) (the token grid is latent / patch size)."""
    dm = diffusion_model_of(model_patcher)
    level = int(round(math.log2(int(getattr(dm, "patch_size", 2)))))
    if is_qwen_image(model_patcher):
        return [AttentionLayer(index=i, key=("double", i, 0), part="double", level=level,
                               channels=int(b.attn.inner_dim), heads=int(b.attn.heads))
                for i, b in enumerate(dm.transformer_blocks)]
    return [AttentionLayer(index=b.position, key=(b.kind, b.index, 0), part=b.kind, level=level,
                           channels=b.heads * b.head_dim, heads=b.heads) for b in enumerate_blocks(model_patcher)]


@dataclass
class T5PromptTokens:
    """A branch's prompt as the T5 stream the DiT reads (text token p = ``ids[p]``; no start token)."""
    clip: object
    text: str
    ids: List[int]

    @property
    def end(self) -> int:
        return tokens_mod.t5_word_count(self.clip, self.ids)

    def meaningful(self) -> List[int]:
        return list(range(0, self.end))

    def labels(self) -> Dict[int, str]:
        return dict(enumerate(tokens_mod.t5_readable(self.clip, self.ids[:self.end])))

    def locate(self, word: str, input_name: str) -> List[int]:
        return tokens_mod.t5_locate_words(self.clip, self.text, [word], input_name)[word]


def t5_prompt_tokens(clip, prompt: str) -> T5PromptTokens:
    return T5PromptTokens(clip=clip, text=prompt, ids=tokens_mod.t5_ids(clip, prompt))


@dataclass
class QwenPromptTokens:
    """A branch's prompt as the Qwen2.5 tokens the Qwen-Image DiT reads: the chat template's system and user header
    are dropped by ComfyUI's text encoder, so text token p = ``ids[p]`` here (the prompt's pieces, then the template's
    closing tokens)."""
    clip: object
    text: str
    ids: List[int]

    @property
    def end(self) -> int:
        return tokens_mod.qwen_word_count(self.ids)

    def meaningful(self) -> List[int]:
        return list(range(0, self.end))

    def labels(self) -> Dict[int, str]:
        return dict(enumerate(tokens_mod.qwen_readable(self.clip, self.ids[:self.end])))

    def locate(self, word: str, input_name: str) -> List[int]:
        return tokens_mod.qwen_locate_words(self.clip, self.text, [word], input_name)[word]


@dataclass
class SD3PromptTokens:
    """SD3 / SD3.5's context: the CLIP window (77 tokens, start token first; CLIP-L and CLIP-G side by side in the
    channels, so one position per token) and then the T5 stream. A word is found in both parts and its map sums
    both parts' columns; labels say which part a token is from."""
    clip: object
    text: str
    clip_ids: List[int]
    t5: T5PromptTokens

    @property
    def ids(self) -> List[int]:
        return self.clip_ids + self.t5.ids

    def _clip_end(self) -> int:
        return self.clip_ids.index(tokens_mod.END) if tokens_mod.END in self.clip_ids else len(self.clip_ids)

    def meaningful(self) -> List[int]:
        offset = len(self.clip_ids)
        return list(range(1, self._clip_end())) + [offset + p for p in self.t5.meaningful()]

    def labels(self) -> Dict[int, str]:
        readable = tokens_mod.readable_tokens(self.clip, self.clip_ids[:self._clip_end()])
        out = {p: f"{readable[p - 1]} (CLIP)" for p in range(1, self._clip_end()) if p - 1 < len(readable)}
        offset = len(self.clip_ids)
        out.update({offset + p: f"{label} (T5)" for p, label in self.t5.labels().items()})
        return out

    def locate(self, word: str, input_name: str) -> List[int]:
        offset = len(self.clip_ids)
        return (tokens_mod.locate_words(self.clip, self.text, [word], input_name)[word]
                + [offset + p for p in self.t5.locate(word, input_name)])


def prompt_tokens_for(clip, prompt: str, sd3: bool = False):
    """The prompt's tokens in the stream the DiT reads: T5 (Flux, Chroma), CLIP then T5 (``sd3``: SD3 / SD3.5) or
    Qwen2.5 (Qwen-Image); None if neither."""
    if sd3 and tokens_mod.t5_tokenizer(clip) is not None:
        return SD3PromptTokens(clip=clip, text=prompt, clip_ids=tokens_mod.token_ids(clip, prompt),
                               t5=t5_prompt_tokens(clip, prompt))
    if tokens_mod.t5_tokenizer(clip) is not None:
        return t5_prompt_tokens(clip, prompt)
    if tokens_mod.qwen_tokenizer(clip) is not None:
        return QwenPromptTokens(clip=clip, text=prompt, ids=tokens_mod.qwen_ids(clip, prompt))
    return None


def joint_maps(q, k, pe, mask, img_start: int, img_tokens: int, points: Optional[torch.Tensor], cross: bool,
               chunk_bytes: int = CHUNK_BYTES):
    """(cross ``(B, T, img_tokens)`` or None, self ``(B, P, img_tokens)`` or None) from an attn1_patch's q, k
    ``(B, heads, N, head_dim)``: joint-softmax probabilities (over all N keys) of image queries, mean over heads."""
    if pe is not None:
        q, k = compat.flux_rope(q, k, pe)
    batch, heads, n, dim = q.shape
    kf = k.float().transpose(-1, -2)
    bias = additive_mask(mask, q.device)
    scale = dim ** -0.5

    def probs(rows: torch.Tensor) -> torch.Tensor:
        s = torch.matmul(q.index_select(2, rows).float(), kf) * scale          # (B, heads, rows, N)
        if bias is not None:
            s = s + (bias if bias.shape[-2] == 1 else bias.index_select(-2, rows))
        return s.softmax(-1)

    img = slice(img_start, img_start + img_tokens)
    out_cross = out_self = None
    if cross:
        step = max(1, int(chunk_bytes // (batch * heads * n * 4 * 2)))       # scores and their softmax
        parts = []
        for a in range(0, img_tokens, step):
            rows = torch.arange(img_start + a, img_start + min(img_tokens, a + step), device=q.device)
            parts.append(probs(rows)[..., :img_start].mean(1))                # (B, rows, T)
        out_cross = torch.cat(parts, 1).transpose(1, 2)
    if points is not None:
        out_self = probs(points.to(q.device) + img_start)[..., img].mean(1)   # (B, P, img_tokens)
    return out_cross, out_self


def fold_repeats(m: torch.Tensor, length: Optional[int]) -> torch.Tensor:
    """Cross maps ``(r, T, hw)`` of a text batched with a longer one (ComfyUI repeats a context to a common
    multiple): the copies' probabilities summed onto the prompt's own ``length`` tokens."""
    t = m.shape[1]
    if not length or t <= length or t % length:
        return m
    return m.reshape(m.shape[0], t // length, length, m.shape[2]).sum(1)


class DiTCaptureObserver(compat.PatchObject):
    """attn1_patch: records the chosen blocks' maps into an ``AttentionMaps``; changes nothing. ``runs_last``: kept
    after every other attn1 patch (patching.add_attn1_patch), also those added after it (KV Inject)."""

    runs_last = True

    def __init__(self, maps: AttentionMaps, layers: Sequence[AttentionLayer], text_mask: bool = False):
        self.maps = maps
        self.text_mask = text_mask   # Qwen-Image hands the patch the text mask, not the joint mask it attends with
        self.layers = list(layers)
        self.by_key = {(l.key[0], l.key[1]): l for l in self.layers}
        self.runs = RunTracker()
        maps.set_units(self.layers)
        maps.start_token = False

    def __call__(self, q, k, v, pe=None, attn_mask=None, extra_options=None):
        opts = extra_options or {}
        layer = self.by_key.get((opts.get("block_type"), opts.get("block_index")))
        if layer is not None and opts.get(RECORDING_KEY) is None and opts.get("sigmas") is not None \
                and opts.get(SHAPE_KEY) is not None:
            with torch.no_grad():
                self._capture(layer, q, k, pe, attn_mask, opts)
        return {}

    def _capture(self, layer, q, k, pe, attn_mask, opts):
        sigma = float(opts["sigmas"].flatten()[0])
        if self.runs.new_run(sigma, self):
            self.maps.reset()
        schedule = opts.get("sample_sigmas")
        index = total = None
        if schedule is not None:
            schedule = schedule.detach().float().cpu()
            index, total = locate(sigma, schedule), int(schedule.numel()) - 1
        latent_hw = tuple(int(x) for x in opts[SHAPE_KEY][-2:])
        h, w = layer.grid(*latent_hw)
        s0, s1 = opts["img_slice"]
        if self.text_mask and attn_mask is not None:
            self.maps.warn_once(("mask", layer.index), "a text attention mask is set; its joint form is not handed "
                                                       "to the patch, so maps are not captured")
            return
        if s1 - s0 < h * w:
            self.maps.warn_once(("tokens", layer.index), f"block {layer.index} has {s1 - s0} image tokens, fewer "
                                                         f"than its {h}x{w} grid; not captured")
            return
        kinds = self.maps.kinds
        points = query_points((h, w), self.maps.query_grid) if "self" in kinds else None
        cross, own = joint_maps(q, k, pe, attn_mask, int(s0), h * w, points, "cross" in kinds)
        chunks = [int(c) for c in (opts.get("cond_or_uncond") or [0])]
        if q.shape[0] % len(chunks):
            self.maps.warn_once(("rows", layer.index), f"batch of {q.shape[0]} rows does not split into "
                                                       f"{len(chunks)} chunks")
            return
        rpc = q.shape[0] // len(chunks)
        step_total = total if index is not None else None
        for branch in sorted(set(chunks)):
            idx = [i for i, c in enumerate(chunks) if c == branch]
            for kind, m in (("cross", cross), ("self", own)):
                if m is None:
                    continue
                m = m.reshape(len(chunks), rpc, m.shape[1], m.shape[2])
                m = m[idx[0]] if len(idx) == 1 else m[idx].mean(0)
                if kind == "cross":
                    prompt = self.maps.prompts.get(branch)
                    m = fold_repeats(m, len(prompt.ids) if prompt is not None else None)
                if self.maps.max_bytes and self.maps.empty():   # the run's first map, before any is kept
                    tokens = m.shape[1] if kind == "cross" else (cross.shape[1] if cross is not None else 0)
                    self.maps.sizing = (self.layers, latent_hw, len(set(chunks)), rpc, tokens)
                    capture_budget.check(SIZES, self.maps, self.layers, latent_hw, step_total or 1,
                                         len(set(chunks)), rpc, tokens, steps_known=bool(step_total))
                self.maps.add(kind, layer.index, branch, m, sigma, index, step_total, (h, w), latent_hw)


def shape_wrapper(previous):
    """Model function wrapper: hands the latent's shape to the observer (Flux-layout blocks do not get it)."""
    def wrapper(apply_model, args):
        c = dict(args["c"])
        to = dict(c.get("transformer_options", {}))
        to[SHAPE_KEY] = tuple(args["input"].shape)
        c["transformer_options"] = to
        args = dict(args, c=c)
        if previous is not None:
            return previous(apply_model, args)
        return apply_model(args["input"], args["timestep"], **c)
    return wrapper
