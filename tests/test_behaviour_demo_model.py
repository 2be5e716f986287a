"""Behaviour that needs a trained model, on the committed demo model (models/ic_demo_photos.safetensors: a 1 M-param
v-prediction UNet trained here on four 128 px photos for 1000 steps, scripts/train_demo_model.py), in-process through
ComfyUI's stock loader and samplers. Thresholds were measured on the committed checkpoint (figures in comments;
`pytest -s` prints them) and set with a margin.

Not shown by this model (measured on the committed checkpoint, so not tested): the subject word's cross-attention
mass in a hand-marked box equals the uniform share (astronaut 0.520 vs 0.527, coffee 0.301 vs 0.299, rocket 0.126 vs
0.132: the frozen random text encoder spreads the caption over every token after it); and with maps that flat the
P2Plus local-blend mask at the default threshold covers 100 % of the latent, so "outside the mask" is empty.
Time widgets are never passed: each node runs at its INPUT_TYPES defaults (see `call`).
"""
from __future__ import annotations

import pytest
import torch

import comfy.sample
import comfy.samplers

from tests.harness import demo_model, photos
from tests.harness.scenes_behaviour import call
from tests.harness.measure import measured

PHOTOS = list(demo_model.CAPTIONS)
STEPS = 20
SEEDS = [0, 1, 2, 3]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a.float() - b.float()) ** 2).mean()))


def sample_custom(model, pos, neg, latent, sigmas, cfg):
    """SamplerCustom with add_noise off and sampler ddim: deterministic sampling from ``latent`` along ``sigmas``."""
    sampler = comfy.samplers.sampler_object("ddim")
    return comfy.sample.sample_custom(model, torch.zeros_like(latent), cfg, sampler, sigmas, pos, neg, latent, seed=0)


@pytest.fixture(scope="module")
def m(encode):
    from inversion_chain.nodes.invert import ICDDIMInvert
    model, clip, vae = demo_model.load_demo_model()
    with torch.inference_mode():
        images = torch.cat([photos.photo(n, demo_model.SIZE) for n in PHOTOS])
        latents = vae.encode(images)
        recon = vae.decode(latents)                                  # what the model can reach at best
        conds = {n: encode(clip, demo_model.CAPTIONS[n]) for n in PHOTOS}
        empty = encode(clip, "")
        noise, sigmas, inv = ICDDIMInvert().invert(model, {"samples": latents[:1]}, conds["astronaut"], STEPS, 1.0, 3)
    return dict(model=model, clip=clip, vae=vae, images=images, latents=latents, recon=recon, conds=conds,
                empty=empty, noise=noise["samples"], sigmas=sigmas, inv=inv)


