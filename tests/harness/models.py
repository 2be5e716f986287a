"""Random-weight models built from ComfyUI's own classes, saved as real checkpoints.

SD1.x layouts in three sizes, plus two other families (``FAMILIES``):
- ``small``: SD1.5's block layout (4 levels, 16 attention blocks) at width 32, context 32, a 2-layer CLIP and a
  TAESD VAE. Loadable by the stock ``CheckpointLoaderSimple`` once ``register_test_model_configs()`` ran (a test
  node does that in the server).
- ``bench``: the same layout at width 128, context 768, the real SD1 CLIP architecture; for ``bench/``.
- ``sd15``: full SD1.5 architecture with random fp16 weights, recognised by the stock loader with no registration.
- ``sd2v``: SD2's layout (linear proj_in, OpenCLIP-H text encoder shrunk to width 32 with SD2's real tokenizer,
  pad id 0, penultimate layer), v-prediction, TAESD.
- ``sdxl``: ComfyUI's SDXL class (ADM vector = pooled CLIP-G output + 6 x 256 size/crop embeddings), SDXL's level
  layout [1,2,4] with transformer depths [0,0,1,1,2,2] (SDXL: [0,0,2,2,10,10]), middle 2, output [0,0,0,1,1,1,2,2,2];
  dual CLIP-L + CLIP-G (widths 32, real tokenizers through ComfyUI's SDXLTokenizer), TAESD.
The small families are saved the way ComfyUI's CheckpointSave does (``state_dict_for_saving``) and loaded by the
stock ``load_checkpoint_guess_config`` once ``register_test_model_configs()`` ran.
Weights are filled from a seeded generator (ComfyUI leaves them uninitialised), so every build is identical.
"""
from __future__ import annotations

import copy
import json
import os
from functools import partial
from pathlib import Path

import torch

from .comfy_env import CACHE_DIR, setup_comfy

SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SIZES = {
    "small": {"model_channels": 32, "context_dim": 32, "clip": {"hidden_size": 32, "intermediate_size": 64,
                                                             "num_attention_heads": 2, "num_hidden_layers": 2,
                                                             "projection_dim": 32}, "vae": "taesd"},
    "bench": {"model_channels": 128, "context_dim": 768, "clip": None, "vae": "taesd"},
    "sd15": {"model_channels": 320, "context_dim": 768, "clip": None, "vae": "kl", "dtype": torch.float16},
}
CHECKPOINT_NAMES = {"small": "ic_test_small.safetensors", "bench": "ic_test_bench.safetensors",
                    "sd15": "ic_test_sd15_random_fp16_v2.safetensors",  # v2: real SD VAE layout
                    "sd2v": "ic_test_sd2v_small.safetensors", "sdxl": "ic_test_sdxl_small.safetensors",
                    "sdxl_bench": "ic_test_sdxl_bench.safetensors"}
# test family -> checkpoint size (the families every node's tests run on)
FAMILIES = {"sd15": "small", "sd2v": "sd2v", "sdxl": "sdxl"}
SMALL_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3,
              "projection_dim": 32}
