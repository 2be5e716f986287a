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


# -- the measurements the behaviour tests assert and scripts/scenes_figures.py prints ---------------------------------
PLACEMENTS = {"left": (8, 40), "right": (72, 40), "top": (40, 8), "bottom": (40, 72)}
OBJECT_SIZE = 48


def placed_scene(where: str, colour: str = "red", shape: str = "circle", background: str = "yellow") -> scenes.Scene:
    return scenes.render(background, [(colour, shape, PLACEMENTS[where] + (OBJECT_SIZE,))])


def localisation(m: Loaded, where: str) -> dict:
    """One object at ``where``: each word's mass ratio inside the object, the same map's ratio inside the mirror
    image of the object (the control: a flipped or transposed map scores there), and the map's centroid."""
    scene = placed_scene(where)
    obj = scene.objects[0]
    inv = invert(m, scene)
    maps = word_maps(m, inv, [obj.colour, obj.shape])
    mirror = obj.mask[::-1, ::-1]
    out = {"centre": ((obj.box[0] + obj.box[2]) / 2, (obj.box[1] + obj.box[3]) / 2)}
    for word, attn in maps.items():
        out[word] = {"ratio": mass_ratio(attn, obj.mask), "mirror_ratio": mass_ratio(attn, mirror),
                     "centroid": centroid(attn)}
    return out


def p2plus_edit(m: Loaded, inv: Inverted, target: str, mode: str = "replace", reweight: str = "",
                blend_words: str = "", cfg: float = 1.0):
    """(reconstruction row, edited row) of P2Plus on the inverted scene, sampled back at ``cfg`` (negative-prompt
    inversion when cfg > 1)."""
    from inversion_chain.nodes.p2plus import ICNullTextInversion, ICP2PlusController
    caption = inv.scene.caption
    null_text = None
    if cfg > 1:
        null_text = call(ICNullTextInversion, model=m.model, inversion=inv.inversion, positive=m.encode(caption),
                         negative=m.encode(""), cfg=cfg, method="negative-prompt")[0]
    model, pos, neg, latent, sigmas = call(ICP2PlusController, model=m.model, clip=m.clip, source_prompt=caption,
                                           target_prompt=target, mode=mode, reweight=reweight,
                                           blend_words=blend_words, inversion=inv.inversion, null_text=null_text)
    images = m.vae.decode(sample(model, pos, neg, latent["samples"], sigmas, cfg))
    return images[:1], images[1:2]


def swap_figures(m: Loaded, inv: Inverted, edited, colour_to: str) -> dict:
    """Where an edit changed the scene: inside its object, in the ring around it, outside both; and how far the
    object's mean colour moved toward ``colour_to``."""
    recon, edit = edited
    obj = inv.scene.objects[0].mask
    near = grow(obj, 12)
    return {"inside_change": mean_abs(edit, recon, obj), "outside_change": mean_abs(edit, recon, ~near),
            "to_target_before": float((mean_colour(recon, obj) - rgb(colour_to)).norm()),
            "to_target_after": float((mean_colour(edit, obj) - rgb(colour_to)).norm()),
            "recon_vs_inversion": mean_abs(recon, inv.recon, np.ones_like(obj))}


def kv_inject_figures(m: Loaded, inv: Inverted, target: str, cfg: float = 5.0, seed: int | None = 0,
                      **kv_inputs) -> dict:
    """KV Inject vs plain sampling with the same target prompt from the same start: a new generation from seeded
    noise (``seed``; MasaCtrl's use), or the source's inverted noise (``seed=None``). Distance to the source
    reconstruction outside the object (and the square it may become), and the object's colour."""
    from inversion_chain.nodes.kv_inject import ICKVInject
    pos, neg = m.encode(target), m.encode("")
    patched = call(ICKVInject, model=m.model, inversion=inv.inversion, negative=neg, **kv_inputs)[0]
    start = inv.noise
    if seed is not None:
        start = torch.randn(inv.noise.shape, generator=torch.Generator().manual_seed(seed)) * inv.sigmas[0]
    kv = m.vae.decode(sample(patched, pos, neg, start, inv.sigmas, cfg))
    plain = m.vae.decode(sample(m.model, pos, neg, start, inv.sigmas, cfg))
    obj = inv.scene.objects[0]
    square = scenes.render(inv.scene.background, [(obj.colour, "square", obj.box[:2] + (obj.box[2] - obj.box[0],))])
    outside = ~grow(obj.mask | square.objects[0].mask, 8)
    return {"kv_outside": mean_abs(kv, inv.recon, outside), "plain_outside": mean_abs(plain, inv.recon, outside),
            "kv_object_colour": float((mean_colour(kv, obj.mask) - rgb(obj.colour)).norm()),
            "plain_object_colour": float((mean_colour(plain, obj.mask) - rgb(obj.colour)).norm()),
            "images": (kv, plain)}


