"""SD3 / SD3.5 (ComfyUI's MMDiT) addressed like Flux's joint attention, so the DiT editors run on it unchanged.

ComfyUI's MMDiT reads no ``attn1_patch`` and names no block in ``transformer_options``. It does two things a pack can
use without replacing its code: it runs joint block ``i`` through the ``("dit", "double_block", i)`` replace patch
when one is set, and it passes ``transformer_options`` to the joint attention call, where ComfyUI's ``wrap_attn``
hands q, k, v to ``transformer_options["optimized_attention_override"]``. The bridge sets both:
- a replace patch per joint block that names it as Flux's blocks are named (``block_type`` "double",
  ``block_index`` i) and records where the image tokens sit in the joint sequence ``[text ; image]``
  (``img_slice``), then runs the block (or a replace patch another pack set before);
- an override that gives the joint attention's q, k, v, as ``[batch, heads, tokens, head_dim]``, to the
  ``attn1_patch`` list with those ``extra_options``, as Flux's blocks do, then runs the attention (or the override
  set before) on what the patches return.

SD3 adds its positions to the image tokens at the input (no RoPE), so the patches get ``pe=None``. The second,
image-only attention of SD3.5 Medium's first blocks (MMDiT-X) is not a joint attention and is left alone.
"""
from __future__ import annotations

from ... import compat

MMDIT_CLASSES = {("comfy.ldm.modules.diffusionmodules.mmdit", "OpenAISignatureMMDITWrapper")}


class BlockNamer(compat.PatchObject):
    """``("dit", "double_block", i)`` replace patch: the block's name and image slice, for the attention call."""

    def __init__(self, index: int, previous=None):
        self.index, self.previous = int(index), previous

    def __call__(self, args, extra):
        to = dict(args.get("transformer_options") or {})
        text, image = int(args["txt"].shape[1]), int(args["img"].shape[1])
        to.update(block_type="double", block_index=self.index, img_slice=[text, text + image])
        args = dict(args, transformer_options=to)
        if self.previous is not None:
            return self.previous(args, extra)
        return extra["original_block"](args)


class JointAttentionBridge(compat.PatchObject):
    """``optimized_attention_override``: the ``attn1_patch`` list inside each named joint attention call."""

    def __init__(self, inner=None):
        self.inner = inner

    def _hand_on(self, func, args, kwargs):
        if self.inner is not None:
            return self.inner(func, *args, **kwargs)
        return func(*args, **kwargs)

    def __call__(self, func, *args, **kwargs):
        to = kwargs.get("transformer_options") or {}
        patches = to.get("patches", {}).get("attn1_patch")
        where = to.get("img_slice")
        q = args[0]
        if not patches or where is None or kwargs.get("skip_reshape") or q.dim() != 3 or q.shape[1] != where[1]:
            return self._hand_on(func, args, kwargs)   # not a named joint attention (MMDiT-X's image-only one)
        rest = list(args[3:])
        heads = int(rest.pop(0) if rest else kwargs.pop("heads"))
        b = q.shape[0]
        # q, k arrive as [batch, tokens, heads * head_dim], v as [batch, tokens, heads, head_dim] (mmdit.py's split)
        q, k, v = (t.reshape(b, t.shape[1], heads, -1).transpose(1, 2) for t in args[:3])
        pe, mask = None, kwargs.get("mask")
        extra = dict(to)
        for patch in patches:
            out = patch(q, k, v, pe=pe, attn_mask=mask, extra_options=extra)
            q, k, v = out.get("q", q), out.get("k", k), out.get("v", v)
            pe, mask = out.get("pe", pe), out.get("attn_mask", mask)
        kwargs = dict(kwargs, heads=heads, mask=mask, skip_reshape=True)
        return self._hand_on(func, (q, k, v, *rest), kwargs)


def is_mmdit(model_patcher) -> bool:
    base = getattr(model_patcher, "model", None)
    dm = getattr(base, "diffusion_model", None)
    return dm is not None and (type(dm).__module__, type(dm).__name__) in MMDIT_CLASSES and hasattr(dm, "joint_blocks")


def has_hooks(model_patcher) -> bool:
    """Whether this ComfyUI's MMDiT offers both hooks: the replace patch per joint block and the attention override
    (transformer_options handed to its joint attention)."""
    import inspect
    import sys
    if not compat.has_feature("attention-override"):
        return False
    module = sys.modules.get("comfy.ldm.modules.diffusionmodules.mmdit")
    try:
        source = inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):
        return False
    return '"double_block"' in source and "transformer_options=transformer_options" in source


def install(model_patcher):
    """Add the bridge to ``model_patcher`` (in place: call on a clone); once per MODEL, keeping any override or
    block replace patch set before it."""
    to = dict(model_patcher.model_options.get("transformer_options", {}))
    current = to.get("optimized_attention_override")
    if isinstance(current, JointAttentionBridge):
        return model_patcher
    to["optimized_attention_override"] = JointAttentionBridge(current)
    replace = {name: dict(entries) for name, entries in to.get("patches_replace", {}).items()}
    dit = replace.setdefault("dit", {})
    blocks = model_patcher.model.diffusion_model.joint_blocks
    for i in range(len(blocks)):
        dit[("double_block", i)] = BlockNamer(i, dit.get(("double_block", i)))
    to["patches_replace"] = replace
    model_patcher.model_options["transformer_options"] = to
    return model_patcher