# The other families: UNet config (what ComfyUI's detection finds in the saved state dict) and CLIP sizes.
OTHER = {
    "sd2v": {"unet": {"model_channels": 32, "context_dim": 32, "use_linear_in_transformer": True},
             "head_channels": 16, "clip": {"h": SMALL_CLIP}},
    "sdxl": {"unet": {"model_channels": 32, "context_dim": 64, "use_linear_in_transformer": True,
                      "channel_mult": [1, 2, 4], "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 1, 1, 2, 2],
                      "transformer_depth_middle": 2, "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2],
                      "adm_in_channels": 32 + 6 * 256, "num_classes": "sequential"},
             "head_channels": 16, "clip": {"l": SMALL_CLIP, "g": SMALL_CLIP}},
    # the SDXL layout at bench width (bench/): real SDXL depths scaled by 1/5, context 2048 as SDXL
    "sdxl_bench": {"unet": {"model_channels": 64, "context_dim": 2048, "use_linear_in_transformer": True,
                            "channel_mult": [1, 2, 4], "num_res_blocks": [2, 2, 2],
                            "transformer_depth": [0, 0, 1, 1, 2, 2], "transformer_depth_middle": 2,
                            "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2], "adm_in_channels": 1280 + 6 * 256,
                            "num_classes": "sequential"},
                   "head_channels": 64, "clip": {"l": {**SMALL_CLIP, "hidden_size": 768, "num_attention_heads": 12,
                                                       "intermediate_size": 1536},
                                                 "g": {**SMALL_CLIP, "hidden_size": 1280, "num_attention_heads": 20,
                                                       "intermediate_size": 2560, "projection_dim": 1280}}},
}
SEED = 1234
SD_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                   "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def unet_config(size: str) -> dict:
    cfg = dict(SD15_UNET)
    cfg["model_channels"] = SIZES[size]["model_channels"]
    cfg["context_dim"] = SIZES[size]["context_dim"]
    return cfg


def shrunk_config(base: Path, overrides: dict, name: str) -> str:
    """``base`` (one of ComfyUI's JSON model configs) with ``overrides``, written once to CACHE_DIR/<name>.json
    (rewritten only when its content changes); returns the path."""
    config = json.loads(base.read_text())
    config.update(overrides)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    path = CACHE_DIR / f"{name}.json"
    text = json.dumps(config, indent=1)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return str(path)


def clip_config_path(size: str) -> str | None:
    """A shrunk copy of ComfyUI's SD1 CLIP config (real vocabulary and 77 positions), or None for the real size."""
    overrides = SIZES[size]["clip"]
    if overrides is None:
        return None
    import comfy.sd1_clip
    return shrunk_config(Path(comfy.sd1_clip.__file__).with_name("sd1_clip_config.json"), overrides,
                         f"clip_config_{size}")


_registered = {}


def register_test_model_configs():
    """Let the stock checkpoint loader recognise the small and bench models (test-only)."""
    setup_comfy()
    import comfy.supported_models as sm
    import comfy.sd1_clip as sd1
    from comfy import supported_models_base

    for size in ("small", "bench"):
        if size in _registered:
            continue
        clip_path = clip_config_path(size)

        class TestSD15(sm.SD15):
            unet_config = {"context_dim": SIZES[size]["context_dim"],
                           "model_channels": SIZES[size]["model_channels"],
                           "use_linear_in_transformer": False, "adm_in_channels": None,
                           "use_temporal_attention": False}

            def clip_target(self, state_dict={}, _clip_path=clip_path):
                target = supported_models_base.ClipTarget(sd1.SD1Tokenizer, sd1.SD1ClipModel)
                if _clip_path is not None:
                    target.params["clip_model"] = partial(sd1.SDClipModel, textmodel_json_config=_clip_path)
                return target

        TestSD15.__name__ = TestSD15.__qualname__ = f"ICTestSD15_{size}"
        sm.models.insert(0, TestSD15)
        _registered[size] = TestSD15
    _register_other_families()
    return dict(_registered)


