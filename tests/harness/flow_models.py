"""Small random-weight rectified-flow DiT models (Flux dev-style, Chroma) built from ComfyUI's own classes; Qwen-Image
and SD3.5 are built by flow_models_more.py, and this module's functions dispatch those two families there.

Only ComfyUI trees that have these families (0.3x) can build them; ``missing_family(family)`` says why not otherwise,
for the tests' skip reasons. What each piece is and how it loads:

- Diffusion model: ComfyUI's own model config (``comfy.supported_models.Flux`` / ``Chroma``) builds the model; every
  parameter is filled from a seeded generator (ComfyUI leaves weights uninitialised) and the state dict is saved as a
  ``.safetensors`` file that the stock UNETLoader reads (``comfy.sd.load_diffusion_model``, what the node calls).
  Flux: the stock detection infers every size from the state dict shapes (hidden 128 = one head of Flux's RoPE
  width 16 + 56 + 56, one double and one single block, guidance embedding as Flux-dev). Chroma: the stock detection
  hard-codes the width of Chroma's modulation approximator (5 layers of 5120 to a 3072-wide model), so a test-only
  subclass of ComfyUI's ``Chroma`` config is registered at the front of ``comfy.supported_models.models`` that
  matches only this small layout (as the SD1.x test model's config does) and gives the approximator its real sizes.
- Text encoders: ComfyUI's own classes with shrunk configs (``t5xxl_model_config`` / ``clip_l_model_config``
  model options, read by ``SDClipModel``) and the real T5 / CLIP tokenizers in the tree: Flux's ``FluxTokenizer`` +
  ``flux_clip`` (CLIP-L pooled + T5), Chroma's ``PixArtTokenizer`` + ``pixart_te`` (T5 only). They are built in
  process as ``comfy.sd.CLIP``: the stock CLIPLoader / DualCLIPLoader detect T5 by its 24th block and build the
  full-size config, so a shrunk encoder cannot go through them.
- VAE: a TAESD with Flux's 16 latent channels (the taef1 layout) saved with ``taesd_encoder.`` / ``taesd_decoder.``
  keys, which the stock VAE loader (``comfy.sd.VAE(sd=...)``) reads.
Weights come from a seeded generator, so every build is identical.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from . import models
from .comfy_env import CACHE_DIR, comfy_version, setup_comfy

FAMILIES = ("flux", "chroma", "qwen_image", "sd3")    # the last two built by flow_models_more.py
SUPPORTED_CLASS = {"flux": "Flux", "chroma": "Chroma", "qwen_image": "QwenImage", "sd3": "SD3"}
FILE_NAMES = {"flux": "ic_test_flux_dev_small.safetensors", "chroma": "ic_test_chroma_small.safetensors",
              "qwen_image": "ic_test_qwen_image_small.safetensors", "sd3": "ic_test_sd35_small.safetensors"}
VAE_NAME = "ic_test_taef1_small.safetensors"
SEEDS = {"flux": models.SEED + 40, "chroma": models.SEED + 41, "vae": models.SEED + 42, "te": models.SEED + 43}

T5_SMALL = {"d_model": 32, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 2}   # vocab 32128 kept (tokenizer)
CLIP_L_SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
                "projection_dim": 32}
HIDDEN = 128          # Flux's detection sets num_heads = hidden // sum(axes_dim) with axes 16 + 56 + 56
_COMMON = {"in_channels": 16, "out_channels": 16, "context_in_dim": T5_SMALL["d_model"], "hidden_size": HIDDEN,
           "mlp_ratio": 4.0, "num_heads": 1, "depth": 1, "depth_single_blocks": 1, "axes_dim": [16, 56, 56],
           "theta": 10000, "patch_size": 2, "qkv_bias": True, "txt_ids_dims": []}
# What ComfyUI's detection finds in the saved state dicts (Chroma: with this file's approximator sizes).
DIT_CONFIGS = {
    "flux": {**_COMMON, "image_model": "flux", "vec_in_dim": CLIP_L_SMALL["hidden_size"], "guidance_embed": True,
             "yak_mlp": False, "txt_norm": False},
    "chroma": {**_COMMON, "image_model": "chroma", "in_channels": 64, "out_channels": 64, "vec_in_dim": None,
               "in_dim": 64, "out_dim": HIDDEN, "hidden_dim": 64, "n_layers": 2},
}
CHROMA_APPROXIMATOR = {k: DIT_CONFIGS["chroma"][k] for k in ("in_dim", "out_dim", "hidden_dim", "n_layers")}


def missing_family(family: str) -> str | None:
    """None when this ComfyUI tree has ``family``; else the reason (for pytest.skip)."""
    setup_comfy()
    import comfy.supported_models as sm
    if not hasattr(sm, SUPPORTED_CLASS[family]):
        return (f"this ComfyUI tree ({comfy_version()}) lacks the {SUPPORTED_CLASS[family]} model family "
                f"(comfy.supported_models.{SUPPORTED_CLASS[family]}); run with COMFYUI_PATH at a 0.3x tree")
    return _more().missing_layout(family) if family in _more().FAMILIES else None


def missing_feature(who: str, *features: str) -> str | None:
    """The first of the pack's ComfyUI ``features`` this tree lacks, as the sentence the node would say (``who`` its
    subject), for pytest.skip; None when it has them all."""
    from inversion_chain import compat
    return next((reason for reason in (compat.missing_feature_message(f, who) for f in features) if reason), None)


def fill_flow_seeded_(module: torch.nn.Module, seed: int):
    """The SD models' seeded fill, then every norm scale to one (RMSNorm's ``scale`` too, which the SD fill zeroes)."""
    models.fill_seeded_(module, seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and "norm" in name and name.rsplit(".", 1)[-1] in ("scale", "weight"):
                p.fill_(1.0)


_chroma_cls = None


def register_test_chroma():
    """A subclass of ComfyUI's Chroma config that matches only this small layout and carries its approximator
    sizes (the stock detection hard-codes Chroma's). Put at the front of ``comfy.supported_models.models``."""
    global _chroma_cls
    setup_comfy()
    if _chroma_cls is not None:
        return _chroma_cls
    import comfy.supported_models as sm

    class ICTestChroma(sm.Chroma):
        @classmethod
        def matches(cls, unet_config, state_dict=None, unet_key_prefix="", **kwargs):
            w = (state_dict or {}).get(f"{unet_key_prefix}distilled_guidance_layer.in_proj.weight")
            return (unet_config.get("image_model") == "chroma" and w is not None
                    and tuple(w.shape) == (CHROMA_APPROXIMATOR["hidden_dim"], CHROMA_APPROXIMATOR["in_dim"])
                    and int(unet_config.get("hidden_size", 0)) == HIDDEN)

        def __init__(self, unet_config):
            super().__init__({**unet_config, **CHROMA_APPROXIMATOR})

    sm.models.insert(0, ICTestChroma)
    _chroma_cls = ICTestChroma
    return ICTestChroma


def _save(sd: dict, path: Path) -> Path:
    import comfy.utils
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    comfy.utils.save_torch_file({k: v.detach().float().contiguous() for k, v in sd.items()}, str(tmp))
    os.replace(tmp, path)
    return path


@torch.no_grad()
def build_state_dict(family: str) -> dict:
    """The diffusion model's state dict, built by ComfyUI's own model config for ``family``."""
    reason = missing_family(family)
    if reason:
        raise RuntimeError(reason)
    if family in _more().FAMILIES:
        return _more().build_state_dict(family)
    import comfy.supported_models as sm
    cls = register_test_chroma() if family == "chroma" else getattr(sm, SUPPORTED_CLASS[family])
    with torch.inference_mode(False):
        config = cls(dict(DIT_CONFIGS[family]))
        config.set_inference_dtype(torch.float32, None)
        base = config.get_model({}, "", device=torch.device("cpu"))
        fill_flow_seeded_(base.diffusion_model, SEEDS[family])
        return {k: v.clone() for k, v in base.diffusion_model.state_dict().items()}


def model_path(family: str) -> Path:
    path = CACHE_DIR / "diffusion_models" / FILE_NAMES[family]
    if not path.is_file():
        _save(build_state_dict(family), path)
    return path


def load_model(family: str):
    """MODEL through the stock UNETLoader's loader function (``comfy.sd.load_diffusion_model``)."""
    import comfy.sd
    if family == "chroma":
        register_test_chroma()
    if family in _more().FAMILIES:
        _more().before_load(family)
    path = model_path(family)
    with torch.inference_mode():
        return comfy.sd.load_diffusion_model(str(path))


def vae_path() -> Path:
    path = CACHE_DIR / "vae" / VAE_NAME
    if not path.is_file():
        setup_comfy()
        import comfy.taesd.taesd
        with torch.inference_mode(False), torch.no_grad():
            taesd = comfy.taesd.taesd.TAESD(latent_channels=16)
            models.fill_seeded_(taesd, SEEDS["vae"])
            sd = {}
            for prefix, part in (("taesd_encoder.", taesd.taesd_encoder), ("taesd_decoder.", taesd.taesd_decoder)):
                sd.update({prefix + k: v.clone() for k, v in part.state_dict().items()})
        _save(sd, path)
    return path


def load_vae():
    """VAE through the stock VAE loader's constructor (``comfy.sd.VAE(sd=...)`` on the file's state dict)."""
    import comfy.sd
    import comfy.utils
    with torch.inference_mode():
        return comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(vae_path())))


