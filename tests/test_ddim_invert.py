"""DDIM Invert on the small model, in-process, through ComfyUI's own sampling path."""
import math

import pytest
import torch

import comfy.sample
import comfy.samplers

from inversion_chain.artifacts import Inversion, InversionChainError
from inversion_chain.nodes.invert import DEFAULT_REFINE_ITERS, ICDDIMInvert
from inversion_chain.model_info import model_key
from tests.harness.measure import measured

STEPS = 10


def sample_back(model, positive, noise, sigmas):
    """The stock path a user wires: SamplerCustom, add_noise off, sampler 'ddim', the returned sigmas."""
    sampler = comfy.samplers.sampler_object("ddim")
    return comfy.sample.sample_custom(model, torch.zeros_like(noise), 1.0, sampler, sigmas, positive, positive,
                                      noise, seed=0)


def invert(model, latent, positive, refine_iters, steps=STEPS, **kw):
    noise, sigmas, inv = ICDDIMInvert().invert(model, latent, positive, steps, 1.0, refine_iters, **kw)
    return noise["samples"], sigmas, inv


@pytest.fixture(scope="module")
def positive(small_model, encode):
    return encode(small_model[1], "a photo of an astronaut")


def test_round_trip_with_default_refinement_is_100x_better_than_naive(family, family_model, family_encode,
                                                                     family_latent):
    """On every family (SD1.5, SD2 v-prediction, SDXL with CLIPTextEncodeSDXL conditioning), default settings."""
    model, clip, _ = family_model
    positive = family_encode(clip, "a photo of an astronaut")
    source = family_latent["samples"]
    errors, calls = {}, {}
    for iters in (0, DEFAULT_REFINE_ITERS):
        noise, sigmas, inv = invert(model, family_latent, positive, iters)
        errors[iters] = float((sample_back(model, positive, noise, sigmas) - source).abs().max())
        calls[iters] = inv.unet_calls / STEPS
    measured(f"{family}: round-trip max latent error, {STEPS} steps: naive {errors[0]:.3e}, default "
             f"{errors[DEFAULT_REFINE_ITERS]:.3e} ({calls[DEFAULT_REFINE_ITERS]:.2f} UNet calls per step)")
    assert errors[DEFAULT_REFINE_ITERS] < 1e-3
    assert errors[0] / errors[DEFAULT_REFINE_ITERS] >= 100


@pytest.mark.fast
def test_inversion_artifact_holds_the_whole_chain(family_model, family_encode, family_latent):
    model, clip, _ = family_model
    positive, astronaut_latent = family_encode(clip, "a photo of an astronaut"), family_latent
    noise, sigmas, inv = invert(model, astronaut_latent, positive, 2)
    assert isinstance(inv, Inversion)
    assert inv.steps == STEPS and inv.chain.shape[0] == STEPS + 1 and sigmas.shape == (STEPS + 1,)
    assert torch.all(sigmas[:-1] > sigmas[1:]) and float(sigmas[-1]) == 0.0
    # the chain ends at the encoded image (in sampler space: the family's latent scale) and starts at the noise
    x0 = model.model.process_latent_in(astronaut_latent["samples"].clone())
    assert torch.equal(inv.chain[-1].cpu(), x0)
    assert torch.allclose(model.model.process_latent_in(noise.clone()), inv.chain[0].cpu(), atol=1e-6)
    # stepping each chain latent forward with the stock DDIM update lands on the next one (per-step residuals)
    assert inv.residuals.shape == (STEPS, 1) and torch.all(torch.isfinite(inv.residuals))
    # each step stops at the tolerance or at the cap (1 + 2 evaluations); the count is reported per step
    assert inv.step_calls.shape == (STEPS,) and inv.unet_calls == int(inv.step_calls.sum())
    assert torch.all((inv.step_calls >= 1) & (inv.step_calls <= 3))
    assert torch.all((inv.residuals[:, 0] <= inv.tolerance) | (inv.step_calls == 3))
    assert inv.model_key == model_key(model) and inv.latent_shape == tuple(astronaut_latent["samples"].shape)
    assert torch.equal(inv.timesteps[-1], torch.tensor(0.0)) and 900 < float(inv.timesteps[0]) < 1000


