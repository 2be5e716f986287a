"""Small random parts for RIVAL's other pipelines, built from ComfyUI's own classes and saved as real files that the
stock loaders read:

- ``controlnet_path(size)``: a ControlNet (``comfy.cldm.cldm.ControlNet``) of the ``small`` SD1.5-layout or the
  ``sdxl`` test model, in ComfyUI's own key layout; Load ControlNet Model detects its config from the state dict
  like a real one.
- ``lora_path()``: a rank-4 LoRA in the kohya layout (``lora_unet_<key>.lora_up/.lora_down/.alpha``) for every
  attention projection of the ``small`` model's UNet; Load LoRA maps the names with ComfyUI's own key map.
- ``unclip``: SD2.1-unCLIP's layout (ComfyUI's ``SD21UnclipL`` config: ADM input = noise-augmented CLIP image
  embedding + noise-level embedding, the ``CLIPEmbeddingNoiseAugmentation`` noise augmentor) shrunk like ``sd2v``,
  with a timestep_dim equal to the small CLIP vision model's projection (32), so unCLIPConditioning on that
  model's output feeds it.
Weights come from a seeded generator, so every build is identical.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from . import models
from .comfy_env import CACHE_DIR, setup_comfy

# test model size -> its ControlNet (the full-size "sd15" test model has none: it would weigh 700 MB)
CONTROLNET_NAMES = {"small": "ic_test_controlnet_small.safetensors",
                    "sdxl": "ic_test_controlnet_sdxl_small.safetensors"}
LORA_NAME = "ic_test_lora_small.safetensors"
UNCLIP_NAME = "ic_test_sd21_unclip_small.safetensors"
UNCLIP_EMBED = models.CLIP_VISION_SMALL["projection_dim"]   # the noise augmentor's timestep_dim
UNCLIP_UNET = {"model_channels": 32, "context_dim": 32, "use_linear_in_transformer": True,
               "adm_in_channels": 2 * UNCLIP_EMBED, "num_classes": "sequential"}
LORA_RANK = 4


def _save(sd: dict, path: Path) -> Path:
    import comfy.utils
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    comfy.utils.save_torch_file({k: v.detach().float().contiguous() for k, v in sd.items()}, str(tmp))
    os.replace(tmp, path)
    return path


# -- ControlNet --------------------------------------------------------------------------------------------------
def controlnet_path(size: str = "small") -> Path:
    """The ControlNet of test model ``size`` ("small" or "sdxl"): the UNet config the stock loader would detect."""
    path = CACHE_DIR / "controlnet" / CONTROLNET_NAMES[size]
    if not path.is_file():
        setup_comfy()
        import comfy.cldm.cldm
        import comfy.ops
        registered = models.register_test_model_configs()
        config = copy.deepcopy(registered[size](copy.deepcopy(models.full_unet_config(size))).unet_config)
        config.pop("out_channels")
        with torch.inference_mode(False), torch.no_grad():
            net = comfy.cldm.cldm.ControlNet(hint_channels=3, dtype=torch.float32, device="cpu",
                                             operations=comfy.ops.disable_weight_init, **config)
            models.fill_seeded_(net, models.SEED + 10)   # zero convs random too: the control acts from the start
            _save(net.state_dict(), path)
    return path


def load_controlnet(size: str = "small"):
    """CONTROL_NET through the stock loader function (what Load ControlNet Model calls)."""
    import comfy.controlnet
    models.register_test_model_configs()
    with torch.inference_mode():
        return comfy.controlnet.load_controlnet(str(controlnet_path(size)))


# -- LoRA --------------------------------------------------------------------------------------------------------
def lora_path() -> Path:
    path = CACHE_DIR / "loras" / LORA_NAME
    if not path.is_file():
        model = models.load_checkpoint("small")[0]
        import comfy.lora
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        weights = model.model.state_dict()
        gen = torch.Generator().manual_seed(models.SEED + 11)
        sd = {}
        for lora_key, unet_key in sorted(key_map.items()):
            if not lora_key.startswith("lora_unet_") or "lora_unet_input_blocks" not in lora_key \
                    and "lora_unet_middle_block" not in lora_key and "lora_unet_output_blocks" not in lora_key:
                continue   # one name per weight: the ldm-named kohya keys
            if not any(p in unet_key for p in (".to_q.", ".to_k.", ".to_v.", ".to_out.0.")):
                continue
            out_f, in_f = weights[unet_key].shape
            sd[f"{lora_key}.lora_down.weight"] = torch.randn(LORA_RANK, in_f, generator=gen) * in_f ** -0.5
            sd[f"{lora_key}.lora_up.weight"] = torch.randn(out_f, LORA_RANK, generator=gen) * LORA_RANK ** -0.5
            sd[f"{lora_key}.alpha"] = torch.tensor(float(LORA_RANK))
        _save(sd, path)
    return path


# -- SD2.1-unCLIP layout -----------------------------------------------------------------------------------------
_unclip_cls = None


def register_unclip():
    """A subclass of ComfyUI's SD21UnclipL that matches only the test layout (v-prediction, the sd2v test model's
    shrunk OpenCLIP-H text encoder, noise augmentor of width UNCLIP_EMBED)."""
    global _unclip_cls
    setup_comfy()
    if _unclip_cls is not None:
        return _unclip_cls
    import comfy.supported_models as sm
    from comfy import model_base
    sd2v = models.register_test_model_configs()["sd2v"]

    class ICTestUnclip(sm.SD21UnclipL):
        unet_config = {**{k: UNCLIP_UNET[k] for k in ("model_channels", "context_dim", "use_linear_in_transformer",
                                                       "adm_in_channels")}, "use_temporal_attention": False}
        unet_extra_config = dict(sd2v.unet_extra_config)
        noise_aug_config = {"noise_schedule_config": {"timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"},
                            "timestep_dim": UNCLIP_EMBED}

        def model_type(self, state_dict, prefix=""):
            return model_base.ModelType.V_PREDICTION   # as SD2.1-unCLIP

        def clip_target(self, state_dict={}):
            return sd2v.clip_target(self, state_dict)

    sm.models.insert(0, ICTestUnclip)
    _unclip_cls = ICTestUnclip
    return ICTestUnclip


def unclip_path() -> Path:
    path = CACHE_DIR / "checkpoints" / UNCLIP_NAME
    if not path.is_file():
        cls = register_unclip()
        import comfy.taesd.taesd
        unet = {**models.SD15_UNET, **UNCLIP_UNET}
        with torch.inference_mode(False), torch.no_grad():
            config = cls(copy.deepcopy(unet))
            config.set_inference_dtype(torch.float32, None)
            base = config.get_model({}, "", device=torch.device("cpu"))
            models.fill_seeded_(base.diffusion_model, models.SEED + 12)
            clip = config.clip_target().clip(device="cpu", dtype=torch.float32)
            models.fill_seeded_(clip, models.SEED + 1)
            clip_sd = {k: v for k, v in clip.state_dict().items() if "position_ids" not in k and "logit_scale" not in k}
            vae = comfy.taesd.taesd.TAESD()
            models.fill_seeded_(vae, models.SEED + 2)
            sd = models.checkpoint_state_dict(base, clip_sd, vae.state_dict())
        _save(sd, path)
    return path


def load_unclip():
    """(MODEL, CLIP, VAE) of the unCLIP-layout test model through the stock checkpoint loader."""
    import comfy.sd
    register_unclip()
    with torch.inference_mode():
        out = comfy.sd.load_checkpoint_guess_config(str(unclip_path()), output_vae=True, output_clip=True)
    return out[0], out[1], out[2]
