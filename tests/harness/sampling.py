"""The stock sampling path tests compare against: SamplerCustom with sampler ddim along given sigmas, seed 0."""
from __future__ import annotations

import torch


def sample(model, positive, negative, latent, sigmas, cfg: float = 1.0, callback=None, noise=None):
    """SamplerCustom semantics, sampler 'ddim': add_noise off when ``noise`` is None (sampling starts at ``latent``),
    else ``noise`` scaled by the first sigma and added to ``latent`` (add_noise on with that noise)."""
    import comfy.sample
    import comfy.samplers
    sampler = comfy.samplers.sampler_object("ddim")
    noise = torch.zeros_like(latent) if noise is None else noise
    return comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent,
                                      callback=callback, seed=0)


def sampler(cfg: float):
    """``sample`` with another default guidance (a test module's usual cfg)."""
    def sample_at(model, positive, negative, latent, sigmas, cfg: float = cfg, callback=None, noise=None):
        return sample(model, positive, negative, latent, sigmas, cfg, callback, noise)
    return sample_at


def noised_sampler(cfg: float):
    """``sample`` called with the noise in place of the latent (the latent zeros unless given), default ``cfg``."""
    def sample_noise(model, positive, negative, noise, sigmas, cfg: float = cfg, latent=None):
        latent = torch.zeros_like(noise) if latent is None else latent
        return sample(model, positive, negative, latent, sigmas, cfg, noise=noise)
    return sample_noise
