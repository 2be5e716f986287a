"""Every difference between the ComfyUI versions the pack supports lives here.

Supported: upstream 2024-03 (a28a9dc8, the CI tree) through current 0.3x. Each helper states the two behaviours.
"""
from __future__ import annotations

import contextlib

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils


def scheduler_names() -> list:
    # 0.3x: SCHEDULER_NAMES derived from SCHEDULER_HANDLERS; 2024-03: a plain list.
    return list(comfy.samplers.SCHEDULER_NAMES)


def calculate_sigmas(model_patcher, scheduler: str, steps: int) -> torch.Tensor:
    """Descending sigma schedule ending in 0, from a scheduler name (2024-03 takes the model, 0.3x model_sampling)."""
    if scheduler not in scheduler_names():
        raise ValueError(f"unknown scheduler '{scheduler}'; this ComfyUI has: {', '.join(scheduler_names())}")
    if hasattr(comfy.samplers, "calculate_sigmas"):
        sigmas = comfy.samplers.calculate_sigmas(model_sampling(model_patcher), scheduler, steps)
    else:
        sigmas = comfy.samplers.calculate_sigmas_scheduler(model_patcher.model, scheduler, steps)
    return sigmas.detach().float().cpu()


def model_sampling(model_patcher):
    """The model_sampling object in effect, including object patches (e.g. ModelSamplingDiscrete node).
    0.3x: ModelPatcher.get_model_object; 2024-03: object patches only land on the model while sampling."""
    if hasattr(model_patcher, "get_model_object"):
        return model_patcher.get_model_object("model_sampling")
    return model_patcher.object_patches.get("model_sampling", model_patcher.model.model_sampling)


def sample_with_function(model_patcher, sampler_function, sigmas, positive, negative, cfg, latent_image,
                         seed: int = 0, noise=None):
    """Run ``sampler_function(model, x, sigmas, extra_args, callback, disable)`` through ComfyUI's own sampling
    path (conditioning preparation, model loading, CFG, patches, latent scaling). Same call in both trees."""
    sampler = comfy.samplers.KSAMPLER(sampler_function)
    if noise is None:
        noise = torch.zeros_like(latent_image)
    return comfy.sample.sample_custom(model_patcher, noise, cfg, sampler, sigmas, positive, negative, latent_image,
                                      noise_mask=None, callback=None, disable_pbar=True, seed=seed)


def check_interrupt():
    comfy.model_management.throw_exception_if_processing_interrupted()


def progress_bar(total: int):
    return comfy.utils.ProgressBar(total)


def attention(q, k, v, extra_options):
    """ComfyUI's own attention kernel, called as its CrossAttention does (so results are bit-identical).
    0.3x passes attn_precision and transformer_options; 2024-03 takes only (q, k, v, heads)."""
    import comfy.ldm.modules.attention as attn
    heads = extra_options["n_heads"]
    if _ATTENTION_TAKES_OPTIONS:
        return attn.optimized_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"),
                                        transformer_options=extra_options)
    return attn.optimized_attention(q, k, v, heads)


def flux_rope(q, k, pe):
    """q and k rotated by the rotary embedding ``pe`` exactly as Flux/Chroma's joint attention rotates them before
    its kernel (comfy/ldm/flux/math.py ``apply_rope``; 0.3x only): what an ``attn1_patch`` observer needs to see
    the logits the block computes. New tensors; the inputs are not changed."""
    from comfy.ldm.flux.math import apply_rope
    return apply_rope(q, k, pe)


def _attention_takes_options() -> bool:
    import inspect
    import comfy.ldm.modules.attention as attn
    try:
        params = inspect.signature(attn.optimized_attention).parameters
    except (TypeError, ValueError):
        return False
    return "attn_precision" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


_ATTENTION_TAKES_OPTIONS = _attention_takes_options()


def preview_callback(model_patcher, steps: int):
    """ComfyUI's progress bar with latent previews: ``cb(step, x0, x, total_steps)`` (same in both trees)."""
    import latent_preview
    return latent_preview.prepare_callback(model_patcher, steps)


