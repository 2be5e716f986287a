"""What each technique does on the scenes model, measured against the generator's own object masks.

Shared by tests/test_behaviour_scenes.py (which asserts) and scripts/scenes_figures.py (which prints every figure as
JSON). Everything runs in-process through the pack's nodes and ComfyUI's stock loader and samplers; each function
returns numbers, never asserts.
"""
from __future__ import annotations

import dataclasses
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


def seeded_start(m: Loaded, inv: Inverted, seed: int) -> torch.Tensor:
    """A new generation's start for ``sample``: seeded unit noise at the first sigma, in the model's own latent
    space, handed over as a raw latent (``sample`` scales its input by the latent format, as every sampler does)."""
    noise = torch.randn(inv.noise.shape, generator=torch.Generator().manual_seed(seed)) * inv.sigmas[0]
    return m.model.model.process_latent_out(noise)


def kv_inject_figures(m: Loaded, inv: Inverted, target: str, cfg: float = 5.0, seed: int | None = 0,
                      **kv_inputs) -> dict:
    """KV Inject vs plain sampling with the same target prompt from the same start: a new generation from seeded
    noise (``seed``; MasaCtrl's use), or the source's inverted noise (``seed=None``). Distance to the source
    reconstruction outside the object (and the square it may become), and the object's colour."""
    from inversion_chain.nodes.kv_inject import ICKVInject
    pos, neg = m.encode(target), m.encode("")
    patched = call(ICKVInject, model=m.model, inversion=inv.inversion, negative=neg, **kv_inputs)[0]
    start = inv.noise if seed is None else seeded_start(m, inv, seed)
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


# -- map paths: the viewer's branches and tiles, P2Plus's local-blend maps, KV Inject's masked-mode maps ---------------
def upsampled(attn: torch.Tensor) -> torch.Tensor:
    """A map of any grid at SIZE x SIZE (bilinear, as the viewer upsamples), non-negative, summing to 1."""
    from inversion_chain.attention.viewer.map_view import upsample
    a = upsample(attn.float(), (SIZE, SIZE)).double().clamp_min(0)
    return a / a.sum()


def top_mask(attn: torch.Tensor, share: float) -> torch.Tensor:
    """The ``share`` of the pixels where the map is highest (bool [H, W])."""
    k = max(1, int(round(share * attn.numel())))
    cut = attn.flatten().topk(k).values[-1]
    return attn >= cut


def agreement(a: torch.Tensor, b: torch.Tensor, share: float = 0.2) -> dict:
    """Two maps (summing to 1, same size) on the same picture: the distance (px) between the centroids of their top
    ``share`` of pixels (where each map puts the word; the centroid of the whole mass would also measure how much
    of it is spread evenly over the picture, which pulls it to the centre), the IoU of those regions, and the
    Pearson correlation of the values (1: the same map up to scale)."""
    ma, mb = top_mask(a, share), top_mask(b, share)
    (ax, ay), (bx, by) = centroid(ma.double() / ma.sum()), centroid(mb.double() / mb.sum())
    da, db = a.flatten() - a.mean(), b.flatten() - b.mean()
    return {"centroid_px": float(((ax - bx) ** 2 + (ay - by) ** 2) ** 0.5),
            "iou": float((ma & mb).sum() / (ma | mb).sum()),
            "corr": float((da * db).sum() / (da.norm() * db.norm()).clamp_min(1e-30))}


def tile_map(grid: torch.Tensor, tile_hw=(SIZE, SIZE)) -> torch.Tensor:
    """The first tile of an Attention Map Viewer grid (no background image), read back into values 0..1 through its
    colour scale: what a user sees, as a map."""
    from inversion_chain.attention.viewer.map_view import colorize, layout
    x, y = layout(1, tile_hw).tile_origin(0)
    tile = grid[0, y:y + tile_hw[0], x:x + tile_hw[1]].float()
    ramp = colorize(torch.linspace(0, 1, 256))                              # (256, 3)
    index = torch.cdist(tile.reshape(-1, 3), ramp).argmin(-1)
    return (index.float() / 255).reshape(tile_hw)


