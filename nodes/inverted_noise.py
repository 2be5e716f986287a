"""Inverted Noise: an INVERSION's start latent as a NOISE for SamplerCustomAdvanced (how flow models sample back)."""
from __future__ import annotations

from ..artifacts import INVERSION
from ..pipelines.inversion import inverted_noise
from .common import CATEGORY, tip
from .contract import checked


class ICInvertedNoise:
    DESCRIPTION = ("The inverted latent as a NOISE for SamplerCustomAdvanced: with it, DDIM Invert's `sigmas` and "
                   "sampler euler or ddim, the sampler starts exactly at the inverted latent and reconstructs the "
                   "image. Flow models (Flux, Chroma) need it: at sigma 1 their samplers scale the LATENT by "
                   "1 - sigma = 0, so SamplerCustom with add_noise off would start from zeros. On SD models it "
                   "matches SamplerCustom with add_noise off. A latent_image whose batch is k times the inversion's "
                   "starts each block of rows at the inverted latents (P2Plus Controller's 2-row LATENT on a real "
                   "image).")
    CATEGORY = CATEGORY + "/utils"
    FUNCTION = "noise"
    OUTPUT_NODE = True   # shows what it starts from; runs (and checks its inputs) even before it is wired
    RETURN_TYPES = ("NOISE",)
    RETURN_NAMES = ("noise",)
    OUTPUT_TOOLTIPS = ("Connect to SamplerCustomAdvanced's `noise`; its latent_image: the image's latent or an empty "
                       "latent of the same size (or a batch k times the inversion's, e.g. P2Plus Controller's "
                       "LATENT), its sigmas: DDIM Invert's `sigmas`.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": tip("MODEL", "The model the inversion was made with."),
            "inversion": tip(INVERSION, "From DDIM Invert."),
        }}

    @checked
    def noise(self, model, inversion):
        noise, report = inverted_noise(model, inversion)
        return {"ui": {"text": [report]}, "result": (noise,)}


NODE_CLASS_MAPPINGS = {"ICInvertedNoise": ICInvertedNoise}
NODE_DISPLAY_NAME_MAPPINGS = {"ICInvertedNoise": "Inverted Noise (SamplerCustomAdvanced)"}
