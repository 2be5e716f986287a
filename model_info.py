"""What kind of model a MODEL is, and whether sigma-space DDIM applies to it."""
from __future__ import annotations

from . import compat
from .artifacts import InversionChainError, ModelKey, digest, feed, tensor_digest

# Rectified-flow families (supported-model config classes, subclasses included) that sample with true CFG: a real
# unconditional branch whose context null-text / negative-prompt inversion can act on.
TRUE_CFG_FLOW = ("Chroma", "QwenImage", "SD3")
TRUE_CFG_FLOW_NAMES = "Chroma, Qwen-Image, SD3.5"


SUPPORTED = "UNet diffusion models with eps or v prediction (SD1.x, SD2.x, SDXL and their fine-tunes)"


def unet_of(model_patcher):
    return compat.unet_of(model_patcher)


def check_supported(model_patcher, allow_flow: bool = False):
    """Raise a clear error for model families this pack cannot invert or edit. ``allow_flow``: the caller (DDIM
    Invert) also runs on rectified-flow models (CONST sampling: Flux, Chroma, ...), where ComfyUI's Euler/ddim step
    has the same sigma-space form."""
    base = getattr(model_patcher, "model", None)
    if base is None or not hasattr(model_patcher, "clone"):
        raise InversionChainError(f"expected a MODEL (from a checkpoint loader), got "
                                  f"{type(model_patcher).__name__}.")
    family = compat.family_name(model_patcher)
    sampling = compat.model_sampling(model_patcher)
    if compat.is_flow_family(sampling):
        if allow_flow:
            return
        raise InversionChainError(
            f"the model family '{family}' (a rectified-flow / DiT model) is not supported yet by this node; "
            f"so far DDIM Invert runs on every rectified-flow family, KV Inject and RIVAL on Flux, Chroma, "
            f"Qwen-Image and SD3.5, P2Plus on Flux, Chroma and Qwen-Image, Attention Capture on Flux, "
            f"Chroma, Qwen-Image and SD3.5, Null-Text Inversion (sampled through Null-Text Conditioning) on "
            f"{TRUE_CFG_FLOW_NAMES}. Supported here: {SUPPORTED}.")
    if unet_of(model_patcher) is None:
        raise InversionChainError(
            f"the model family '{family}' is not supported yet. Supported: {SUPPORTED}.")
    if not compat.is_eps_family(sampling):
        raise InversionChainError(
            f"the model '{family}' uses {prediction_name(sampling)} sampling, where DDIM in sigma space does "
            f"not apply. Supported: {SUPPORTED}.")


def prediction_name(sampling) -> str:
    return compat.prediction_name(sampling)


def reads_pooled_output(model_patcher) -> bool:
    """Whether the model has a vector (ADM) input, through which the pooled text output conditions it (SDXL,
    unCLIP); SD1.x/SD2.x UNets ignore the pooled output. Same attribute in both trees."""
    return int(getattr(getattr(model_patcher, "model", None), "adm_channels", 0) or 0) > 0


def model_key(model_patcher) -> ModelKey:
    net = compat.diffusion_model_of(model_patcher)
    params = list(net.parameters())
    fingerprint = tuple(round(float(p.detach().float().sum()), 3) for p in (params[0], params[-1]))
    unet = unet_of(model_patcher)
    if unet is not None:
        channels = int(unet.model_channels)
        context_dim = int(getattr(unet, "context_dim", 0) or _context_dim(unet))
    else:  # DiT families (flow models): their width and text-input width
        dit_params = getattr(net, "params", None)
        channels = int(getattr(net, "hidden_size", 0) or getattr(dit_params, "hidden_size", 0)
                       or getattr(net, "inner_dim", 0) or 0)   # Flux/Chroma: params; SD3: hidden_size; Qwen: inner_dim
        text_in = getattr(net, "txt_in", None) or getattr(net, "context_embedder", None)   # Qwen-Image / SD3
        context_dim = int(getattr(dit_params, "context_in_dim", 0) or getattr(text_in, "in_features", 0) or 0)
    return ModelKey(model_class=type(model_patcher.model.model_config).__name__,
                    prediction=prediction_name(compat.model_sampling(model_patcher)),
                    channels=channels, context_dim=context_dim, weight_fingerprint=fingerprint)


WEIGHTS_MEMO = "_inversion_chain_weights"