def map_paths(m: Loaded, where: str = "left", word: str = "circle", negative_prompt: str = "a circle",
              cfg: float = 1.5, control_word: str = "background", map_sizes=("auto",)) -> dict:
    """The same scene's ``word`` map from every family-independent path, each upsampled to SIZE x SIZE:
    viewer MASK of the cond and uncond branches (the uncond branch's prompt ``negative_prompt`` also names the word;
    sampled at ``cfg`` so the uncond half runs), the viewer's rendered tile read back, P2Plus's local-blend maps
    (source row, summed over steps and layers) and KV Inject masked mode's source and target maps (summed over
    steps), once per ``map_sizes`` (their inputs blend_map_size / mask_map_size; keys "p2plus local blend" for
    auto, "p2plus local blend latent/1" for latent/1). Returns the maps (key "maps") and the scene."""
    from inversion_chain.attention.core.patching import controller_of
    from inversion_chain.attention.editors.kv_inject import KVInjectEditor
    from inversion_chain.attention.editors.local_blend import LocalBlend
    from inversion_chain.nodes.attention_maps import ICAttentionCapture, ICAttentionMapViewer
    from inversion_chain.nodes.kv_inject import ICKVInject
    from inversion_chain.nodes.p2plus import ICP2PlusController
    scene = placed_scene(where)
    inv = invert(m, scene)
    caption = scene.caption
    pos, neg = m.encode(caption), m.encode(negative_prompt)
    maps = {}
    patched, captured = call(ICAttentionCapture, model=m.model, kinds="cross", resolution="all", clip=m.clip,
                             prompt=caption, negative_prompt=negative_prompt)
    out = {"samples": sample(patched, pos, neg, inv.noise, inv.sigmas, cfg)}
    for name, tokens, branch in (("viewer cond", word, "cond"), ("viewer uncond", word, "uncond"),
                                 (f"viewer cond '{control_word}' (control)", control_word, "cond")):
        grid, mask = call(ICAttentionMapViewer, attn_maps=captured, latent=out, tokens=tokens, branch=branch)
        maps[name] = upsampled(mask[0])
        if name == "viewer cond":
            maps["viewer tile"] = upsampled(tile_map(grid))
    # the viewer at cfg 1 (the P2Plus and KV runs below are at cfg 1 too), each resolution alone
    patched, captured = call(ICAttentionCapture, model=m.model, kinds="cross", resolution="all", clip=m.clip,
                             prompt=caption)
    out = {"samples": sample(patched, pos, m.encode(""), inv.noise, inv.sigmas, 1.0)}
    for resolution in ("latent/1", "latent/2"):          # the 16x16 and the 8x8 layers
        mask = call(ICAttentionMapViewer, attn_maps=captured, latent=out, tokens=word, resolution=resolution)[1]
        maps[f"viewer cond {resolution}"] = upsampled(mask[0])
    for size in map_sizes:
        # P2Plus: the local blend's own record of the word (row 0: the source prompt), at blend_map_size ``size``
        suffix = "" if size == "auto" else f" {size}"
        model, p2pos, p2neg, latent, sigmas = call(ICP2PlusController, model=m.model, clip=m.clip,
                                                   source_prompt=caption, target_prompt=caption, blend_words=word,
                                                   inversion=inv.inversion, blend_map_size=size)
        sample(model, p2pos, p2neg, latent["samples"], sigmas, 1.0)
        blend = next(f for f in model.model_options.get("sampler_post_cfg_function", []) if isinstance(f, LocalBlend))
        maps["p2plus local blend" + suffix] = upsampled(torch.stack(list(blend.maps.values())).sum(0)[0])
        # KV Inject masked mode: the source's maps (reference) and the target's own maps, step by step
        kv = call(ICKVInject, model=m.model, inversion=inv.inversion, mode="masked", mask_words=word, clip=m.clip,
                  source_prompt=caption, target_prompt=caption, start_percent=0.0, start_layer=0,
                  mask_map_size=size)[0]
        editor = next(e for e in controller_of(kv).editors if isinstance(e, KVInjectEditor))
        seen = {}

        def masks(step, ctx, editor=editor, seen=seen, original=editor.masks):   # the target's maps, observed
            current = editor.target_maps.current(step)
            if current is not None:
                seen[step] = current[0].clone()
            return original(step, ctx)
        editor.masks = masks
        sample(kv, pos, m.encode(""), inv.noise, inv.sigmas, 1.0)
        source = torch.stack(list(editor.reference.cross_maps.values())).sum((0, 1)).float()
        maps["kv masked source" + suffix] = upsampled(source)
        maps["kv masked target" + suffix] = upsampled(torch.stack(list(seen.values())).sum(0))
    return {"scene": scene, "maps": maps}


LATENT4_PATHS = ("p2plus local blend", "kv masked source", "kv masked target")
AUTO_LEVEL_SIZE = "latent/2"    # what blend_map_size / mask_map_size auto (min(latent/4, the coarsest)) reads here


