"""StyleDiffusion's assemblies: ``train_style`` (the Mapper: trained or cached values and the loss plot),
``apply_style`` (the value injection on a patched clone) and ``build_style_transfer`` (the STYLE plus a content
image's decoder features, Plug-and-Play style). The three StyleDiffusion nodes call these."""
from __future__ import annotations

import torch

from .. import compat, conditioning
from ..artifacts import InversionChainError, node_name
from ..attention.core import patching
from ..attention.core.layers import enumerate_decoder_blocks, feature_block_default, select_layers
from ..attention.core.schedule import Schedule, check_percents
from ..attention.editors import feature_inject
from ..attention.editors.style import joint_attention_has_no_value_input, value_injection
from ..logs import log
from ..model_info import check_supported, model_key, require_inversion, unet_of
from ..optimize import style_diffusion
from ..plots import loss_curve
from ..samplers.inversion import chain_latent_out


def refuse_dit(model):
    """StyleDiffusion's place (the value input of cross-attention, separate from the keys) does not exist in a
    rectified-flow DiT's joint attention: refuse by the family, saying why (model_info's check stays generic)."""
    if getattr(model, "model", None) is not None and compat.is_flow_family(compat.model_sampling(model)):
        raise InversionChainError(joint_attention_has_no_value_input(compat.family_name(model)))


def train_style(model, clip_vision, image, inversion, positive, negative, cfg: float = 7.5, inner_steps: int = 100,
                learning_rate: float = 1e-2, attention_loss_weight: float = 1.0):
    """(the STYLE, trained or from the cache, and its loss curve as an IMAGE)."""
    refuse_dit(model)
    check_supported(model)
    style = style_diffusion.train(model, clip_vision, image, inversion, positive, negative, cfg, inner_steps,
                                  learning_rate, attention_loss_weight)
    log.info("[Inversion Chain] %s", style.summary())
    title = (f"StyleDiffusion loss: {style.steps} steps, {int(style.inner_iters.sum())} iterations"
             f"{' (cached)' if style.from_cache else ''}")
    return style, loss_curve(style.losses, title)


def apply_style(model, style, style_end_percent: float = 1.0):
    """(a patched clone whose conditional cross-attention values come from the STYLE, the STYLE's sigmas)."""
    refuse_dit(model)
    check_supported(model)
    check_percents(style_end_percent=style_end_percent)
    style.check(model_key(model), None)
    schedule = Schedule(style.sigmas, style.scheduler)
    patched = patching.add_attn2_patch(model.clone(), value_injection(style.values, schedule, style_end_percent))
    return patched, style.sigmas.clone()


def build_style_transfer(model, style, content_inversion, feature_end_percent: float = 0.8,
                         attention_end_percent: float = 0.5, style_end_percent: float = 1.0, feature_block: int = -1,
                         attention_start_layer: int = -1, cache: str = "auto"):
    """(patched model, positive, negative, LATENT of the content's x_T, sigmas): the STYLE's value input and the
    content's decoder features and self-attention maps injected along its chain."""
    refuse_dit(model)
    inv = require_inversion(model, content_inversion)
    style.check(model_key(model), None)
    check_percents(feature_end_percent=feature_end_percent,
                   attention_end_percent=attention_end_percent, style_end_percent=style_end_percent)
    if inv.latent_shape[0] != 1:
        raise InversionChainError(f"`content_inversion` holds {inv.latent_shape[0]} images; "
                                  f"invert one content image.")
    if inv.sigmas.shape != style.sigmas.shape or not torch.allclose(inv.sigmas, style.sigmas, rtol=1e-4,
                                                                    atol=1e-5):
        raise InversionChainError(
            f"the content inversion has {inv.steps} steps ({inv.scheduler}) but the STYLE was "
            f"trained on {style.steps} steps ({style.scheduler}); invert the content with the same steps and "
            f"scheduler as the style image.")
    blocks = enumerate_decoder_blocks(unet_of(model))
    if feature_block == -1:
        feature_block = feature_block_default(blocks)
    if not 0 <= feature_block < len(blocks):
        raise InversionChainError(f"feature_block {feature_block} is beyond this model's "
                                  f"{len(blocks)} decoder blocks (valid: 0..{len(blocks) - 1}, or -1 for the "
                                  f"family default).")
    layers = patching.layers_of(model)
    if attention_start_layer == -1:
        later = [l for l in layers if l.part == "up" and l.key[1] >= feature_block]
        attention_start_layer = later[0].index if later else len(layers)
    elif not 0 <= attention_start_layer < len(layers):
        raise InversionChainError(f"attention_start_layer {attention_start_layer} is beyond "
                                  f"this model's {len(layers)} self-attention layers (valid: 0..{len(layers) - 1}, "
                                  f"or -1 for the family default).")
    styled = patching.add_attn2_patch(model.clone(), value_injection(
        style.values, Schedule(style.sigmas, style.scheduler), style_end_percent))
    patched, features = feature_inject.build(
        model, styled, inv, blocks[feature_block], select_layers(layers, start=attention_start_layer),
        feature_end_percent, attention_end_percent, cache, conditioning.fingerprint(inv.positive))
    log.info("[Inversion Chain] %s: features of decoder block %d at %d steps, self-attention maps of %d layers "
             "(from %d) at %d steps: %s", node_name(), feature_block, len(features.feature_steps),
             len(features.layers), attention_start_layer, len(features.attention_steps),
             f"{features.nbytes() / 2 ** 20:.1f} MB cached on {features.storage_device}"
             if features.mode == "cache" else f"recomputed every step {features.budget_message}".strip())
    latent = {"samples": chain_latent_out(model, inv, 0)}
    return patched, style.positive, style.negative, latent, inv.sigmas.clone()
