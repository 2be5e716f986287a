"""Plug-and-Play feature injection from a content image's inversion chain (StyleDiffusion style transfer).

At step i the content's features are those of its chain latent ``chain[i]`` run through the UNet with the
inversion's own conditioning (one batch-1 forward, nothing edited), as Plug-and-Play takes them from its source
row. While sampling, every row of both CFG branches gets, at step i:
- in one decoder ResNet block, the content's residual branch (block output minus its skip path) in place of its
  own, while ``i/N < feature_end_percent``; the row's own skip path stays (PnP's ``pnp_f_t``, default 0.8);
- in the self-attention layers from ``attention_start_layer`` on, the content's queries and keys in place of its
  own, so the attention maps are the content's and the values the row's own, while ``i/N <
  attention_end_percent`` (PnP's ``pnp_attn_t``, default 0.5).

``ContentFeatures`` records and holds them. Cached entries live in the one reference store
(``reference.STORE``: keyed by inversion, conditioning, layers and steps, least recently used evicted, within its
budget); when they would not fit, a UNet wrapper recomputes the content forward next to every sampling call.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from ...artifacts import Inversion, InversionChainError, named_error, node_name
from ...conditioning import first_row
from ..core import patching
from ..core.controller import REFERENCE_PASS_KEY, CallContext, Editor
from ..core.layers import AttentionLayer, DecoderBlock
from ..store.reference import cached, replay_chain
from ..core.schedule import Schedule, locate


class ContentFeatures:
    """Recorder and store of a content inversion's decoder features: the residual of one ResNet block at
    ``feature_steps`` and the self-attention queries/keys of ``layers`` at ``attention_steps`` (storage dtype)."""

    def __init__(self, inversion: Inversion, block: DecoderBlock, layers: Sequence[AttentionLayer],
                 feature_steps: Sequence[int], attention_steps: Sequence[int],
                 storage_dtype=torch.float16):
        self.inversion = inversion
        self.block = block
        self.layers = list(layers)
        self.layer_ids = {l.index for l in self.layers}
        self.feature_steps = sorted(set(int(s) for s in feature_steps))
        self.attention_steps = sorted(set(int(s) for s in attention_steps)) if self.layers else []
        self.steps = sorted(set(self.feature_steps) | set(self.attention_steps))
        self.node = node_name()
        self.storage_dtype = storage_dtype
        self.storage_device = torch.device("cpu")
        self.features: Dict[int, torch.Tensor] = {}                               # step -> (1, C, h, w)
        self.qk: Dict[Tuple[int, int], Tuple[torch.Tensor, torch.Tensor]] = {}    # (step, layer) -> (q, k)
        self.mode = "cache"
        self.conds = None            # model-ready conditioning of the inversion (recompute mode)
        self.budget_message = ""

    # -- bookkeeping (the reference store calls these) ---------------------------------------------------------
    # the reference store's entry protocol (attention/store/reference.py): what is kept, and whether it is still valid
    noun = "content features"
    keep = "features"   # decoder features and attention maps themselves: nothing is re-projected when used

    def usable(self) -> bool:
        return True

    def estimate_bytes(self) -> int:
        h, w = self.inversion.latent_shape[-2:]
        itemsize = torch.tensor([], dtype=self.storage_dtype).element_size()
        per_attention_step = sum(2 * l.grid(h, w)[0] * l.grid(h, w)[1] * l.channels for l in self.layers)
        gh, gw = self.block.grid(h, w)
        return itemsize * (len(self.attention_steps) * per_attention_step
                           + len(self.feature_steps) * gh * gw * self.block.channels)

    def nbytes(self) -> int:
        tensors = list(self.features.values()) + [t for qk in self.qk.values() for t in qk]
        return sum(t.numel() * t.element_size() for t in tensors)

    def clear(self):
        self.features.clear()
        self.qk.clear()

    # -- recording -----------------------------------------------------------------------------------------
    def step_of(self, options: dict) -> Optional[int]:
        sigmas = options.get("sigmas")
        return None if sigmas is None else locate(float(sigmas.flatten()[0]), self.inversion.sigmas)

    def record(self, ctx: CallContext, q, k, v):
        """Attention calls of a reference pass (the Controller calls this): row 0 is the content."""
        i = ctx.step.index
        if ctx.kind == "self" and ctx.layer.index in self.layer_ids and i in self.attention_steps \
                and ctx.step.total == self.inversion.steps:
            self.qk[(i, ctx.layer.index)] = tuple(t[:1].detach().to(self.storage_device, self.storage_dtype)
                                                  for t in (q, k))

    def record_feature(self, step: int, residual: torch.Tensor):
        if step in self.feature_steps:
            self.features[step] = residual[:1].detach().to(self.storage_device, self.storage_dtype)

    def feature(self, step: int, like: torch.Tensor) -> torch.Tensor:
        f = self.features.get(step)
        if f is None:
            raise named_error(f"{self.node}: no content features for step {step}. If another node set a UNet "
                              f"function wrapper after {self.node}, put {self.node} after it.")
        if tuple(f.shape[-2:]) != tuple(like.shape[-2:]):
            raise self.size_error(like.shape[-2:], f.shape[-2:], "decoder features")
        return f.to(like.device, like.dtype)

    def query_key(self, step: int, layer: AttentionLayer, like: torch.Tensor):
        qk = self.qk.get((step, layer.index))
        if qk is None:
            raise named_error(f"{self.node}: no content queries/keys for step {step}, layer {layer.index}.")
        if qk[0].shape[1:] != like.shape[1:]:
            raise self.size_error((like.shape[1],), (qk[0].shape[1],), f"self-attention tokens of layer "
                                  f"{layer.index}")
        return tuple(t.to(like.device, like.dtype) for t in qk)

    def size_error(self, got, expected, what_part: str) -> InversionChainError:
        h, w = self.inversion.latent_shape[-2:]
        return named_error(
            f"{self.node}: the latent being sampled does not match the content inversion ({what_part}: "
            f"{tuple(int(x) for x in got)} vs the content's {tuple(int(x) for x in expected)}). The content was "
            f"inverted at latent {(h, w)} (HxW); sample at that size (this node's `latent` output).")

    # -- filling -------------------------------------------------------------------------------------------
    def fill(self, recorder_model, latent_image):
        """Cache mode: one batch-1 reference pass over the needed steps with the inversion's conditioning."""
        replay_chain(patching.with_reference_pass(recorder_model, self), self.inversion, self.steps, latent_image)

    def recompute_wrapper(self, previous):
        """Recompute mode: the content forward (recording) right before each sampling call that needs it."""
        def wrapper(apply_model, args):
            options = args["c"].get("transformer_options", {})
            sigma = args["timestep"].flatten()[:1]
            i = locate(float(sigma), self.inversion.sigmas)
            if options.get(REFERENCE_PASS_KEY) is None and i in self.steps and i not in self.features \
                    and not any(key[0] == i for key in self.qk):
                self.clear()
                x = args["input"]
                x_ref = self.inversion.latent_at(i, x.device, x.dtype)[:1]
                conds = {k: (v.to(x.device) if torch.is_tensor(v) else v) for k, v in self.conds.items()}
                to = dict(options)
                to["sigmas"] = sigma
                patching.reference_call(apply_model, x_ref, sigma, conds, to, self)
            return patching.call_unet(apply_model, args, previous)
        return wrapper