def map_path_figures(m: Loaded, where: str = "left", share: float = 0.2, map_sizes=("auto",)) -> dict:
    """Each path's agreement (centroid distance, IoU of the top ``share``) with the viewer's cond map at the same
    resolution: all captured layers for the viewer's own paths, the layers of the map size for P2Plus's local blend
    and KV Inject's masked mode (auto: min(latent/4, the coarsest) = the 8x8 latent/2 layers here; keys with the
    size appended for the other ``map_sizes``); and each map's mass ratio inside the object. Controls: the viewer
    map mirrored (both axes), another word's map, each size's local-blend map mirrored."""
    got = map_paths(m, where, map_sizes=map_sizes)
    maps, obj = got["maps"], got["scene"].objects[0].mask
    viewer_of = {}
    for size in map_sizes:
        suffix = "" if size == "auto" else f" {size}"
        for path in LATENT4_PATHS:
            viewer_of[path + suffix] = f"viewer cond {AUTO_LEVEL_SIZE if size == 'auto' else size}"
    out = {}
    for name, attn in maps.items():
        ref = maps[viewer_of.get(name, "viewer cond")]
        out[name] = dict(agreement(ref, attn, share), ratio=mass_ratio(attn, obj))
    ref = maps["viewer cond"]
    mirrored = ref.flip(0, 1)
    out["viewer cond mirrored (control)"] = dict(agreement(ref, mirrored, share), ratio=mass_ratio(mirrored, obj))
    for size in map_sizes:
        suffix = "" if size == "auto" else f" {size}"
        flipped = maps["p2plus local blend" + suffix].flip(0, 1)
        out[f"p2plus local blend{suffix} mirrored (control)"] = dict(
            agreement(maps[viewer_of["p2plus local blend" + suffix]], flipped, share), ratio=mass_ratio(flipped, obj))
    return out


# -- P2Plus: local blend over thresholds, reweight, refine ------------------------------------------------------------
def p2plus_run(m: Loaded, inv: Inverted, target: str, cfg: float = 5.0, **controller):
    """(reconstruction row, edited row, the local blend's last mask or None): P2Plus on the inverted scene with
    negative-prompt inversion at ``cfg``."""
    from inversion_chain.attention.editors.local_blend import LocalBlend
    from inversion_chain.nodes.p2plus import ICNullTextInversion, ICP2PlusController
    caption = inv.scene.caption
    null_text = call(ICNullTextInversion, model=m.model, inversion=inv.inversion, positive=m.encode(caption),
                     negative=m.encode(""), cfg=cfg, method="negative-prompt")[0]
    model, pos, neg, latent, sigmas = call(ICP2PlusController, model=m.model, clip=m.clip, source_prompt=caption,
                                           target_prompt=target, inversion=inv.inversion, null_text=null_text,
                                           **controller)
    images = m.vae.decode(sample(model, pos, neg, latent["samples"], sigmas, cfg))
    blend = [f for f in model.model_options.get("sampler_post_cfg_function", []) if isinstance(f, LocalBlend)]
    mask = None
    if blend and blend[0].last_mask is not None:
        mask = torch.nn.functional.interpolate(blend[0].last_mask.float().reshape(1, 1, *blend[0].last_mask.shape[-2:]),
                                               size=(SIZE, SIZE), mode="nearest")[0, 0].bool().numpy()
    return images[:1], images[1:2], mask


def region_figures(inv: Inverted, recon, edit, colour_to: str | None = None, mask=None) -> dict:
    """An edit's change inside the object, in rings of 12 and 24 px around it, outside those; with a local-blend
    ``mask`` also outside it (where the blend keeps the source row) and the share of the picture it covers."""
    obj = inv.scene.objects[0].mask
    out = {"inside_change": mean_abs(edit, recon, obj), "outside_12px": mean_abs(edit, recon, ~grow(obj, 12)),
           "outside_24px": mean_abs(edit, recon, ~grow(obj, 24))}
    if colour_to is not None:
        out["to_target_before"] = float((mean_colour(recon, obj) - rgb(colour_to)).norm())
        out["to_target_after"] = float((mean_colour(edit, obj) - rgb(colour_to)).norm())
    if mask is not None:
        out["blend_mask_share"] = float(mask.mean())
        out["blend_mask_covers_object"] = float(mask[obj].mean())
        out["outside_blend_mask"] = mean_abs(edit, recon, ~mask) if (~mask).any() else None
    return out


def blend_key(map_size: str, threshold: float) -> str:
    """local_blend_figures' key for local blend on 'circle' at ``map_size`` and ``threshold``."""
    return f"blend circle {threshold}" if map_size == "auto" else f"blend circle {map_size} {threshold}"


