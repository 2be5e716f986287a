"""The demo model: a small v-prediction SD1-layout model trained here on four photos (scripts/train_demo_model.py).

Its checkpoint is committed (models/ic_demo_photos.safetensors). The stock checkpoint loader recognises it once
``register_demo_model_config()`` ran (the test node does that in a server, the harness in-process): a UNet with
channel_mult [1, 2] at width 32 and context 64 matches no stock config.
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path

from .comfy_env import REPO_ROOT, setup_comfy
from .models import shrunk_config

CHECKPOINT_NAME = "ic_demo_photos.safetensors"
CHECKPOINT_PATH = REPO_ROOT / "models" / CHECKPOINT_NAME
# The photos it was trained on (scikit-image names) and their captions, 128 px centre crops.
CAPTIONS = {
    "astronaut": "a photo of an astronaut",
    "chelsea": "a photo of a cat",
    "coffee": "a photo of a cup of coffee",
    "rocket": "a photo of a rocket",
}
SIZE = 128
UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
    "transformer_depth": [1, 1], "channel_mult": [1, 2], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 64, "num_heads": -1, "num_head_channels": 16,
    "transformer_depth_output": [1, 1, 1, 1], "use_temporal_attention": False, "use_temporal_resblock": False,
}
CLIP = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2,
        "projection_dim": 64}
# TAESD's vae_scale: the hand-set encoder's output is already unit-scale, so raw latents = output / 0.18215 and
# SD1's latent format (x 0.18215) gives the UNet that unit-scale output back.
VAE_SCALE = 0.18215


def clip_config_path() -> str:
    """ComfyUI's SD1 CLIP config shrunk to width 64 and 2 layers (real vocabulary, tokenizer and 77 positions)."""
    import comfy.sd1_clip
    return shrunk_config(Path(comfy.sd1_clip.__file__).with_name("sd1_clip_config.json"), CLIP,
                         "clip_config_demo_photos")


_registered = []


def register_demo_model_config():
    """Let the stock checkpoint loader recognise the demo model (test/demo only; users never need it)."""
    setup_comfy()
    if _registered:
        return _registered[0]
    import comfy.model_base as model_base
    import comfy.sd1_clip as sd1
    import comfy.supported_models as sm
    from comfy import supported_models_base

    clip_path = clip_config_path()

    class ICDemoPhotosSD15(sm.SD15):
        unet_config = {"context_dim": UNET["context_dim"], "model_channels": UNET["model_channels"],
                       "channel_mult": UNET["channel_mult"], "use_linear_in_transformer": False,
                       "adm_in_channels": None, "use_temporal_attention": False}
        unet_extra_config = {"num_heads": UNET["num_heads"], "num_head_channels": UNET["num_head_channels"]}

        def model_type(self, state_dict, prefix=""):
            return model_base.ModelType.V_PREDICTION

        def clip_target(self, state_dict={}):
            target = supported_models_base.ClipTarget(sd1.SD1Tokenizer, sd1.SD1ClipModel)
            target.params["clip_model"] = partial(sd1.SDClipModel, textmodel_json_config=clip_path)
            return target

    sm.models.insert(0, ICDemoPhotosSD15)
    _registered.append(ICDemoPhotosSD15)
    return ICDemoPhotosSD15


def checkpoint_path() -> Path:
    """The committed checkpoint, or $IC_DEMO_CKPT (e.g. a retrained one, to run the behaviour tests on it)."""
    return Path(os.environ.get("IC_DEMO_CKPT") or CHECKPOINT_PATH)


def load_demo_model(path=None):
    """(MODEL, CLIP, VAE) through ComfyUI's own loader, as CheckpointLoaderSimple does."""
    import torch
    import comfy.sd
    register_demo_model_config()
    with torch.inference_mode():
        out = comfy.sd.load_checkpoint_guess_config(str(path or checkpoint_path()), output_vae=True, output_clip=True)
    return out[0], out[1], out[2]