def generate(m, name, seed, batch=len(SEEDS), cfg=5.0):
    """KSampler (ddim, ddim_uniform) from an empty latent: stock text-to-image (one seed, batch noise)."""
    import nodes   # ComfyUI's nodes module (the tree is first on sys.path once conftest ran)
    latent = {"samples": torch.zeros(batch, 4, demo_model.SIZE // 8, demo_model.SIZE // 8)}
    out = nodes.common_ksampler(m["model"], seed, STEPS, cfg, "ddim", "ddim_uniform", m["conds"][name], m["empty"],
                                latent)[0]["samples"]
    return m["vae"].decode(out)


def test_vae_reconstructs_each_training_photo(m):
    scores = [psnr(m["recon"][i], m["images"][i]) for i in range(len(PHOTOS))]
    measured("VAE round trip PSNR at 128 px: " + ", ".join(f"{n} {v:.1f} dB" for n, v in zip(PHOTOS, scores)))
    # measured 15.5 / 21.6 / 18.6 / 23.5 dB (a 16x16x4 colour code decoded: blurry but recognisable); the hand-set
    # decoder before fine-tuning gave 14.3 / 19.4 / 16.9 / 22.6, random TAESD weights give noise (< 10 dB)
    assert min(scores) > 14.5 and sum(scores) / len(scores) > 19


def test_text_to_image_draws_the_captioned_photo(m):
    wins = {}
    for name in PHOTOS:
        images = generate(m, name, seed=0)
        nearest = []
        for img in images:
            scores = [psnr(img, ref) for ref in m["recon"]]
            nearest.append(PHOTOS[max(range(len(PHOTOS)), key=scores.__getitem__)])
        wins[name] = sum(n == name for n in nearest)
        measured(f"'{demo_model.CAPTIONS[name]}': nearest training photo per seed {nearest}")
    # measured (4 seeds, cfg 5, 20 steps): astronaut 3/4, cat 4/4, coffee 4/4, rocket 1/4 (3 seeds -> the cat):
    # 12/16 overall against 4/16 by chance; the rocket, a thin object on a dark sky, is the one not yet learned
    assert sum(wins.values()) >= 11, wins
    assert sorted(wins.values())[1] >= 3, wins      # three of the four captions draw their photo for most seeds


def test_cfg1_inversion_round_trip_is_close_and_guidance_drift_is_restored(m):
    from inversion_chain.nodes.p2plus import ICNullTextInversion, ICP2PlusController
    src, empty, ref = m["conds"]["astronaut"], m["empty"], m["recon"][:1]
    decode = m["vae"].decode
    cfg1 = psnr(decode(sample_custom(m["model"], src, empty, m["noise"], m["sigmas"], 1.0)), ref)
    plain = psnr(decode(sample_custom(m["model"], src, empty, m["noise"], m["sigmas"], 7.5)), ref)
    restored = {}
    for method in ("null-text", "negative-prompt"):
        nt = call(ICNullTextInversion, model=m["model"], inversion=m["inv"], positive=src, negative=empty, cfg=7.5,
                  method=method)[0]
        prompt = demo_model.CAPTIONS["astronaut"]
        model, pos, neg, latent, sigmas = call(ICP2PlusController, model=m["model"], clip=m["clip"],
                                               source_prompt=prompt, target_prompt=prompt, inversion=m["inv"],
                                               null_text=nt)
        restored[method] = psnr(decode(sample_custom(model, pos, neg, latent["samples"], sigmas, 7.5)[:1]), ref)
    measured(f"round trip PSNR vs the VAE reconstruction: cfg 1 {cfg1:.1f} dB, plain DDIM at cfg 7.5 {plain:.1f} dB, "
             f"null-text {restored['null-text']:.1f} dB, negative-prompt {restored['negative-prompt']:.1f} dB")
    # measured: cfg 1 59.0 dB, plain cfg 7.5 25.6 dB, null-text 49.1 dB, negative-prompt 59.0 dB
    assert cfg1 > 50
    assert plain < cfg1 - 20
    assert restored["null-text"] > plain + 15
    assert restored["negative-prompt"] > plain + 15


def colour_stats(images: torch.Tensor) -> torch.Tensor:
    """[B, 6]: per-channel mean and std of each image."""
    flat = images.flatten(1, 2)                                   # [B, H*W, 3]
    return torch.cat([flat.mean(1), flat.std(1)], dim=1)


def test_rival_variations_keep_the_photos_palette_and_differ(m):
    from inversion_chain.nodes.rival import ICRIVALAlignSampler
    src = m["conds"]["astronaut"]
    variations = call(ICRIVALAlignSampler, model=m["model"], positive=src, negative=m["empty"], inversion=m["inv"],
                      seed=0, batch_size=len(SEEDS), cfg=5.0)[0]["samples"]
    rival_images = m["vae"].decode(variations)
    plain_images = generate(m, "astronaut", seed=0)
    photo_stats = colour_stats(m["images"][:1])
    d_rival = (colour_stats(rival_images) - photo_stats).norm(dim=1)
    d_plain = (colour_stats(plain_images) - photo_stats).norm(dim=1)
    pair = [float((rival_images[i] - rival_images[j]).abs().mean()) for i in range(len(SEEDS))
            for j in range(i + 1, len(SEEDS))]
    to_photo = [psnr(img, m["recon"][0]) for img in rival_images]
    measured(f"colour-statistics distance to the photo: RIVAL {d_rival.tolist()} (mean {d_rival.mean():.4f}), plain "
             f"{d_plain.tolist()} (mean {d_plain.mean():.4f}); variations' pairwise mean |diff| {min(pair):.4f}.."
             f"{max(pair):.4f}; PSNR to the photo {min(to_photo):.1f}..{max(to_photo):.1f} dB")
    # measured: RIVAL 0.097-0.109 (mean 0.102) vs plain 0.098-0.479 (mean 0.198: three plain seeds are as close as
    # RIVAL's, one drifts to another palette); variations' pairwise mean |diff| 0.029-0.034; 26.7-27.3 dB to the photo
    assert d_rival.mean() < 0.8 * d_plain.mean() and d_rival.max() < d_plain.max()
    assert min(pair) > 0.015
    assert max(to_photo) < 33