def load_clip(family: str):
    """CLIP of ``family``: ComfyUI's own text encoder classes, shrunk, with the tree's real tokenizers."""
    reason = missing_family(family)
    if reason:
        raise RuntimeError(reason)
    if family in _more().FAMILIES:
        return _more().load_clip(family)
    import comfy.sd
    import comfy.supported_models_base as smb
    if family == "flux":
        import comfy.text_encoders.flux as te
        target = smb.ClipTarget(te.FluxTokenizer, te.flux_clip())
    else:
        import comfy.text_encoders.pixart_t5 as te
        target = smb.ClipTarget(te.PixArtTokenizer, te.pixart_te())
    options = {"t5xxl_model_config": dict(T5_SMALL), "clip_l_model_config": dict(CLIP_L_SMALL),
               "dtype": torch.float32}
    with torch.inference_mode(False), torch.no_grad():
        clip = comfy.sd.CLIP(target=target, model_options=options)
        fill_flow_seeded_(clip.cond_stage_model, SEEDS["te"])
    return clip


def load_family(family: str):
    """(MODEL, CLIP, VAE) of a flow family's test model."""
    vae = _more().load_vae(family) if family in _more().FAMILIES else load_vae()
    return load_model(family), load_clip(family), vae


def _more():
    from . import flow_models_more
    return flow_models_more


def sample_back(f: dict, model=None, positive=None, negative=None, cfg: float = 1.0):
    """The stock graph from an inversion's noise: Inverted Noise -> SamplerCustomAdvanced (CFGGuider at ``cfg``, euler,
    DDIM Invert's sigmas, an empty latent of the source's shape). ``f``: the flow tests' fixture dict (model, inv,
    positive, sigmas, latent); ``negative`` defaults to the positive (unused at cfg 1)."""
    import comfy_extras.nodes_custom_sampler as ncs
    from inversion_chain.nodes.inverted_noise import ICInvertedNoise
    model = model or f["model"]
    with torch.inference_mode():
        noise = ICInvertedNoise().noise(model, f["inv"])["result"][0]
        guider = ncs.CFGGuider.execute(model, positive or f["positive"], negative or f["positive"], cfg).result[0]
        sampler = ncs.KSamplerSelect.execute("euler").result[0]
        empty = {"samples": torch.zeros_like(f["latent"]["samples"])}
        return ncs.SamplerCustomAdvanced.execute(noise, guider, sampler, f["sigmas"], empty).result[0]["samples"]