def test_batch_inverts_row_by_row(family_model, family_encode, family_latent):
    """Every family: a 2-row batch (SDXL: its ADM vector repeated per row) inverts as each row alone."""
    model, clip, vae = family_model
    import nodes
    from tests.harness.photos import photo
    astronaut_latent = family_latent
    other = nodes.VAEEncode().encode(vae, photo("chelsea", 128))[0]["samples"]
    batch = {"samples": torch.cat([astronaut_latent["samples"], other])}
    positive = family_encode(clip, "a photo")
    noise_batch, _, inv_batch = invert(model, batch, positive, 1, steps=4)
    noise_a, _, _ = invert(model, astronaut_latent, positive, 1, steps=4)
    noise_b, _, _ = invert(model, {"samples": other}, positive, 1, steps=4)
    assert inv_batch.chain.shape[1] == 2
    assert torch.allclose(noise_batch, torch.cat([noise_a, noise_b]), atol=1e-5)


def test_v_prediction_model_round_trips(small_model, positive, astronaut_latent):
    """The same UNet declared v-prediction through the stock ModelSamplingDiscrete node.

    In v-parameterisation eps(x) carries a term x * sigma / (1 + sigma^2) that a random network does not cancel
    (a trained one largely does), so the fixed point contracts by ~0.4 per iteration at the top of the schedule
    instead of ~0.1: this test gives it 10 iterations."""
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
    model = ModelSamplingDiscrete().patch(small_model[0], "v_prediction", False)[0]
    errors = {}
    for iters in (0, 10):
        noise, sigmas, inv = invert(model, astronaut_latent, positive, iters)
        errors[iters] = float((sample_back(model, positive, noise, sigmas) - astronaut_latent["samples"]).abs().max())
    assert inv.model_key.prediction == "V_PREDICTION"
    assert errors[10] < 1e-3 and errors[0] / errors[10] >= 100, errors


@pytest.mark.fast
def test_inversion_cfg_above_one_uses_negative(family_model, family_encode, family_latent):
    model, clip, _ = family_model
    astronaut_latent = family_latent
    positive, negative = family_encode(clip, "a photo of an astronaut"), family_encode(clip, "")
    with pytest.raises(InversionChainError, match="needs the optional `negative`"):
        ICDDIMInvert().invert(model, astronaut_latent, positive, 4, 3.0, 0)
    plain = ICDDIMInvert().invert(model, astronaut_latent, positive, 4, 1.0, 0)[0]["samples"]
    guided = ICDDIMInvert().invert(model, astronaut_latent, positive, 4, 3.0, 0, negative=negative)[0]["samples"]
    assert not torch.allclose(plain, guided)


@pytest.mark.fast
@pytest.mark.parametrize("bad", ["steps", "nan", "not_latent", "not_model"])
def test_bad_input_gets_a_clear_error(small_model, positive, astronaut_latent, bad):
    model = small_model[0]
    latent, steps = astronaut_latent, STEPS
    if bad == "steps":
        steps, expected = 0, "input `steps` got 0; accepted: a whole number from 1"
    elif bad == "nan":
        samples = astronaut_latent["samples"].clone()
        samples[0, 0, 0, 0] = math.nan
        latent, expected = {"samples": samples}, "NaN/Inf"
    elif bad == "not_latent":
        latent, expected = astronaut_latent["samples"], r"input `latent` got tensor.*accepted: a LATENT"
    else:
        model, expected = small_model[1], "input `model` got .*accepted: a MODEL"
    with pytest.raises(InversionChainError, match=expected):
        ICDDIMInvert().invert(model, latent, positive, steps, 1.0, 1)