def local_blend_figures(m: Loaded, inv: Inverted, thresholds=(0.3, 0.5, 0.7, 0.9), cfg: float = 5.0,
                        map_sizes=("auto",)) -> dict:
    """'red circle' -> 'green circle' with local blend on the object word 'circle', per ``blend_map_size`` and
    ``blend_threshold`` (keys "blend circle 0.7" for auto, "blend circle latent/1 0.7" for the others); and without
    local blend (the reference; "no_blend_outside_blend_mask": its change where that threshold's mask keeps the
    source row)."""
    target = inv.scene.caption.replace("red", "green")
    recon, free, _ = p2plus_run(m, inv, target, cfg)
    out = {"no blend": region_figures(inv, recon, free, "green")}
    for size, t in ((size, t) for size in map_sizes for t in thresholds):
        recon, edit, mask = p2plus_run(m, inv, target, cfg, blend_words="circle", blend_threshold=t,
                                       blend_map_size=size)
        fig = out[blend_key(size, t)] = region_figures(inv, recon, edit, "green", mask)
        fig["no_blend_outside_blend_mask"] = mean_abs(free, recon, ~mask) if (~mask).any() else None
    return out


def reweight_refine_figures(m: Loaded, inv: Inverted, cfg: float = 5.0,
                            reweights=("circle:-2", "circle:0", "circle:2", "red:-2", "red:0", "red:2")) -> dict:
    """Reweight of the shape and colour words (inside vs outside the object), and refine: the scene inverted with
    'a circle on a yellow background' (no colour word), edited to '... green circle ...' (the word applies to the
    circle) and, as the control, to '... on a green background' (it applies outside)."""
    caption = inv.scene.caption
    out = {}
    for rw in reweights:
        recon, edit, _ = p2plus_run(m, inv, caption, cfg, mode="reweight", reweight=rw)
        out[f"reweight {rw}"] = region_figures(inv, recon, edit)
    bare = caption.replace("red ", "")
    inv_bare = invert(m, dataclasses.replace(inv.scene, caption=bare))
    for name, target, colour in (("refine 'green' on the circle", bare.replace("a circle", "a green circle"), "green"),
                                 ("refine 'green' on the background (control)",
                                  bare.replace("yellow background", "green background"), "green")):
        recon, edit, _ = p2plus_run(m, inv_bare, target, cfg, mode="refine")
        out[name] = region_figures(inv_bare, recon, edit, colour)
        out[name]["background_to_green_before"] = float((mean_colour(recon, ~grow(inv.scene.objects[0].mask, 12))
                                                         - rgb("green")).norm())
        out[name]["background_to_green_after"] = float((mean_colour(edit, ~grow(inv.scene.objects[0].mask, 12))
                                                        - rgb("green")).norm())
    return out


# -- KV Inject masked mode: the object moves, its colours come from the source -----------------------------------------
def object_region(image: torch.Tensor, background: str, tol: float = 0.3) -> np.ndarray:
    """Where a picture is not its background colour (bool [H, W]): the object(s) it drew."""
    return ((image.reshape(SIZE, SIZE, 3).float() - rgb(background)).norm(dim=-1) > tol).numpy()


def kv_masked_figures(m: Loaded, inv: Inverted, target: str | None = None, seeds=(0, 1, 2), cfg: float = 5.0,
                      settings: dict | None = None, modes=("masked", "mutual", "plain"),
                      mask_map_size: str = "auto") -> dict:
    """New generations from seeded noise (the object lands elsewhere) with ``target`` (default: the source caption)
    and the source's K/V in masked mode, mutual mode, or plain sampling. Per seed: the object's pixels (those nearer
    the source object's colour than the source background's), their centroid and their mean colour's distance to
    the source object's colour, and the colour-histogram distance of the picture to the source. ``mask_map_size``:
    the masked mode's map size (KV Inject's input)."""
    from inversion_chain.nodes.kv_inject import ICKVInject
    settings = settings or {}
    obj = inv.scene.objects[0]
    target = target or inv.scene.caption
    pos, neg = m.encode(target), m.encode("")
    models = {"plain": m.model}
    if "masked" in modes:
        models["masked"] = call(ICKVInject, model=m.model, inversion=inv.inversion, negative=neg, mode="masked",
                                clip=m.clip, mask_words=obj.shape, source_prompt=inv.scene.caption,
                                target_prompt=target, mask_map_size=mask_map_size, **settings)[0]
    if "mutual" in modes:
        models["mutual"] = call(ICKVInject, model=m.model, inversion=inv.inversion, negative=neg, mode="mutual",
                                **settings)[0]
    source_hist = colour_histogram(inv.recon[0])
    out = {"source_centre": ((obj.box[0] + obj.box[2]) / 2, (obj.box[1] + obj.box[3]) / 2)}
    for name in modes:
        rows = []
        for seed in seeds:
            start = seeded_start(m, inv, seed)
            image = m.vae.decode(sample(models[name], pos, neg, start, inv.sigmas, cfg))
            px = image.reshape(SIZE, SIZE, 3).float()
            near = ((px - rgb(obj.colour)).norm(dim=-1) < (px - rgb(inv.scene.background)).norm(dim=-1)).numpy()
            row = {"object_px": int(near.sum()), "hist_to_source": float((colour_histogram(image[0])
                                                                          - source_hist).abs().sum())}
            if near.sum() > 0:
                row["centre"] = centroid(mask_tensor(near).double() / near.sum())
                row["colour_to_source"] = float((mean_colour(image, near) - rgb(obj.colour)).norm())
            rows.append(row)
        out[name] = rows
    return out


