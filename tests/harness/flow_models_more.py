"""Small random-weight Qwen-Image and SD3.5 (MMDiT) test models built from ComfyUI's own classes; the sibling of
``flow_models.py`` (Flux, Chroma), which dispatches these two families here.

- Diffusion models: ComfyUI's own model configs build them (``comfy.supported_models.QwenImage`` / ``SD3``), every
  parameter filled from a seeded generator, saved as ``.safetensors`` files that the stock UNETLoader reads.
  SD3.5: the stock detection infers every size of an MMDiT from the state dict (hidden = 64 x depth, one head of 64
  per block, ``pos_embed`` size, pooled width, context width, RMS q/k norm, dual-attention layers), so the file is
  an SD3.5-medium-style layout (q/k RMSNorm, a second image self-attention in block 0) of depth 2; ``pos_embed`` is
  the 2-D sin-cos table ComfyUI's mmdit.py computes (what the real checkpoints carry). Qwen-Image: the stock
  detection reads only the input channels and the block count (heads, head width and text width are the class
  defaults of the 20B model), so a test-only subclass of ComfyUI's ``QwenImage`` config, registered at the front
  of ``comfy.supported_models.models``, matches only this small layout (text width ``QWEN_TE["hidden_size"]``)
  and gives the class its sizes, as flow_models.py does for Chroma.
- Text encoders, built in process as ``comfy.sd.CLIP`` from ComfyUI's own classes with shrunk configs (the
  ``*_model_config`` model options that ``SDClipModel`` reads) and the tree's real tokenizers:
  SD3: ``SD3Tokenizer`` + ``sd3_clip`` (CLIP-L + CLIP-G + T5). ``SD3ClipModel`` pads the CLIP features to 4096 and
  concatenates T5's tokens to them, so T5 keeps its real width 4096 (two thin blocks) and CLIP-L/G are shrunk.
  Qwen-Image: ``QwenImageTokenizer`` (Qwen2.5 tokenizer and Qwen-Image's chat template) + ``qwen_image.te`` with a
  shrunk ``Qwen25_7BVLI`` language model. Why not the stock CLIPLoader: its ``detect_te_model`` recognises
  Qwen2.5-7B by ``k_proj.bias`` width 512 and T5-XXL by its 24th block, then builds the full-size config of each
  (``Qwen25_7BVLI_Config`` / ``t5_config_xxl.json``), whatever the file's shapes, so a shrunk encoder cannot load.
  ``Qwen25_7BVLI`` always builds its vision tower at full size (hard-coded widths); it reads only image prompts
  (Qwen-Image-Edit), which these tests never give, so it is left as ComfyUI allocates it and not filled.
- VAE: SD3 latents have 16 channels: the 16-channel TAESD of flow_models.py (taesd3 has taef1's layout). Qwen-Image
  uses the Wan 2.1 VAE: a ``comfy.ldm.wan.vae.WanVAE`` of width ``WAN_VAE_DIM`` (the stock VAE loader infers the
  width from ``decoder.head.0.gamma``) with its 16 latent channels.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import flow_models, models
from .comfy_env import CACHE_DIR, comfy_version, setup_comfy

FAMILIES = ("qwen_image", "sd3")
SUPPORTED_CLASS = {"qwen_image": "QwenImage", "sd3": "SD3"}
WAN_VAE_NAME = "ic_test_wan21_vae_small.safetensors"
SEEDS = {"qwen_image": models.SEED + 50, "sd3": models.SEED + 51, "wan_vae": models.SEED + 52, "te": models.SEED + 53}

QWEN_TE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 1}     # vocab 152064 kept (tokenizer); head width 128 is the class's
# CLIP-L / CLIP-G of SD3 read the penultimate layer: three layers each
SD3_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3,
            "projection_dim": 32}
SD3_T5 = {**flow_models.T5_SMALL, "d_model": 4096}
QWEN_HEAD = 128        # Qwen-Image's head width = its RoPE axes 16 + 56 + 56
QWEN_DIT = {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 2,
            "num_attention_heads": 1, "attention_head_dim": QWEN_HEAD, "joint_attention_dim": QWEN_TE["hidden_size"]}
QWEN_SIZES = {k: QWEN_DIT[k] for k in ("num_attention_heads", "attention_head_dim", "joint_attention_dim")}
SD3_DEPTH = 2
SD3_POS_EMBED = 16      # pos_embed_max_size: 16 x 16 patches (a 256 px image)
# What ComfyUI's MMDiT detection finds in the saved state dict.
SD3_DIT = {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": SD3_DEPTH, "input_size": None,
           "adm_in_channels": 2 * SD3_CLIP["hidden_size"],
           "context_embedder_config": {"target": "torch.nn.Linear",
                                       "params": {"in_features": 4096, "out_features": 64 * SD3_DEPTH}},
           "num_patches": SD3_POS_EMBED ** 2, "pos_embed_max_size": SD3_POS_EMBED, "qk_norm": "rms",
           "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [0]}
WAN_VAE_DIM = 8


def missing_layout(family: str) -> str | None:
    """None when this tree's class builds this file's layout; else why not (the tree has SD3 but not SD3.5)."""
    if family == "sd3":
        import inspect
        from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
        if "x_block_self_attn_layers" not in inspect.signature(MMDiT.__init__).parameters:
            return (f"this ComfyUI tree ({comfy_version()}) has SD3 but not SD3.5's MMDiT layouts "
                    f"(x_block_self_attn_layers, from 2024-10, 13b0ff8a)")
    return None


_qwen_cls = None


def register_test_qwen_image():
    """A subclass of ComfyUI's QwenImage config that matches only this small layout and carries its sizes (the
    stock detection takes heads, head width and text width from the 20B model's defaults)."""
    global _qwen_cls
    setup_comfy()
    if _qwen_cls is not None:
        return _qwen_cls
    import comfy.supported_models as sm

    class ICTestQwenImage(sm.QwenImage):
        @classmethod
        def matches(cls, unet_config, state_dict=None, unet_key_prefix="", **kwargs):
            sd = state_dict or {}
            norm, img_in = sd.get(f"{unet_key_prefix}txt_norm.weight"), sd.get(f"{unet_key_prefix}img_in.weight")
            return (unet_config.get("image_model") == "qwen_image" and norm is not None and img_in is not None
                    and tuple(norm.shape) == (QWEN_SIZES["joint_attention_dim"],)
                    and img_in.shape[0] == QWEN_SIZES["num_attention_heads"] * QWEN_HEAD)

        def __init__(self, unet_config):
            super().__init__({**unet_config, **QWEN_SIZES})

    sm.models.insert(0, ICTestQwenImage)
    _qwen_cls = ICTestQwenImage
    return ICTestQwenImage