def out_of_memory_errors():
    import comfy.model_management as mm
    return (getattr(mm, "OOM_EXCEPTION", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError)


def clip_vision_tokens(clip_vision, image: torch.Tensor) -> torch.Tensor:
    """Per-token features ``(B, tokens, width)`` of a CLIP_VISION for an IMAGE, after the vision tower's final
    layer norm and before any projection (what StyleDiffusion's mapper reads).
    Both trees return the encoder output as ``last_hidden_state``; for CLIP towers it is *before*
    ``post_layernorm`` (which ComfyUI applies to the class token only), for SigLIP towers (0.3x,
    ``output_layernorm``) it is already normalised. 0.3x's ``encode_image`` also takes ``crop``."""
    with torch.no_grad():
        tokens = clip_vision.encode_image(image)["last_hidden_state"]
        tower = getattr(getattr(clip_vision, "model", None), "vision_model", None)
        post = getattr(tower, "post_layernorm", None)
        if post is not None and not getattr(tower, "output_layernorm", False):
            tokens = post(tokens)
    return tokens


def persistent_directory(name: str) -> str:
    """A folder of the pack's own that survives restarts (unlike the temp folder, which ComfyUI empties at every
    start): ``<user directory>/__inversion_chain/<name>``. 0.3x: under folder_paths.get_system_user_directory
    (``__`` folders are not served over HTTP); 2024-03 has only ``folder_paths.user_directory``, same layout."""
    import os
    import folder_paths
    if hasattr(folder_paths, "get_system_user_directory"):
        base = folder_paths.get_system_user_directory("inversion_chain")
    else:
        base = os.path.join(folder_paths.user_directory, "__inversion_chain")
    return os.path.join(base, name)



# -- patch objects -------------------------------------------------------------------------------------------------
class PatchObject:
    """Base of every object the pack puts into ``model_options`` (attention patches, post-CFG functions, the
    Controller): 2024-03's ``ModelPatcher.clone`` deep-copies model_options and 0.3x moves patch objects with the
    model (``.to(device)``); both must hand back the same object, which holds no device state of its own."""

    def __deepcopy__(self, memo):
        return self

    def to(self, device):
        return self


# -- models --------------------------------------------------------------------------------------------------------
def unet_of(model_patcher):
    """The UNetModel of a MODEL, or None for other architectures (DiT, MMDiT, ...). Same class in both trees."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    base = getattr(model_patcher, "model", None)
    unet = getattr(base, "diffusion_model", None)
    return unet if isinstance(unet, UNetModel) else None


def unet_block_classes():
    """(SpatialTransformer, Downsample, Upsample): what the UNet walk in attention/core/layers.py recognises."""
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample
    return SpatialTransformer, Downsample, Upsample


def resblock_class():
    """The UNet's ResNet block class (same name and ``skip_connection`` attribute in both trees)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock
    return ResBlock


def is_eps_family(sampling) -> bool:
    """True for eps and v prediction (ComfyUI's V_PREDICTION subclasses EPS in both trees)."""
    import comfy.model_sampling
    return isinstance(sampling, comfy.model_sampling.EPS)


def is_flow_family(sampling) -> bool:
    """True for rectified-flow model sampling (CONST: ``x = (1 - sigma) x0 + sigma noise``; SD3, Flux, Chroma, ...).
    Both trees define ``comfy.model_sampling.CONST``; only 0.3x has flow DiT families that use it."""
    import comfy.model_sampling
    const = getattr(comfy.model_sampling, "CONST", None)
    return const is not None and isinstance(sampling, const)


def diffusion_model_of(model_patcher):
    """The network inside a MODEL, whatever its architecture (UNetModel, Flux, Chroma, MMDiT, ...)."""
    return getattr(getattr(model_patcher, "model", None), "diffusion_model", None)


def text_batches_by_repeat(model_patcher) -> bool:
    """Whether ComfyUI batches two texts of different lengths for this model by repeating them to a common length
    (its ``c_crossattn`` is a ``CONDCrossAttn``: the UNets, Flux, Chroma) or only texts of equal length
    (``CONDRegular``: Qwen-Image, whose text tokens get RoPE positions by index, so a repeated text would move).
    Asked of the model's own ``extra_conds``; True where it cannot answer with a text alone."""
    import comfy.conds
    try:
        made = model_patcher.model.extra_conds(cross_attn=torch.zeros(1, 1, 1))
    except (TypeError, KeyError, AttributeError, ValueError, RuntimeError):   # needs inputs beyond a text
        return True
    text = made.get("c_crossattn")
    return text is None or isinstance(text, comfy.conds.CONDCrossAttn)


def family_name(model_patcher) -> str:
    """The model family as ComfyUI's model detection named it (its supported-model config class, e.g. SD15, SDXL,
    Flux, Chroma), and the network class when that differs (same attributes in both trees)."""
    base = getattr(model_patcher, "model", None)
    family = type(getattr(base, "model_config", base)).__name__
    net = type(diffusion_model_of(model_patcher)).__name__
    return family if net in (family, "NoneType") else f"{family} ({net})"


def prediction_name(sampling) -> str:
    """The name of a model_sampling's prediction type (EPS, V_PREDICTION, CONST, ...)."""
    import comfy.model_sampling
    for cls in type(sampling).__mro__:
        if cls.__module__ == comfy.model_sampling.__name__ and not issubclass(cls, torch.nn.Module):
            return cls.__name__
    return type(sampling).__name__


@contextlib.contextmanager
def differentiable_paths():
    """ComfyUI's ``model_management.in_training`` while autograd runs through a model: 0.3x's fused kernels without
    backward formulas (comfy_kitchen's RoPE in Flux / Chroma / Qwen-Image attention) then take their plain torch
    paths, as ComfyUI's own training node sets it. Trees without the flag (2024-03) have no such kernels."""
    mm = comfy.model_management
    if not hasattr(mm, "in_training"):
        yield
        return
    before = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = before


def load_models(models: list):
    """Load MODELs onto their device the way samplers do (same call in both trees)."""
    comfy.model_management.load_models_gpu(list(models))


def offload_device(model_patcher):
    """Where a MODEL's weights rest between runs (its patcher's, else ComfyUI's UNet offload device)."""
    return getattr(model_patcher, "offload_device", None) or comfy.model_management.unet_offload_device()


def unpatched_weights(model_patcher):
    """(name, tensor) of every weight and buffer of the MODEL's base model as loaded, before any patch: where a
    patcher has patched a weight in place its backup holds the original. Clones share one backup dict in both trees;
    values are tensors in 2024-03 and ``(weight, inplace_update)`` tuples in 0.3x."""
    backup = dict(getattr(model_patcher, "backup", None) or {})
    for name, t in model_patcher.model.state_dict(keep_vars=True).items():
        kept = backup.get(name)
        if kept is not None and not torch.is_tensor(kept):
            kept = getattr(kept, "weight", None)
        yield name, (kept if torch.is_tensor(kept) else t)


def weight_patches(model_patcher) -> dict:
    """The MODEL's weight patches (LoRAs, merges): key -> list of entries holding the strengths and the patch data,
    ``(strength_patch, data, strength_model)`` in 2024-03, ``(..., offset, function)`` in 0.3x."""
    return dict(getattr(model_patcher, "patches", None) or {})


def object_patches(model_patcher) -> dict:
    """Objects swapped into the model while sampling (e.g. model_sampling from ModelSamplingDiscrete); both trees."""
    return dict(getattr(model_patcher, "object_patches", None) or {})


# -- memory given back ---------------------------------------------------------------------------------------------
_release_callbacks: list = []
HOOK_MARK = "_inversion_chain_release_hook"


def on_memory_release(callback):
    """Call ``callback(reason, device, memory_required)`` after ComfyUI frees memory: ``reason`` "unload_all" after
    ``model_management.unload_all_models`` (the ``/free`` endpoint with unload_models or free_memory, in both
    trees), "free_memory" after ``model_management.free_memory(memory_required, device, ...)`` (ComfyUI making room
    to load a model; ``unload_all_models`` calls it too). The functions are wrapped once, in place, keeping their
    arguments and results; ComfyUI's own calls reach them through the module, so the wrappers see every call."""
    _install_release_hooks()
    if callback not in _release_callbacks:
        _release_callbacks.append(callback)


def _notify(reason, device=None, memory_required=None):
    import logging
    for callback in list(_release_callbacks):
        try:
            callback(reason, device, memory_required)
        except Exception:   # a cache that cannot let go must not break ComfyUI's own memory management
            logging.getLogger("inversion_chain").exception("[Inversion Chain] releasing memory (%s) failed", reason)


def _install_release_hooks():
    import functools
    mm = comfy.model_management
    for name in ("free_memory", "unload_all_models"):
        original = getattr(mm, name, None)
        if original is None or getattr(original, HOOK_MARK, False):
            continue

        def wrap(original, name):
            @functools.wraps(original)
            def hooked(*args, **kwargs):
                result = original(*args, **kwargs)
                if name == "free_memory":
                    need = args[0] if args else kwargs.get("memory_required")
                    device = args[1] if len(args) > 1 else kwargs.get("device")
                    _notify("free_memory", device, need)
                else:
                    _notify("unload_all")
                return result
            setattr(hooked, HOOK_MARK, True)
            return hooked

        setattr(mm, name, wrap(original, name))


def empty_device_cache():
    """Hand cached allocator blocks back to the driver (ComfyUI's soft_empty_cache, same name in both trees)."""
    comfy.model_management.soft_empty_cache()


def free_memory(device) -> int:
    return int(comfy.model_management.get_free_memory(device))


def prepare_noise(latent: torch.Tensor, seed: int) -> torch.Tensor:
    """ComfyUI's seeded noise for a LATENT (what KSampler adds), same in both trees."""
    return comfy.sample.prepare_noise(latent, seed)


def latent_out(model_patcher, x: torch.Tensor) -> torch.Tensor:
    """Sampler space -> LATENT space (undo the model's latent scaling)."""
    return model_patcher.model.process_latent_out(x)


def _keeps_empty_latent() -> bool:
    """0.3x's CFGGuider.inner_sample skips process_latent_in for an all-zero latent; 2024-03 always applies it."""
    import inspect
    guider = getattr(comfy.samplers, "CFGGuider", None)
    try:
        return guider is not None and "count_nonzero" in inspect.getsource(guider.inner_sample)
    except (OSError, TypeError, AttributeError):
        return False


_KEEPS_EMPTY_LATENT = _keeps_empty_latent()


def latent_for_start(model_patcher, x: torch.Tensor, sigma: float):
    """The LATENT that SamplerCustom (add_noise off) or KSampler Advanced (add_noise disable) turns back into the
    sampler-space state ``x`` at ``sigma``: ComfyUI's own convention for a latent handed over mid-schedule
    (KSAMPLER.sample's ``inverse_noise_scaling``, then ``process_latent_out``). EPS / V: the latent itself; flow
    models (CONST): ``x / (1 - sigma)``, since their sampler starts at ``(1 - sigma) * latent``. None where no LATENT
    does (CONST at sigma 1: the latent is scaled by zero there). Same in both trees."""
    ms = model_sampling(model_patcher)
    if is_flow_family(ms) and float(sigma) >= 1.0 - 1e-6:
        return None
    x = ms.inverse_noise_scaling(torch.tensor(float(sigma), dtype=x.dtype, device=x.device), x.clone())
    return latent_out(model_patcher, x)


def latent_in(model_patcher, x: torch.Tensor) -> torch.Tensor:
    """LATENT space -> sampler space."""
    return model_patcher.model.process_latent_in(x)


def unet_caller(patcher):
    """``call(x, sigma, conds, cond_or_uncond, **override)``: one UNet forward of one CFG branch as ComfyUI's sampler
    makes it (``apply_model`` on the loaded model with the patcher's transformer_options, so latent scaling, dtype
    casting and attention patches apply); ``override`` replaces model conds (e.g. ``c_crossattn``)."""
    base, device = patcher.model, patcher.load_device
    to_base = dict(patcher.model_options.get("transformer_options", {}))

    def call(x, sigma, conds, cond_or_uncond, **override):
        to = dict(to_base)
        to["cond_or_uncond"] = [cond_or_uncond]
        to["sigmas"] = sigma
        kwargs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in conds.items()}
        kwargs.update(override)
        return base.apply_model(x, sigma, transformer_options=to, **kwargs)

    return call

