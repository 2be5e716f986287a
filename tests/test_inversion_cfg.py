"""DDIM Invert with inversion_cfg > 1 (the sampler's guidance, with its negative prompt) reconstructs within issue
25's bound on every UNet family at the default settings; the flow families are covered in tests/test_flow_invert.py.
Control: the naive inversion (refine_iters 0) at the same guidance misses the bound by far."""
import pytest
import torch

import comfy.sample
import comfy.samplers

from inversion_chain.nodes.invert import DEFAULT_REFINE_ITERS, ICDDIMInvert
from inversion_chain.samplers.inversion import DEFAULT_TOLERANCE
from tests.harness.measure import measured

TARGET = 1e-3   # issue 25: round trip, LATENT max abs, for inversion_cfg > 1 too


def round_trip(model, latent, positive, negative, cfg, steps, refine_iters):
    """Invert at ``cfg``, then the stock path back: SamplerCustom (add_noise off, sampler ddim, the same cfg and
    negative, DDIM Invert's sigmas)."""
    with torch.inference_mode():
        noise, sigmas, inv = ICDDIMInvert().invert(model, latent, positive, steps, cfg, refine_iters,
                                                   negative=negative, tolerance=DEFAULT_TOLERANCE)
        noise = noise["samples"]
        out = comfy.sample.sample_custom(model, torch.zeros_like(noise), cfg, comfy.samplers.sampler_object("ddim"),
                                         sigmas, positive, negative, noise, seed=0)
    return float((out - latent["samples"]).abs().max()), inv


@pytest.mark.parametrize("cfg,steps", [(3.0, 8), (7.5, 20)])
def test_guided_inversion_round_trip_within_the_bound(family, family_model, family_encode, family_latent, cfg, steps):
    model, clip, _ = family_model
    positive, negative = family_encode(clip, "a photo of an astronaut"), family_encode(clip, "")
    exact, inv = round_trip(model, family_latent, positive, negative, cfg, steps, DEFAULT_REFINE_ITERS)
    naive, _ = round_trip(model, family_latent, positive, negative, cfg, steps, 0)
    measured(f"{family} cfg {cfg}, {steps} steps: round trip {exact:.3e} at {inv.unet_calls / steps:.2f} calls/step, "
             f"naive {naive:.3e}")
    assert inv.cfg == cfg and inv.negative is negative
    assert exact < TARGET, f"{family} cfg {cfg}, {steps} steps: round trip {exact:.3e}"
    assert naive > 10 * TARGET, f"{family} cfg {cfg}: the naive inversion's {naive:.3e} should miss the bound"