def fill_seeded_(module: torch.nn.Module, seed: int):
    """Fill every parameter deterministically: fan-in scaled normals for weights, ones for norm scales."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim >= 2:
                fan_in = p[0].numel()
                std = 0.02 if "embedding" in name else fan_in ** -0.5
                value = torch.randn(p.shape, generator=gen) * std
            elif "norm" in name or name.endswith("ln_1.weight") or name.endswith("ln_2.weight"):
                value = torch.ones(p.shape) if name.endswith("weight") else torch.zeros(p.shape)
            else:
                value = torch.randn(p.shape, generator=gen) * 0.02
            p.copy_(value.to(p.dtype))


@torch.no_grad()
def build_state_dict(size: str, seed: int = SEED) -> dict:
    setup_comfy()
    import comfy.supported_models as sm
    import comfy.sd1_clip as sd1
    import comfy.sd
    import comfy.taesd.taesd

    register_test_model_configs()
    config_cls = _registered.get(size, sm.SD15)
    model_config = config_cls(copy.deepcopy(unet_config(size)))
    model_config.set_inference_dtype(torch.float32, None)
    base_model = model_config.get_model({}, "", device=torch.device("cpu"))
    fill_seeded_(base_model.diffusion_model, seed)
    sd = {f"model.diffusion_model.{k}": v for k, v in base_model.diffusion_model.state_dict().items()}
    del base_model

    clip_kwargs = {}
    path = clip_config_path(size)
    if path is not None:
        clip_kwargs["textmodel_json_config"] = path
    clip = sd1.SDClipModel(device="cpu", dtype=torch.float32, **clip_kwargs)
    fill_seeded_(clip, seed + 1)
    for k, v in clip.state_dict().items():
        if k in ("transformer.text_projection.weight", "logit_scale") or "position_ids" in k:
            continue
        sd[f"cond_stage_model.{k}"] = v
    del clip

    if SIZES[size]["vae"] == "taesd":
        vae_module = comfy.taesd.taesd.TAESD()
    else:
        # SD1.x's VAE layout (downscale 8); comfy.sd.VAE(sd={}) would build the x4 upscaler's (downscale 4)
        from comfy.ldm.models.autoencoder import AutoencoderKL
        vae_module = AutoencoderKL(ddconfig=SD_VAE_DDCONFIG, embed_dim=4)
    fill_seeded_(vae_module, seed + 2)
    for k, v in vae_module.state_dict().items():
        sd[f"first_stage_model.{k}"] = v
    dtype = SIZES[size].get("dtype", torch.float32)
    return {k: v.detach().to(dtype).contiguous() if v.is_floating_point() else v.contiguous() for k, v in sd.items()}


def checkpoint_path(size: str) -> Path:
    """Build the checkpoint once (cached outside the repo) and return its path."""
    path = CACHE_DIR / "checkpoints" / CHECKPOINT_NAMES[size]
    if not path.is_file():
        import comfy.utils
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        sd = build_other_state_dict(size) if size in OTHER else build_state_dict(size)
        comfy.utils.save_torch_file(sd, str(tmp))
        os.replace(tmp, path)
    return path


def load_checkpoint(size: str):
    """(MODEL, CLIP, VAE) through ComfyUI's own loader, as CheckpointLoaderSimple does."""
    import comfy.sd
    register_test_model_configs()
    with torch.inference_mode():  # as ComfyUI runs every node
        out = comfy.sd.load_checkpoint_guess_config(str(checkpoint_path(size)), output_vae=True, output_clip=True)
    return out[0], out[1], out[2]


# -- CLIP vision ---------------------------------------------------------------------------------------------------
CLIP_VISION_NAME = "ic_test_clip_vision_small.safetensors"
CLIP_VISION_SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
                     "patch_size": 16, "image_size": 224, "projection_dim": 32}   # ViT-B/16 token grid: 197 tokens


def clip_vision_config_path() -> str:
    """ComfyUI's ViT-L config shrunk to width 32 and 2 layers, with ViT-B/16's patch grid (197 tokens)."""
    import comfy.clip_vision
    base = Path(comfy.clip_vision.__file__).with_name("clip_vision_config_vitl.json")
    return shrunk_config(base, CLIP_VISION_SMALL, "clip_vision_config_small")


_clip_vision_registered = False