# -- StyleDiffusion: reconstruction and a colour-word edit keep the layout --------------------------------------------
def style_figures(m: Loaded, inv: Inverted, cfg: float = 5.0, inner_steps: int = 4, colour_to: str = "green") -> dict:
    """StyleDiffusion Mapper on the inverted scene (test CLIP vision encoder), then P2Plus with the STYLE:
    reconstruction (source prompt as target) and a colour-word swap; the control is the same two without the
    STYLE (plain DDIM at ``cfg``). Layout: IoU of the pixels away from the background colour with the object's
    mask; change outside the object's 12 px ring; the object's colour distance to ``colour_to``."""
    from inversion_chain.nodes.p2plus import ICP2PlusController
    from inversion_chain.nodes.style_diffusion import ICStyleDiffusionMapper

    from . import models
    obj = inv.scene.objects[0]
    caption = inv.scene.caption
    target = caption.replace(obj.colour, colour_to)
    pos, neg = m.encode(caption), m.encode("")
    style = call(ICStyleDiffusionMapper, model=m.model, clip_vision=models.load_clip_vision(), image=inv.scene.tensor(),
                 inversion=inv.inversion, positive=pos, negative=neg, cfg=cfg, inner_steps=inner_steps)[0]
    ref = m.vae.decode(inv.latent)
    outside = ~grow(obj.mask, 12)

    def iou(image):
        drawn = object_region(image, inv.scene.background)
        return float((drawn & obj.mask).sum() / max(1, (drawn | obj.mask).sum()))
    out = {}
    for name, extra in (("style", {"style": style}), ("no style (control)", {})):
        model, p2pos, p2neg, latent, sigmas = call(ICP2PlusController, model=m.model, clip=m.clip,
                                                   source_prompt=caption, target_prompt=target,
                                                   inversion=inv.inversion, **extra)
        recon, edit = m.vae.decode(sample(model, p2pos, p2neg, latent["samples"], sigmas, cfg)).split(1)
        out[name] = {"recon_psnr": psnr(recon, ref), "recon_layout_iou": iou(recon),
                     "recon_outside_change": mean_abs(recon, ref, outside),
                     "edit_layout_iou": iou(edit), "edit_outside_change": mean_abs(edit, recon, outside),
                     "edit_to_target_before": float((mean_colour(recon, obj.mask) - rgb(colour_to)).norm()),
                     "edit_to_target": float((mean_colour(edit, obj.mask) - rgb(colour_to)).norm())}
    return out


# -- two objects: each word's map on its own object -------------------------------------------------------------------
TWO_OBJECTS = (("red", "circle", (8, 40, 48)), ("blue", "square", (72, 40, 48)))


def two_object_figures(m: Loaded, swapped: bool = False) -> dict:
    """'a red circle and a blue square on a yellow background', the circle on the left (``swapped``: on the right,
    the square on the left, the same caption): each word's mass ratio inside its own object and inside the other."""
    objects = TWO_OBJECTS
    if swapped:
        (c0, s0, p0), (c1, s1, p1) = objects
        objects = ((c0, s0, p1), (c1, s1, p0))
    scene = scenes.render("yellow", list(objects))
    inv = invert(m, scene)
    a, b = scene.objects
    maps = word_maps(m, inv, [a.colour, a.shape, b.colour, b.shape])
    out = {"caption": scene.caption}
    for own, other in ((a, b), (b, a)):
        for word in (own.colour, own.shape):
            out[word] = {"own": mass_ratio(maps[word], own.mask), "other": mass_ratio(maps[word], other.mask),
                         "centroid": centroid(maps[word])}
    return out
