"""KV Inject (MasaCtrl's mutual self-attention from a real image): the checks, the reference K/V (cached in the one
store, or recomputed per step) and the patched MODEL the KV Inject node returns."""
from __future__ import annotations

import torch

from .. import compat, conditioning
from ..artifacts import InversionChainError, named_error, node_name, user_text
from ..attention.core import dit_layers, mmdit_bridge, patching
from ..attention.core.layers import MAP_SIZE_AUTO, decoder_start, map_level, map_size_problem, select_layers
from ..attention.core.schedule import check_percents, steps_within
from ..attention.core.tokens import locate_words, parse_words
from ..attention.editors.dit_kv_inject import DIT_MODES, DiTKVInject
from ..attention.editors.kv_inject import MODES, KVInjectEditor, TargetMapObserver, negative_check
from ..attention.store.dit_reference import DiTRecorder, DiTReferenceKV, compute_dtype, image_tokens
from ..attention.store import reference as reference_store
from ..attention.store.partial_reference import cached_steps
from ..attention.store.reference import ReferenceKV
from ..logs import log
from ..model_info import require_inversion



def build_kv_inject(model, inversion, start_percent: float, start_layer: int, mode: str, negative=None,
                    mask_words: str = "", clip=None, source_prompt: str = "", cache: str = "auto",
                    target_prompt: str = "", target_words: str = "", mask_map_size: str = MAP_SIZE_AUTO):
    """A ``model.clone()`` whose self-attention takes the source's K/V from ``start_percent`` on (layers >=
    ``start_layer``; -1 = the family's default decoder layer); masked mode reads its masks from the cross-attention
    maps at ``mask_map_size``. DiTs whose joint attention calls ``attn1_patch`` (Flux, Chroma, Qwen-Image):
    ``build_dit``."""
    if dit_layers.is_joint_attention_dit(model):
        return build_dit(model, inversion, start_percent, start_layer, mode, negative=negative, cache=cache)
    require_inversion(model, inversion)
    if mode not in MODES:
        raise InversionChainError(f"unknown mode '{user_text(mode)}'; use one of {', '.join(MODES)}.")
    layers = patching.layers_of(model)
    if start_layer == -1:
        start_layer = decoder_start(layers)
    if not 0 <= start_layer < len(layers):
        raise InversionChainError(f"start_layer {start_layer} is beyond this model's {len(layers)} "
                                  f"self-attention layers (valid: 0..{len(layers) - 1}, or -1 for the family "
                                  f"default).")
    check_percents(start_percent=start_percent)
    if not steps_within(inversion.steps, start_percent):  # no step would inject: say so, not a silent no-op
        raise InversionChainError(f"start_percent {start_percent:g} leaves none of the inversion's "
                                  f"{inversion.steps} steps, so nothing would be injected; use a value below "
                                  f"{(inversion.steps - 1) / inversion.steps:g} (MasaCtrl: 0.08 = step 4 of 50).")
    selected = select_layers(layers, start=start_layer)
    cross_tokens, cross_level, target_tokens = None, 2, []
    if mode == "masked":
        words = parse_words(mask_words)
        if not words or clip is None or not source_prompt.strip() or not target_prompt.strip():
            raise InversionChainError("masked mode needs `mask_words`, `clip`, `source_prompt` (the "
                                      "prompt the inversion was made with) and `target_prompt` (the sampler's "
                                      "positive prompt: the target's mask comes from its own cross-attention).")
        found = locate_words(clip, source_prompt, words, "`mask_words`")
        cross_tokens = sorted({i for ids in found.values() for i in ids})
        cross_level = map_level(layers, mask_map_size)
        if cross_level is None:
            raise InversionChainError(f"{map_size_problem(layers, 'mask_map_size', user_text(mask_map_size))}")
        found = locate_words(clip, target_prompt, parse_words(target_words) or words,
                             "`target_words`" if parse_words(target_words) else
                             "`mask_words` (in `target_prompt`; set `target_words` for the target's "
                             "name of the object)")
        target_tokens = sorted({i for ids in found.values() for i in ids})
    branches = 1 if negative is None else 2
    reference = ReferenceKV(inversion, selected, steps_within(inversion.steps, start_percent),
                            cross_tokens=cross_tokens, cross_level=cross_level, branches=branches)
    latent = torch.zeros(inversion.latent_shape)
    positive = conditioning.first_row(inversion.positive)
    negative = None if negative is None else conditioning.first_row(negative)
    # the store owns the cache (keyed by inversion, its conditioning, the negative, layers, steps and mask
    # words): a second node or run with the same inputs reuses it; it is filled through a model patched with a
    # recorder only (start_percent 2: never active, it only records)
    recorder = patching.install(model, KVInjectEditor(reference, selected, 2.0, mode))
    key = conditioning.fingerprint(positive) + ("" if negative is None else conditioning.fingerprint(negative))
    # "partial": the first steps cached, the others recomputed next to their sampling calls
    reference, reference.mode = cached_steps(
        "kv_inject", model, reference, key, cache, lambda ref: ref.fill(recorder, latent, negative=negative),
        positive, negative, extra=(tuple(cross_tokens or ()), cross_level))
    editor = KVInjectEditor(reference, selected, start_percent, mode, target_tokens=target_tokens)
    patched = patching.install(model, editor)
    if mode == "masked":
        patched = patching.install(patched, TargetMapObserver(editor))
    return serve_reference(patched, model, reference, reference.mode, positive, negative, latent,
                           f"{len(selected)} layers x {branches} CFG branch(es)")