def weights_digest(model_patcher) -> str:
    """Content hash of the base model's weights as loaded (before any patch), computed once per loaded model and
    remembered on it: every clone and patched variant of one checkpoint shares it."""
    import hashlib
    base = model_patcher.model
    memo = base.__dict__.get(WEIGHTS_MEMO)
    if memo is not None:
        return memo
    h = hashlib.sha256()
    for name, t in compat.unpatched_weights(model_patcher):
        feed(h, name)
        feed(h, tensor_digest(t))
    base.__dict__[WEIGHTS_MEMO] = memo = h.hexdigest()
    return memo


def model_identity(model_patcher) -> str:
    """What a MODEL computes, as a cache key: its class, the content hash of its weights, every weight patch with its
    strengths and data (a LoRA at another strength is another model), the object patches and the model_options
    (attention patches, wrappers, CFG functions of other nodes)."""
    return digest("model", type(model_patcher.model).__qualname__, weights_digest(model_patcher),
                  compat.weight_patches(model_patcher), compat.object_patches(model_patcher),
                  getattr(model_patcher, "model_options", {}))


def _context_dim(unet) -> int:
    for name, module in unet.named_modules():
        if name.endswith("attn2.to_k"):
            return int(module.weight.shape[1])
    return 0


def require_inversion(model_patcher, inversion, allow_flow: bool = False):
    """The one check every consumer of an INVERSION makes: it came from DDIM Invert, with this model (``allow_flow``:
    the caller also runs on rectified-flow models, see ``check_supported``)."""
    from .artifacts import Inversion
    check_supported(model_patcher, allow_flow=allow_flow)
    if not isinstance(inversion, Inversion):
        raise InversionChainError("`inversion` must come from DDIM Invert.")
    inversion.check_matches(model_key(model_patcher))
    return inversion


def _config_classes(model_patcher) -> set:
    config = getattr(getattr(model_patcher, "model", None), "model_config", None)
    return {c.__name__ for c in type(config).__mro__} if config is not None else set()


def uncond_branch_problem(model_patcher, method: str):
    """For per-step unconditional-context methods (null-text, negative-prompt inversion) on a MODEL that
    ``check_supported(..., allow_flow=True)`` accepted: None where the method applies (the UNet families, and the
    rectified-flow families with true CFG, ``TRUE_CFG_FLOW``), else why not (for the caller's error): Flux
    (guidance-distilled dev, step-distilled schnell) has nothing to optimise, other flow families are not supported
    yet."""
    if not compat.is_flow_family(compat.model_sampling(model_patcher)):
        return None
    classes = _config_classes(model_patcher)
    family = compat.family_name(model_patcher)
    if classes & set(TRUE_CFG_FLOW):
        return None
    if "Flux" in classes:
        return (f"input `model` is a {family} model. Flux is guidance-distilled (Flux-dev reads the FluxGuidance "
                f"value as an input and runs one forward per step at cfg 1; schnell is step-distilled): it has no "
                f"real unconditional branch, so {method} has no unconditional embedding to act on. Use DDIM Invert "
                f"at inversion_cfg 1 with FluxGuidance on `positive` and sample back at cfg 1 with the same guidance "
                f"(that reconstructs without {method}). {method} runs on {TRUE_CFG_FLOW_NAMES} and the SD UNet "
                f"families.")
    return (f"the model family '{family}' (a rectified-flow / DiT model) is not supported yet by {method}; it runs "
            f"on {TRUE_CFG_FLOW_NAMES} and {SUPPORTED}.")


def require_single_cfg1_inversion(model_patcher, inversion, method: str, allow_flow: bool = False):
    """Per-image optimisers (null-text, StyleDiffusion) pivot on the cfg-1 chain of one image (``allow_flow``: the
    caller has checked the flow family itself, see ``uncond_branch_problem``)."""
    require_inversion(model_patcher, inversion, allow_flow=allow_flow)
    if inversion.latent_shape[0] != 1:
        raise InversionChainError(f"the INVERSION holds {inversion.latent_shape[0]} images; {method} works on "
                                  f"one image at a time. Invert a single image.")
    if abs(inversion.cfg - 1.0) > 1e-6:
        raise InversionChainError(f"the INVERSION was made at inversion_cfg {inversion.cfg}; {method} pivots "
                                  f"on the cfg 1 chain. Invert with inversion_cfg 1.0.")