class ContentAttentionEditor(Editor):
    """Self-attention of the selected layers: the content's queries and keys replace every row's own while
    ``i/N < attention_end_percent`` (the maps become the content's; values stay the row's)."""

    order = 20     # after K/V sources (10), before map editors (50) and observers (90)
    kinds = ("self",)

    def __init__(self, features: ContentFeatures, schedule: Schedule, attention_end_percent: float):
        self.features = features
        self.sched = schedule
        self.end_percent = float(attention_end_percent)

    def layers(self, all_layers):
        return self.features.layers

    def schedule(self):
        return self.sched.sigmas

    def active(self, ctx: CallContext) -> bool:
        if ctx.kind != "self" or ctx.layer.index not in self.features.layer_ids:
            return False
        return self.sched.fraction(self.sched.step(ctx.step)) < self.end_percent

    def edit_qkv(self, q, k, v, ctx):
        q_c, k_c = self.features.query_key(self.sched.step(ctx.step), ctx.layer, q)
        rows = q.shape[0]
        return q_c.expand(rows, -1, -1).contiguous(), k_c.expand(rows, -1, -1).contiguous(), v


def feature_hook(features: ContentFeatures, schedule: Schedule, feature_end_percent: float):
    """The decoder ResNet hook (``patching.add_decoder_resblock_hook``): records the content's residual during its
    reference passes, and replaces every row's residual with it inside the window."""
    end = float(feature_end_percent)

    def hook(x, out, skip, options):
        recorder = options.get(REFERENCE_PASS_KEY)
        if recorder is not None:
            if recorder is features:
                i = features.step_of(options)
                if i is not None:
                    features.record_feature(i, (out - skip()).float())
            return None     # another node's reference pass, or ours: never edited
        i = schedule.index(float(options["sigmas"].flatten()[0]))
        if schedule.fraction(i) >= end:
            return None
        residual = features.feature(i, out)
        return skip() + residual.expand(out.shape[0], -1, -1, -1)

    return hook


def install(model, features: ContentFeatures, attention_end_percent: float, feature_end_percent: float):
    """A clone of ``model`` with the attention editor and the decoder hook of ``features`` (recompute wrapper in
    recompute mode). The wrapper order matters: the hook's wrapper is outermost, so the recompute wrapper's content
    forward runs with the hook in place and records."""
    schedule = Schedule(features.inversion.sigmas, features.inversion.scheduler)
    m = patching.install(model, ContentAttentionEditor(features, schedule, attention_end_percent)) \
        if features.layers else model.clone()
    if features.mode == "recompute":
        patching.add_unet_wrapper(m, features.recompute_wrapper)
    if features.feature_steps:
        patching.add_decoder_resblock_hook(m, features.block.number, feature_hook(features, schedule,
                                                                                    feature_end_percent))
    return m


def build(model, target, inversion: Inversion, block: DecoderBlock, layers: Sequence[AttentionLayer],
          feature_end_percent: float, attention_end_percent: float, cache: str, conditioning_fingerprint: str):
    """(``target`` patched, ContentFeatures): the content features, recorded with ``model`` (the content's own forward)
    once per (inversion, conditioning, block, layers, steps) into the reference store, or recomputed per step when
    they do not fit its budget; ``target`` is the MODEL they are injected into (e.g. ``model`` with a STYLE)."""
    schedule = Schedule(inversion.sigmas, inversion.scheduler)
    features = ContentFeatures(inversion, block, layers, schedule.acting(0.0, feature_end_percent),
                               schedule.acting(0.0, attention_end_percent))
    if not features.steps:
        return target.clone(), features
    latent = torch.zeros(inversion.latent_shape)[:1]
    recorder = install(model, features, 0.0, 0.0)
    features, features.mode = cached(
        "feature_inject", model, features, conditioning_fingerprint, cache, lambda f: f.fill(recorder, latent),
        extra=(block.number, tuple(features.feature_steps), tuple(features.attention_steps)))
    if features.mode == "recompute":
        features.storage_device = model.load_device
        features.conds = patching.capture_conds(model, first_row(inversion.positive), latent)
    return install(target, features, attention_end_percent, feature_end_percent), features