def rival_figures(m: Loaded, inv: Inverted, batch: int = 4, cfg: float = 5.0, seed: int = 0) -> dict:
    """RIVAL variations vs plain text-to-image with the same prompt and seed: colour-histogram distance to the
    source scene as the VAE decodes it (L1 of 4x4x4-bin histograms, 0..2) and where each variation drew the object's
    colour."""
    import nodes
    from inversion_chain.nodes.rival import ICRIVALAlignSampler
    pos, neg = m.encode(inv.scene.caption), m.encode("")
    variations = m.vae.decode(call(ICRIVALAlignSampler, model=m.model, positive=pos, negative=neg,
                                   inversion=inv.inversion, seed=seed, batch_size=batch, cfg=cfg)[0]["samples"])
    empty = {"samples": torch.zeros((batch,) + tuple(inv.latent.shape[1:]))}
    plain = m.vae.decode(nodes.common_ksampler(m.model, seed, STEPS, cfg, "ddim", "ddim_uniform", pos, neg,
                                               empty)[0]["samples"])
    source = colour_histogram(m.vae.decode(inv.latent)[0])
    colour = inv.scene.objects[0].colour
    centres = []
    for img in variations:
        drawn = colour_mask(img, colour, tol=0.35).double()
        centres.append(centroid(drawn / drawn.sum()) if drawn.sum() > 0 else None)
    pairs = [float((variations[i] - variations[j]).abs().mean()) for i in range(batch) for j in range(i + 1, batch)]
    return {"rival_hist": [float((colour_histogram(v) - source).abs().sum()) for v in variations],
            "pairwise_difference": pairs, "to_source_psnr": [psnr(v, inv.recon[0]) for v in variations],
            "plain_hist": [float((colour_histogram(v) - source).abs().sum()) for v in plain],
            "object_centres": centres, "images": (variations, plain)}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a.float() - b.float()) ** 2).mean()))


def guidance_inversion_figures(m: Loaded, inv: Inverted, cfg: float = 7.5) -> dict:
    """Reconstruction PSNR (vs the VAE's own reconstruction of the scene) at cfg 1, plain DDIM at ``cfg``, and
    null-text / negative-prompt inversion at ``cfg`` through P2Plus with the source prompt as target."""
    from inversion_chain.nodes.p2plus import ICNullTextInversion, ICP2PlusController
    caption = inv.scene.caption
    pos, neg = m.encode(caption), m.encode("")
    ref = m.vae.decode(inv.latent)
    out = {"cfg1": psnr(inv.recon, ref),
           "plain": psnr(m.vae.decode(sample(m.model, pos, neg, inv.noise, inv.sigmas, cfg)), ref)}
    for method in ("null-text", "negative-prompt"):
        nt = call(ICNullTextInversion, model=m.model, inversion=inv.inversion, positive=pos, negative=neg, cfg=cfg,
                  method=method)[0]
        model, p2, n2, latent, sigmas = call(ICP2PlusController, model=m.model, clip=m.clip, source_prompt=caption,
                                             target_prompt=caption, inversion=inv.inversion, null_text=nt)
        out[method] = psnr(m.vae.decode(sample(model, p2, n2, latent["samples"], sigmas, cfg))[:1], ref)
    return out