def register_test_clip_vision():
    """Let the stock CLIP vision loader (Load CLIP Vision) recognise the small test encoder (test-only): ComfyUI
    picks a config by layer count and knows only full-size towers."""
    global _clip_vision_registered
    setup_comfy()
    if _clip_vision_registered:
        return
    import comfy.clip_vision as cv
    stock = cv.load_clipvision_from_sd

    def load_clipvision_from_sd(sd, prefix="", convert_keys=False):
        weight = sd.get(f"{prefix}vision_model.encoder.layers.0.layer_norm1.weight")
        is_small = (weight is not None and weight.shape[0] == CLIP_VISION_SMALL["hidden_size"]
                    and f"{prefix}vision_model.encoder.layers.2.layer_norm1.weight" not in sd)
        if not is_small:
            return stock(sd, prefix, convert_keys)
        clip = cv.ClipVisionModel(clip_vision_config_path())
        clip.load_sd({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
        return clip

    cv.load_clipvision_from_sd = load_clipvision_from_sd
    _clip_vision_registered = True


def clip_vision_path() -> Path:
    path = CACHE_DIR / "clip_vision" / CLIP_VISION_NAME
    if not path.is_file():
        setup_comfy()
        import comfy.clip_model
        import comfy.ops
        import comfy.utils
        config = json.loads(Path(clip_vision_config_path()).read_text())
        with torch.inference_mode(False):
            module = comfy.clip_model.CLIPVisionModelProjection(config, torch.float32, "cpu", comfy.ops.manual_cast)
            fill_seeded_(module, SEED + 3)
            sd = {k: v.detach().contiguous() for k, v in module.state_dict().items() if "position_ids" not in k}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        comfy.utils.save_torch_file(sd, str(tmp))
        os.replace(tmp, path)
    return path


def load_clip_vision():
    """CLIP_VISION through ComfyUI's own loader function (what Load CLIP Vision calls)."""
    import comfy.clip_vision
    register_test_clip_vision()
    with torch.inference_mode():
        return comfy.clip_vision.load(str(clip_vision_path()))


# -- SD2-v and SDXL layouts (3-layer text encoders: they read the penultimate layer) -------------------------------
def _shrunk_clip_config(base_name: str, overrides: dict, tag: str) -> str:
    """A shrunk copy of one of ComfyUI's CLIP text configs (found in either tree's layout)."""
    import comfy.sd1_clip
    root = Path(comfy.sd1_clip.__file__).parent
    base = next(p for p in (root / base_name, root / "text_encoders" / base_name) if p.is_file())
    return shrunk_config(base, overrides, f"clip_config_{tag}")


def _other_family_class(size: str):
    """A subclass of ComfyUI's own SD20 / SDXL config that matches only the test layout and builds its shrunk
    text encoders; tokenizers are the stock ones."""
    import comfy.sd1_clip as sd1
    import comfy.supported_models as sm
    from comfy import model_base, supported_models_base

    spec = OTHER[size]
    family = "sd2v" if size == "sd2v" else "sdxl"
    stock = sm.SD20 if family == "sd2v" else sm.SDXL
    stock_target = stock.clip_target(None)  # the method does not use self; the stock tokenizer/model classes

    if family == "sd2v":
        h_cfg = _shrunk_clip_config("sd2_clip_config.json", spec["clip"]["h"], f"{size}_h")
        clip_model = partial(sd1.SD1ClipModel, clip_name="h",
                             clip_model=partial(sd1.SDClipModel, layer="hidden", layer_idx=-2,
                                                textmodel_json_config=h_cfg,
                                                special_tokens={"start": 49406, "end": 49407, "pad": 0}))
    else:
        l_cfg = _shrunk_clip_config("sd1_clip_config.json", spec["clip"]["l"], f"{size}_l")
        g_cfg = _shrunk_clip_config("clip_config_bigg.json", spec["clip"]["g"], f"{size}_g")

        class SmallSDXLClip(stock_target.clip):
            """ComfyUI's SDXLClipModel (its encode: CLIP-L and CLIP-G hidden states concatenated, G's pooled
            output) with both towers shrunk."""

            def __init__(self, device="cpu", dtype=None, **kwargs):
                torch.nn.Module.__init__(self)
                self.clip_l = sd1.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                              layer_norm_hidden_state=False, textmodel_json_config=l_cfg, **kwargs)
                self.clip_g = sd1.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                              layer_norm_hidden_state=False, textmodel_json_config=g_cfg,
                                              special_tokens={"start": 49406, "end": 49407, "pad": 0}, **kwargs)
                self.dtypes = {dtype}

        clip_model = SmallSDXLClip

    unet_match = {k: spec["unet"][k] for k in ("model_channels", "context_dim", "use_linear_in_transformer")}
    unet_match["adm_in_channels"] = spec["unet"].get("adm_in_channels")
    if family == "sdxl":
        unet_match["transformer_depth"] = spec["unet"]["transformer_depth"]

    class Config(stock):
        unet_config = {**unet_match, "use_temporal_attention": False}
        unet_extra_config = {**stock.unet_extra_config, "num_heads": -1, "num_head_channels": spec["head_channels"]}

        def model_type(self, state_dict, prefix=""):
            if family == "sd2v":
                return model_base.ModelType.V_PREDICTION   # the test model is v-prediction by construction
            return super().model_type(state_dict, prefix)

        def clip_target(self, state_dict={}):
            return supported_models_base.ClipTarget(stock_target.tokenizer, clip_model)

    Config.__name__ = Config.__qualname__ = f"ICTest_{size}"
    return Config


