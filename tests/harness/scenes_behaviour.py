"""What each technique does on the scenes model, measured against the generator's own object masks.

Shared by tests/test_behaviour_scenes.py (which asserts) and scripts/scenes_figures.py (which prints every figure as
JSON). Everything runs in-process through the pack's nodes and ComfyUI's stock loader and samplers; each function
returns numbers, never asserts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import demo_model, scenes
from .comfy_env import REPO_ROOT

SCENES_CHECKPOINT_NAME = "ic_demo_scenes.safetensors"
SCENES_CHECKPOINT_PATH = REPO_ROOT / "models" / SCENES_CHECKPOINT_NAME
STEPS = 20
SIZE = scenes.SIZE


def scenes_checkpoint() -> Path:
    """The committed scenes checkpoint, or $IC_SCENES_CKPT (a retrained or intermediate one)."""
    return Path(os.environ.get("IC_SCENES_CKPT") or SCENES_CHECKPOINT_PATH)


@dataclass
class Loaded:
    model: object
    clip: object
    vae: object

    def encode(self, text: str):
        cond, pooled = self.clip.encode_from_tokens(self.clip.tokenize(text), return_pooled=True)
        return [[cond, {"pooled_output": pooled}]]


def load(path=None) -> Loaded:
    return Loaded(*demo_model.load_demo_model(path or scenes_checkpoint()))


def call(cls, **given):
    """A node's function with ``given`` inputs and every other required widget at its INPUT_TYPES default."""
    spec = cls.INPUT_TYPES()
    kwargs = {}
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            if name in given:
                kwargs[name] = given[name]
            elif section == "required":
                options = entry[1] if len(entry) > 1 else {}
                kwargs[name] = options["default"] if "default" in options else entry[0][0]
    unknown = set(given) - set(kwargs)
    if unknown:
        raise TypeError(f"{cls.__name__} has no inputs {unknown}")
    return getattr(cls(), cls.FUNCTION)(**kwargs)


def sample(model, pos, neg, latent, sigmas, cfg):
    """SamplerCustom, ddim, no added noise: deterministic sampling from ``latent`` along ``sigmas``."""
    import comfy.sample
    import comfy.samplers
    sampler = comfy.samplers.sampler_object("ddim")
    return comfy.sample.sample_custom(model, torch.zeros_like(latent), cfg, sampler, sigmas, pos, neg, latent, seed=0)


@dataclass
class Inverted:
    scene: scenes.Scene
    latent: torch.Tensor     # VAE encoding of the drawn scene
    recon: torch.Tensor      # decoded reconstruction at cfg 1 ([1, H, W, 3])
    noise: torch.Tensor
    sigmas: torch.Tensor
    inversion: object


def invert(m: Loaded, scene: scenes.Scene, steps: int = STEPS) -> Inverted:
    from inversion_chain.nodes.invert import ICDDIMInvert
    latent = m.vae.encode(scene.tensor())
    cond = m.encode(scene.caption)
    noise, sigmas, inv = call(ICDDIMInvert, model=m.model, latent={"samples": latent}, positive=cond, steps=steps,
                              refine_iters=6)
    recon = m.vae.decode(sample(m.model, cond, m.encode(""), noise["samples"], sigmas, 1.0))
    return Inverted(scene, latent, recon, noise["samples"], sigmas, inv)


def mask_tensor(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(mask)).float()


def grow(mask: np.ndarray, px: int) -> np.ndarray:
    """The mask dilated by ``px`` pixels (a square structuring element): the edge a 16x16 latent blurs."""
    t = mask_tensor(mask)[None, None]
    return (torch.nn.functional.max_pool2d(t, 2 * px + 1, stride=1, padding=px)[0, 0] > 0).numpy()


# -- attention maps --------------------------------------------------------------------------------------------------
def word_maps(m: Loaded, inv: Inverted, words, cfg: float = 1.0, negative_prompt: str = "",
              branch: str = "cond") -> dict[str, torch.Tensor]:
    """Attention Capture while sampling the inversion back, then Attention Map Viewer's MASK per word ([H, W],
    normalised to sum 1), averaged over every step and the 16x16 and 8x8 layers."""
    from inversion_chain.nodes.attention_maps import ICAttentionCapture, ICAttentionMapViewer
    patched, maps = call(ICAttentionCapture, model=m.model, kinds="cross", resolution="all", clip=m.clip,
                         prompt=inv.scene.caption, negative_prompt=negative_prompt)
    out = sample(patched, m.encode(inv.scene.caption), m.encode(negative_prompt), inv.noise, inv.sigmas, cfg)
    result = {}
    for word in words:
        _grid, mask = call(ICAttentionMapViewer, attn_maps=maps, latent={"samples": out}, tokens=word, branch=branch)
        a = mask[0].double()
        result[word] = a / a.sum()
    return result


def mass_ratio(attn: torch.Tensor, mask: np.ndarray) -> float:
    """Attention mass inside ``mask`` divided by the mask's area share: 1 = no localisation."""
    m = mask_tensor(mask).double()
    return float((attn * m).sum() / m.mean())


def centroid(attn: torch.Tensor) -> tuple[float, float]:
    """(x, y) in pixels of a map that sums to 1."""
    h, w = attn.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=attn.dtype), torch.arange(w, dtype=attn.dtype), indexing="ij")
    return float((attn * xs).sum()), float((attn * ys).sum())


# -- colours ---------------------------------------------------------------------------------------------------------
def rgb(name: str) -> torch.Tensor:
    return torch.tensor(scenes.COLOURS[name], dtype=torch.float32) / 255


def mean_colour(image: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
    """Mean RGB of ``image`` ([1, H, W, 3] or [H, W, 3]) over ``mask``."""
    img = image.reshape(SIZE, SIZE, 3).float()
    m = mask_tensor(mask)
    return (img * m[..., None]).sum((0, 1)) / m.sum()


def mean_abs(a: torch.Tensor, b: torch.Tensor, mask: np.ndarray) -> float:
    """Mean |a - b| over the pixels of ``mask`` (images [1, H, W, 3])."""
    d = (a.reshape(SIZE, SIZE, 3).float() - b.reshape(SIZE, SIZE, 3).float()).abs().mean(-1)
    m = mask_tensor(mask)
    return float((d * m).sum() / m.sum())


def colour_histogram(image: torch.Tensor, bins: int = 4) -> torch.Tensor:
    """Normalised joint RGB histogram (bins^3) of one image [H, W, 3]."""
    q = (image.reshape(-1, 3).clamp(0, 1) * (bins - 1e-6)).long()
    idx = q[:, 0] * bins * bins + q[:, 1] * bins + q[:, 2]
    h = torch.bincount(idx, minlength=bins ** 3).float()
    return h / h.sum()


def colour_mask(image: torch.Tensor, colour: str, tol: float = 0.25) -> torch.Tensor:
    """Pixels within ``tol`` (RGB distance) of a named colour: where a generated picture drew that colour."""
    return (image.reshape(SIZE, SIZE, 3).float() - rgb(colour)).norm(dim=-1) < tol