def build_dit(model, inversion, start_percent: float, start_layer: int, mode: str, negative=None, cache: str = "auto"):
    """KV Inject on a DiT with joint attention (Flux, Chroma, Qwen-Image): ``start_layer`` -1 = the family default
    (Stable Flow's vital layers; on Qwen-Image its middle band), n >= 0 = every block at position >= n (double blocks
    first, then single blocks; dit_layers.py)."""
    require_inversion(model, inversion, allow_flow=True)
    missing = compat.missing_feature_message("dit-attention-patches", node_name())
    if missing:
        raise named_error(missing)   # "<node> needs ...": the name is the sentence's subject
    family = compat.family_name(model)
    if not dit_layers.calls_attn1_patch(model):
        # SD3 / SD3.5 reach the patches through the attention override (attention/core/mmdit_bridge.py)
        feature = "attention-override" if mmdit_bridge.is_mmdit(model) else "dit-attention-patches"
        raise InversionChainError(
            f"this ComfyUI's {family} attention calls no attn1_patch, so nothing could be injected; update "
            f"ComfyUI (the hook it needs exists from {compat.FEATURES[feature][0]} on).")
    if mode not in MODES:
        raise InversionChainError(f"unknown mode '{user_text(mode)}'; use one of {', '.join(MODES)}.")
    if mode not in DIT_MODES:
        raise InversionChainError(
            f"mode '{user_text(mode)}' is not available on {family} yet; use mutual (the source's image-token "
            f"K/V replace the target's, Stable Flow's injection) or union (appended to the joint sequence). masked "
            f"needs masks from the image-to-text maps of joint attention, which are not wired to it yet.")
    blocks = dit_layers.enumerate_blocks(model)
    doubles, singles = dit_layers.depths(blocks)
    if not (start_layer == -1 or 0 <= start_layer < len(blocks)):
        where = (f"0..{doubles - 1} the double blocks, {doubles}..{len(blocks) - 1} the single blocks" if singles else
                 f"0..{len(blocks) - 1} its joint (double-stream) blocks")
        default = ("Stable Flow's vital layers" if singles else
                   "the middle band of blocks (15..44 of Qwen-Image's 60, the same relative band on other depths)")
        raise InversionChainError(
            f"start_layer {start_layer} is outside this {family} model's {len(blocks)} blocks; on DiT models "
            f"start_layer is a block position: {where} (valid: 0..{len(blocks) - 1}), or -1 for {default}.")
    check_percents(start_percent=start_percent)
    steps = steps_within(inversion.steps, start_percent)
    if not steps:
        raise InversionChainError(f"start_percent {start_percent:g} leaves none of the inversion's "
                                  f"{inversion.steps} steps, so nothing would be injected; use a value below "
                                  f"{(inversion.steps - 1) / inversion.steps:g} (Stable Flow injects from the first "
                                  f"step: 0).")
    return patch_dit(model, inversion, dit_layers.select_blocks(blocks, start_layer), steps, negative, cache, mode)


def patch_dit(model, inversion, blocks, steps, negative=None, cache: str = "auto", mode: str = "mutual"):
    """A ``model.clone()`` whose ``blocks`` take the source's image-token K/V at chain ``steps`` (cached in the one
    reference store, or recomputed next to each sampling call)."""
    branches = 1 if negative is None else 2
    tokens = image_tokens(model, inversion.latent_shape)
    reference = DiTReferenceKV(inversion, blocks, steps, tokens, compute_dtype(model), branches,
                               repeat_text=compat.text_batches_by_repeat(model))
    latent = torch.zeros(inversion.latent_shape)
    positive = conditioning.first_row(inversion.positive)
    negative = None if negative is None else conditioning.first_row(negative)
    key = conditioning.fingerprint(positive) + ("" if negative is None else conditioning.fingerprint(negative))
    # "partial": the first steps that fit the store's budget cached, the others recomputed next to their calls
    if reference.estimate_bytes() == 0:   # no block or no step chosen: nothing to record, the patch never acts
        serving = "cache"
    else:
        reference, serving = cached_steps(
            "dit_kv_inject", model, reference, key, cache, lambda ref: ref.fill(model, latent, negative=negative),
            positive, negative, extra=(tuple(b.key for b in blocks),))
    patched = patching.add_attn1_patch(model.clone(), DiTRecorder())
    patching.add_attn1_patch(patched, DiTKVInject(reference, blocks, steps, tokens, mode,
                                                  text_mask=dit_layers.is_qwen_image(model)))
    return serve_reference(patched, model, reference, serving, positive, negative, latent,
                           f"{len(blocks)} blocks x {branches} CFG half(s)")


def serve_reference(patched, model, reference, mode: str, positive, negative, latent, what_is_held: str):
    """The shared tail of both paths: the negative check, then the reference served from the store (``cache``),
    partly from it (``partial``) or recomputed next to every sampling call (``recompute``)."""
    if negative is not None:
        patching.add_unet_wrapper(patched, negative_check(negative[0][0]))
    if mode == "partial":
        reference.install(patched)
    elif mode == "cache":
        log.info(f"[Inversion Chain] {node_name()}: source K/V for {len(reference.steps)} steps x {what_is_held}: "
                 f"{reference.nbytes() / 2 ** 20:.1f} MB on {reference.storage_device} (cache holds "
                 f"{reference_store.STORE.held_bytes() / 2 ** 20:.1f} MB in {len(reference_store.STORE.entries)} "
                 f"entries)")
    else:
        reference.mode = "recompute"
        reference.storage_device = model.load_device
        reference.conds = patching.capture_conds(model, positive, latent[:1])
        if negative is not None:
            reference.conds_uncond = patching.capture_conds(model, negative, latent[:1])
        patching.add_unet_wrapper(patched, reference.recompute_wrapper)
        log.info(f"[Inversion Chain] {node_name()}: recomputing the source's K/V next to every sampling step"
                 f"{' (' + reference.budget_message + ')' if getattr(reference, 'budget_message', '') else ''}")
    return patched