def full_unet_config(size: str) -> dict:
    if size in OTHER:
        cfg = dict(SD15_UNET)
        cfg.update(OTHER[size]["unet"])
        return cfg
    return unet_config(size)


@torch.no_grad()
def build_other_state_dict(size: str, seed: int = SEED) -> dict:
    """SD2-v / SDXL test checkpoint: build UNet, CLIP and TAESD with ComfyUI's classes, fill them from a seeded
    generator, and save through the model config's own ``state_dict_for_saving`` (what CheckpointSave writes)."""
    setup_comfy()
    import comfy.taesd.taesd

    register_test_model_configs()
    config = _registered[size](copy.deepcopy(full_unet_config(size)))
    config.set_inference_dtype(torch.float32, None)
    base_model = config.get_model({}, "", device=torch.device("cpu"))
    fill_seeded_(base_model.diffusion_model, seed)
    clip = config.clip_target().clip(device="cpu", dtype=torch.float32)
    fill_seeded_(clip, seed + 1)
    clip_sd = {k: v for k, v in clip.state_dict().items() if "position_ids" not in k and "logit_scale" not in k}
    vae = comfy.taesd.taesd.TAESD()
    fill_seeded_(vae, seed + 2)
    sd = checkpoint_state_dict(base_model, clip_sd, vae.state_dict())
    return {k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in sd.items()}


def checkpoint_state_dict(base_model, clip_sd: dict, vae_sd: dict) -> dict:
    """What CheckpointSave writes for ``base_model`` (a ComfyUI BaseModel) with these text-encoder and VAE weights.
    ComfyUI 0.3x's ``state_dict_for_saving`` takes the UNet's state dict first (the ModelPatcher passes it); the
    2024-03 one reads it from the model itself."""
    import inspect
    if "unet_state_dict" in inspect.signature(base_model.state_dict_for_saving).parameters:
        return base_model.state_dict_for_saving(base_model.diffusion_model.state_dict(), clip_sd, vae_sd)
    return base_model.state_dict_for_saving(clip_sd, vae_sd)


def _register_other_families():
    import comfy.supported_models as sm
    for size in OTHER:
        if size not in _registered:
            cls = _other_family_class(size)
            sm.models.insert(0, cls)
            _registered[size] = cls


def load_family(family: str):
    """(MODEL, CLIP, VAE) of a test family (sd15 / sd2v / sdxl) through the stock loader."""
    return load_checkpoint(FAMILIES[family])
