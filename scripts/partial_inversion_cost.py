"""UNet calls and round-trip error of DDIM Invert at end_percent 1.0 vs 0.5 on the test models of each family.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/partial_inversion_cost.py [steps] [families...]

Prints, per family and end_percent: the steps inverted, the UNet calls, the round trip (max latent error) through
SamplerCustom + DDIM Invert's sigmas and through KSampler Advanced from start_at_step, and whether the partial
chain is the full chain's clean end bit for bit."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.harness import comfy_env, models, photos  # noqa: E402


def main(argv):
    steps = int(argv[0]) if argv else 50
    families = argv[1:] or list(models.FAMILIES)
    comfy_env.setup_comfy()
    comfy_env.load_pack()
    import comfy.sample
    import comfy.samplers
    import nodes
    from inversion_chain.nodes.invert import ICDDIMInvert
    from tests.conftest import encode_as_stock
    for family in families:
        with torch.inference_mode():
            model, clip, vae = models.load_family(family)
            latent = nodes.VAEEncode().encode(vae, photos.photo("astronaut", 128))[0]
            pos = encode_as_stock(clip, "a photo of an astronaut", family)
            invs = {}
            for end in (1.0, 0.5):
                noise, sigmas, inv = ICDDIMInvert().invert(model, latent, pos, steps, 1.0, 6, end_percent=end)
                sampler = comfy.samplers.sampler_object("ddim")
                custom = comfy.sample.sample_custom(model, torch.zeros_like(noise["samples"]), 1.0, sampler, sigmas,
                                                    pos, pos, noise["samples"], seed=0)
                adv = nodes.KSamplerAdvanced().sample(model, "disable", 0, steps, 1.0, "ddim", "ddim_uniform", pos,
                                                      pos, noise, inv.start_step, 10000, "disable")[0]["samples"]
                invs[end] = inv
                print(f"{family}: end_percent {end}: {inv.steps} of {steps} steps, {inv.unet_calls} UNet calls, "
                      f"round trip SamplerCustom {float((custom - latent['samples']).abs().max()):.2e}, "
                      f"KSampler Advanced start_at_step {inv.start_step} "
                      f"{float((adv - latent['samples']).abs().max()):.2e}", flush=True)
            full, part = invs[1.0], invs[0.5]
            print(f"{family}: partial chain == full chain's clean end: "
                  f"{torch.equal(part.chain, full.chain[steps - part.steps:])}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
