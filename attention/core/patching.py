"""The only module that touches ComfyUI's patch API (attention replace patches, the UNet function wrapper).

``install(model, editor)`` returns a patched ``model.clone()``: the original MODEL is never modified, so nothing
is left behind after a run. One ``AttentionPatch`` per (attn1|attn2, layer) looks up the model's Controller at
call time; an entry another pack already put in the same ``patches_replace`` slot is wrapped (called as the
fallback), never overwritten.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ... import compat
from ...model_info import check_supported, unet_of
from . import mmdit_bridge
from .controller import CONTROLLER_KEY, REFERENCE_PASS_KEY, Controller, Editor
from .layers import enumerate_layers

_KIND_SLOT = {"self": "attn1", "cross": "attn2"}


class AttentionPatch(compat.PatchObject):
    """attn1/attn2 replace patch: hands the call to the Controller found in extra_options."""

    def __init__(self, kind: str, previous: Optional[Callable] = None):
        self.kind = kind
        self.previous = previous

    def __call__(self, q, k, v, extra_options):
        def fallback(q_, k_, v_):
            if self.previous is not None:
                return self.previous(q_, k_, v_, extra_options)
            return compat.attention(q_, k_, v_, extra_options)

        controller = extra_options.get(CONTROLLER_KEY)
        if controller is None:
            return fallback(q, k, v)
        return controller(self.kind, q, k, v, extra_options, fallback)


def controller_of(model) -> Optional[Controller]:
    return model.model_options.get("transformer_options", {}).get(CONTROLLER_KEY)


def layers_of(model):
    controller = controller_of(model)
    return controller.layers if controller is not None else enumerate_layers(unet_of(model))


def install(model, editor: Editor):
    """A clone of ``model`` whose Controller also runs ``editor``; patches only where the editor may act."""
    check_supported(model)
    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    old = to.get(CONTROLLER_KEY)
    controller = (old or Controller(enumerate_layers(unet_of(m)), compat.model_sampling(m))).with_editor(editor)
    # copy-on-write: the dicts may still be shared with the original MODEL in some ComfyUI versions
    to = dict(to)
    to[CONTROLLER_KEY] = controller
    replace = {slot: dict(entries) for slot, entries in to.get("patches_replace", {}).items()}
    for layer in editor.layers(controller.layers):
        for kind in editor.kinds:
            slot = replace.setdefault(_KIND_SLOT[kind], {})
            current = slot.get(layer.key)
            if isinstance(current, AttentionPatch):
                continue
            slot[layer.key] = AttentionPatch(kind, previous=current)
    to["patches_replace"] = replace
    m.model_options["transformer_options"] = to
    return m


class SelfAttentionInputs(compat.PatchObject):
    """attn1_patch (ComfyUI calls it with the block's normalised hidden states ``n`` and the inputs of to_k / to_v,
    before any projection, on both trees): during a reference pass, hands those inputs to the recorder so that it
    can keep one tensor per token instead of K and V. Returns its inputs unchanged."""

    def __call__(self, n, context_attn1, value_attn1, extra_options):
        recorder = extra_options.get(REFERENCE_PASS_KEY)
        controller = extra_options.get(CONTROLLER_KEY)
        if recorder is not None and controller is not None and hasattr(recorder, "record_inputs"):
            ctx = controller.context("self", n, extra_options)
            if ctx is not None:
                recorder.record_inputs(ctx, context_attn1, value_attn1)
        return n, context_attn1, value_attn1


def with_reference_pass(model, recorder, inputs: bool = False):
    """A clone whose attention calls record into ``recorder`` instead of editing (see reference.py); with
    ``inputs`` its self-attention inputs (before the K/V projections) are handed to ``recorder.record_inputs``."""
    m = model.clone()
    to = dict(m.model_options.get("transformer_options", {}))
    to[REFERENCE_PASS_KEY] = recorder
    if inputs:
        patches = {name: list(entries) for name, entries in to.get("patches", {}).items()}
        patches["attn1_patch"] = patches.get("attn1_patch", []) + [SelfAttentionInputs()]  # last: what to_k reads
        to["patches"] = patches
    m.model_options["transformer_options"] = to
    return m


def self_attention_projections(model, layers):
    """layer index -> the layer's attn1 module (its to_k / to_v project stored inputs exactly as the UNet does)."""
    from .layers import self_attention_of
    unet = unet_of(model)
    return {layer.index: self_attention_of(unet, layer) for layer in layers}