def _fill_sd3_pos_embed_(net):
    """The fixed 2-D sin-cos position table of SD3's checkpoints, from ComfyUI's own mmdit.py function."""
    from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed
    table = get_2d_sincos_pos_embed(net.hidden_size, SD3_POS_EMBED)
    net.pos_embed.copy_(torch.from_numpy(table).float().reshape(net.pos_embed.shape))


@torch.no_grad()
def build_state_dict(family: str) -> dict:
    import comfy.supported_models as sm
    cls = register_test_qwen_image() if family == "qwen_image" else sm.SD3
    with torch.inference_mode(False):
        config = cls(dict(QWEN_DIT if family == "qwen_image" else SD3_DIT))
        config.set_inference_dtype(torch.float32, None)
        base = config.get_model({}, "", device=torch.device("cpu"))
        net = base.diffusion_model
        flow_models.fill_flow_seeded_(net, SEEDS[family])
        if family == "sd3":
            _fill_sd3_pos_embed_(net)
        return {k: v.clone() for k, v in net.state_dict().items()}


def before_load(family: str):
    if family == "qwen_image":
        register_test_qwen_image()


def wan_vae_path() -> Path:
    path = CACHE_DIR / "vae" / WAN_VAE_NAME
    if not path.is_file():
        setup_comfy()
        import comfy.ldm.wan.vae as wan
        with torch.inference_mode(False), torch.no_grad():
            vae = wan.WanVAE(dim=WAN_VAE_DIM, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                             temperal_downsample=[False, True, True], dropout=0.0)
            flow_models.fill_flow_seeded_(vae, SEEDS["wan_vae"])
            # RMS_norm's gamma is its scale: one, as a trained VAE's start
            for name, p in vae.named_parameters():
                if name.endswith("gamma"):
                    p.fill_(1.0)
            sd = {k: v.clone() for k, v in vae.state_dict().items()}
        flow_models._save(sd, path)
    return path


def load_vae(family: str):
    """VAE through the stock VAE loader's constructor (``comfy.sd.VAE(sd=...)`` on the file's state dict)."""
    if family == "sd3":
        return flow_models.load_vae()
    import comfy.sd
    import comfy.utils
    with torch.inference_mode():
        return comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(wan_vae_path())))


def load_clip(family: str):
    import comfy.sd
    import comfy.supported_models_base as smb
    if family == "sd3":
        import comfy.text_encoders.sd3_clip as te
        target = smb.ClipTarget(te.SD3Tokenizer, te.sd3_clip(clip_l=True, clip_g=True, t5=True))
        options = {"t5xxl_model_config": dict(SD3_T5), "clip_l_model_config": dict(SD3_CLIP),
                   "clip_g_model_config": dict(SD3_CLIP)}
    else:
        import comfy.text_encoders.qwen_image as te
        target = smb.ClipTarget(te.QwenImageTokenizer, te.te())
        options = {"qwen25_7b_model_config": dict(QWEN_TE)}
    with torch.inference_mode(False), torch.no_grad():
        clip = comfy.sd.CLIP(target=target, model_options={**options, "dtype": torch.float32})
        encoder = clip.cond_stage_model
        if family == "qwen_image":   # the language model only; see the module docstring for the vision tower
            encoder = encoder.qwen25_7b.transformer.model
        flow_models.fill_flow_seeded_(encoder, SEEDS["te"])
    return clip