SEED_RANGE = 1 << 64  # ComfyUI's seed widgets: 0 .. 2^64 - 1


def wrap_seed(seed: int) -> int:
    """seed + offset kept in ComfyUI's seed range (modulo 2^64, as torch.manual_seed accepts)."""
    return int(seed) % SEED_RANGE


def noise_for_start(model_patcher, x_start: torch.Tensor, sigmas: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """The noise from which ComfyUI's sampler starts at the sampler-space state ``x_start`` for a LATENT ``latent``:
    KSAMPLER.sample starts at ``model_sampling.noise_scaling(sigmas[0], noise, process_latent_in(latent),
    max_denoise)``, affine in the noise for EPS, V and CONST sampling, so this solves it for the noise. On flow
    models (CONST) at sigma 1 the latent drops out and the noise is ``x_start`` itself. 0.3x leaves an all-zero
    (empty) latent unscaled, 2024-03 scales it too."""
    import types
    ms = model_sampling(model_patcher)
    wrap = types.SimpleNamespace(inner_model=types.SimpleNamespace(model_sampling=ms))
    max_denoise = comfy.samplers.Sampler.max_denoise(None, wrap, sigmas)
    x_start = x_start.float()
    sigma0 = sigmas[0].reshape(()).to(x_start)
    lat = latent.clone().to(x_start)
    if torch.count_nonzero(lat) > 0 or not _KEEPS_EMPTY_LATENT:   # 0.3x leaves an all-zero (empty) latent unscaled
        lat = latent_in(model_patcher, lat)
    offset = ms.noise_scaling(sigma0, torch.zeros_like(x_start), lat, max_denoise)
    scale = ms.noise_scaling(sigma0, torch.ones_like(x_start), torch.zeros_like(x_start), max_denoise)
    return (x_start - offset) / scale


def seed_noise(model_patcher, latent: torch.Tensor, seed: int, sigmas: torch.Tensor) -> torch.Tensor:
    """The starting latent a stock sampler makes for an empty latent: comfy.sample.prepare_noise(latent, seed), scaled
    by the model_sampling's noise_scaling for sigmas[0] with ComfyUI's own max_denoise test (sqrt(1 + sigma0^2) only
    when sigma0 is at sigma_max, else sigma0). Same code path in both trees; returned in sampler space."""
    import types
    noise = comfy.sample.prepare_noise(latent, wrap_seed(seed))
    ms = model_sampling(model_patcher)
    wrap = types.SimpleNamespace(inner_model=types.SimpleNamespace(model_sampling=ms))
    max_denoise = comfy.samplers.Sampler.max_denoise(None, wrap, sigmas)
    sigma0 = sigmas[0].reshape(()).to(noise.dtype)
    return ms.noise_scaling(sigma0, noise, torch.zeros_like(noise), max_denoise)


# -- version floors ---------------------------------------------------------------------------------------------------
# Every ComfyUI feature a node relies on beyond the 2024-03 tree: the oldest release that has it and how to tell.
# docs/development.md "Tested trees" lists the same table; tests/test_tree.py checks each probe against the tree it
# runs on.
OLDEST_SUPPORTED = "2024-03 (a28a9dc8)"


def _flux_attention_patch() -> bool:
    """Flux/Chroma joint attention calls transformer_options["patches"]["attn1_patch"] with q, k, v before RoPE."""
    try:
        import inspect
        import comfy.ldm.flux.layers as flux_layers
    except ImportError:
        return False
    return "attn1_patch" in inspect.getsource(flux_layers)


def _sd35_mmdit() -> bool:
    """ComfyUI's MMDiT builds SD3.5's layouts: q/k RMSNorm and SD3.5-medium's second image self-attention."""
    try:
        import inspect
        from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
    except ImportError:
        return False
    return "x_block_self_attn_layers" in inspect.signature(MMDiT.__init__).parameters


def _attention_override() -> bool:
    """ComfyUI's attention functions honour ``transformer_options["optimized_attention_override"]`` (wrap_attn) and
    Flux's joint attention passes transformer_options to them."""
    try:
        import inspect
        import comfy.ldm.modules.attention as attn
        import comfy.ldm.flux.math as flux_math
    except ImportError:
        return False
    return (hasattr(attn, "wrap_attn") and "optimized_attention_override" in inspect.getsource(attn.wrap_attn)
            and "transformer_options" in inspect.signature(flux_math.attention).parameters)


def _module_exists(name: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


FEATURES = {
    # name: (oldest ComfyUI release with it, what it is, probe)
    "unet-attention-patches": (OLDEST_SUPPORTED, "attn1/attn2 patch and replace hooks of the UNet's transformer "
                               "blocks (SD1.x, SD2.x, SDXL)", lambda: True),
    "flux-models": ("0.3.31", "the Flux and Chroma model classes (comfy.ldm.flux, comfy.ldm.chroma)",
                    lambda: _module_exists("comfy.ldm.flux.model") and _module_exists("comfy.ldm.chroma.model")),
    "sd3-models": ("2024-10 (13b0ff8a)", "the SD3 / SD3.5 MMDiT model class with SD3.5's layouts (q/k RMSNorm, "
                   "SD3.5-medium's dual image attention; comfy.ldm.modules.diffusionmodules.mmdit)", _sd35_mmdit),
    "qwen-image-models": ("0.3.49", "the Qwen-Image model class (comfy.ldm.qwen_image)",
                          lambda: _module_exists("comfy.ldm.qwen_image.model")),
    "dit-attention-patches": ("0.17.0", "attn1_patch inside Flux/Chroma/Qwen-Image joint attention (q, k, v before "
                              "RoPE, with img_slice)", _flux_attention_patch),
    "attention-override": ("0.3.60", "transformer_options[\"optimized_attention_override\"] around the attention "
                           "kernel (q, k, v after RoPE, with the block and CFG half in transformer_options)",
                           _attention_override),
}


def has_feature(name: str) -> bool:
    return bool(FEATURES[name][2]())


def missing_feature_message(name: str, who: str) -> str | None:
    """None when this ComfyUI has the feature, else a sentence naming the feature, its floor and this tree."""
    if has_feature(name):
        return None
    floor, feature, _probe = FEATURES[name]
    return (f"{who} needs {feature}, which ComfyUI has from {floor} on; this ComfyUI lacks it. Update ComfyUI to "
            f"{floor} or newer.")