def add_unet_wrapper(model, wrapper_factory):
    """Install a UNet function wrapper on ``model`` (in place: call on a fresh clone), chaining any existing one.

    ``wrapper_factory(previous)`` returns ``wrapper(apply_model, args)``; ``previous`` may be None."""
    previous = model.model_options.get("model_function_wrapper")
    model.set_model_unet_function_wrapper(wrapper_factory(previous))
    return model


def call_unet(apply_model, args, previous):
    if previous is not None:
        return previous(apply_model, args)
    c = args["c"]
    return apply_model(args["input"], args["timestep"], **c)


def reference_call(apply_model, x, timestep, conds, transformer_options, recorder, branch=0):
    """One UNet forward of a reference latent whose attention calls record into ``recorder`` as CFG ``branch``
    (0 conditional, 1 unconditional), or a batch of one row per branch when ``branch`` is a list."""
    to = dict(transformer_options)
    to[REFERENCE_PASS_KEY] = recorder
    to["cond_or_uncond"] = list(branch) if isinstance(branch, (list, tuple)) else [branch]
    c = dict(conds)
    c["transformer_options"] = to
    return apply_model(x, timestep, **c)


def stack_conds(conds_per_row, repeat_text: bool = True):
    """Model-ready conds of one row each (as ``capture_conds`` returns them) as one batch, row by row, the way
    ComfyUI batches a cond with an uncond (text contexts of different lengths repeated to a common multiple); None
    when they cannot share a batch (other keys, shapes or non-tensor values, or texts whose common multiple is more
    than 4 times the shorter, which ComfyUI does not batch either; ``repeat_text`` False: texts of other lengths at
    all, as ComfyUI on Qwen-Image, ``compat.text_batches_by_repeat``)."""
    first = conds_per_row[0]
    if any(set(c) != set(first) for c in conds_per_row):
        return None
    out = {}
    for key, value in first.items():
        values = [c[key] for c in conds_per_row]
        if not torch.is_tensor(value):
            if any(v != value for v in values):
                return None
            out[key] = value
            continue
        if key == "c_crossattn" and repeat_text and all(v.ndim == 3 for v in values):
            tokens = math.lcm(*(int(v.shape[1]) for v in values))
            if tokens // min(int(v.shape[1]) for v in values) > 4:   # ComfyUI's CONDCrossAttn.can_concat limit
                return None
            values = [v.repeat(1, tokens // v.shape[1], 1) for v in values]
        if any(v.shape != values[0].shape or v.shape[0] != 1 for v in values):
            return None
        out[key] = torch.cat(values)
    return out


def capture_conds(model, positive, latent_image):
    """The model-ready conditioning tensors (c_crossattn, y, ...) ComfyUI builds from ``positive``: one call through
    the stock sampling path with cfg 1, stopped at the UNet wrapper (the UNet itself does not run)."""
    captured = {}
    m = model.clone()

    def factory(previous):
        def wrapper(apply_model, args):
            if "c" not in captured:
                captured["c"] = {k: v for k, v in args["c"].items() if k not in ("transformer_options", "control")}
            return torch.zeros_like(args["input"])   # the conds are all this call is for: no UNet forward
        return wrapper

    add_unet_wrapper(m, factory)
    sigma_max = float(compat.model_sampling(m).sigma_max)

    def one_call(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        model_k(x, x.new_ones([x.shape[0]]) * sigma_max, **(extra_args or {}))
        return x

    compat.sample_with_function(m, one_call, torch.tensor([sigma_max, 0.0]), positive, positive, 1.0, latent_image)
    return captured["c"]


def add_post_cfg_function(model, fn):
    """Append ``fn(args) -> denoised`` to the post-CFG list (in place: call on a clone). ``args`` has
    ``denoised``, ``cond_denoised``, ``uncond_denoised``, ``input``, ``sigma`` (x0 predictions, both trees)."""
    model.set_model_sampler_post_cfg_function(fn)
    return model


def add_attn2_patch(model, patch):
    """Add a cross-attention pre-projection patch ``patch(n, context, value, extra_options) -> (n, context, value)``
    (in place: call on a clone). Stacks with other packs' attn2 patches; the patch lists are copied, never shared
    with the MODEL this one was cloned from."""
    to = dict(model.model_options.get("transformer_options", {}))
    patches = {name: list(entries) for name, entries in to.get("patches", {}).items()}
    patches["attn2_patch"] = patches.get("attn2_patch", []) + [patch]
    to["patches"] = patches
    model.model_options["transformer_options"] = to
    return model


def add_attn1_patch(model, patch):
    """Add an ``attn1_patch`` (in place: call on a clone). On Flux-layout DiTs ComfyUI calls it in every double and
    single block as ``patch(q, k, v, pe=, attn_mask=, extra_options=) -> dict`` (q, k before RoPE); the patch lists
    are copied, never shared with the MODEL this one was cloned from. Patches with ``runs_last`` (observers such as
    the attention capture) stay after the others whenever they were added, so they see what every editor hands on."""
    to = dict(model.model_options.get("transformer_options", {}))
    patches = {name: list(entries) for name, entries in to.get("patches", {}).items()}
    entries = patches.get("attn1_patch", []) + [patch]
    patches["attn1_patch"] = ([p for p in entries if not getattr(p, "runs_last", False)]
                              + [p for p in entries if getattr(p, "runs_last", False)])
    to["patches"] = patches
    model.model_options["transformer_options"] = to
    if mmdit_bridge.is_mmdit(model):   # SD3 / SD3.5: their joint attention calls attn1_patch through the bridge
        mmdit_bridge.install(model)
    return model


def add_decoder_resblock_hook(model, block: int, hook):
    """Let ``hook(x, out, skip, transformer_options) -> out | None`` see (and replace) the output of the ResNet block
    of decoder block ``block`` in every UNet forward of ``model`` (in place: call on a clone). ``skip()`` is the
    block's skip path of ``x`` (so ``out - skip()`` is its residual branch); ``transformer_options`` are those of
    the forward running (a sampling call or a reference pass inside it). ComfyUI has no patch point inside a ResNet
    block in either tree, so a UNet function wrapper registers torch hooks for the duration of each call only: the
    MODEL this was cloned from, and every other clone, never see them."""
    unet = unet_of(model)
    resblock_cls = compat.resblock_class()
    module = next((m for m in unet.output_blocks[block] if isinstance(m, resblock_cls)), None)
    if module is None:
        raise ValueError(f"decoder block {block} has no ResNet block")

    def factory(previous):
        def wrapper(apply_model, args):
            current = {}

            def pre(_module, _args, kwargs):
                current["options"] = kwargs.get("transformer_options") or {}

            def post(mod, inputs, out):
                x = inputs[0]
                return hook(x, out, lambda: mod.skip_connection(x), current.get("options", {}))

            handles = [unet.register_forward_pre_hook(pre, with_kwargs=True), module.register_forward_hook(post)]
            try:
                return call_unet(apply_model, args, previous)
            finally:
                for handle in handles:
                    handle.remove()
        return wrapper

    return add_unet_wrapper(model, factory)
