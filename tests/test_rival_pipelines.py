"""RIVAL's other pipelines (official repository dvlab-research/RIVAL): example-based inpainting with a mask, variations
under a ControlNet, with a LoRA, on an unCLIP model; and the official configs' timesteps in this pack's fractions.
Small models through ComfyUI's stock loaders and nodes, few steps."""
import pytest
import torch

import nodes as comfy_nodes
import folder_paths

from inversion_chain import compat
from inversion_chain.artifacts import InversionChainError
from inversion_chain.attention.core.schedule import Schedule, percent_after_timestep
from inversion_chain.nodes.invert import ICDDIMInvert
from inversion_chain.nodes.rival import ICRIVALAlignSampler
from tests.conftest import encode_as_stock, family_models
from tests.harness import extra_models, photos
from tests.harness.measure import measured

STEPS = 5
PROMPT = "a photo of an astronaut"


def err(a, b):
    return float((a - b).abs().max())


def invert(model, latent, positive, steps=STEPS):
    return ICDDIMInvert().invert(model, latent, positive, steps, 1.0, 3)[2]


def rival(model, positive, negative, inv, seed=0, batch_size=2, cfg=5.0, reference_kv="cache", mask=None,
          replace_end=0.4, normalize_end=0.4):
    return ICRIVALAlignSampler().sample(model, positive, negative, inv, seed, batch_size, cfg, replace_end,
                                        normalize_end, "permute", "eps", reference_kv, mask=mask)


def encode_photo(vae, size=128):
    return comfy_nodes.VAEEncode().encode(vae, photos.photo("astronaut", size))[0]


# -- official settings -------------------------------------------------------------------------------------------
@pytest.mark.fast
def test_official_t_early_400_of_the_controlnet_config_is_normalize_end_percent_0_6(small_model):
    """configs/rival_controlnet.json: t_early 400 on 50 DDIM steps; the pack's rule i/N < p on ComfyUI's own
    ddim_uniform schedule selects exactly the steps with timestep > 400 at p = 0.6 (and > 600 at 0.4)."""
    model = small_model[0]
    sigmas = compat.calculate_sigmas(model, "ddim_uniform", 50)
    sampling = compat.model_sampling(model)
    timesteps = [float(sampling.timestep(s.view(1))) for s in sigmas[:-1]]
    schedule = Schedule(sigmas, "ddim_uniform")
    for t, p in ((400, 0.6), (600, 0.4)):
        assert percent_after_timestep(timesteps, t) == p
        assert [schedule.fraction(i) < p for i in range(50)] == [ts > t for ts in timesteps]


# -- example-based inpainting ------------------------------------------------------------------------------------
INPAINT_FAMILIES = ("sd15", "sdxl")


@pytest.fixture(scope="module", params=INPAINT_FAMILIES)
def inpaint(request):
    with torch.inference_mode():
        return _inpaint(request.param)


def _inpaint(family):
    model, clip, vae = family_models(family)
    latent = encode_photo(vae)
    src, empty = encode_as_stock(clip, PROMPT, family), encode_as_stock(clip, "", family)
    inv = invert(model, latent, src)
    h, w = latent["samples"].shape[-2:]
    mask = torch.zeros(1, 8 * h, 8 * w)   # image-size MASK: 1 = regenerate
    mask[:, 8 * 4:8 * 12, 8 * 3:8 * 11] = 1.0
    mask[:, 8 * 12:8 * 13, 8 * 3:8 * 11] = 0.6   # a partly covered row of cells: mean >= 0.5 -> regenerated
    region = torch.zeros(h, w, dtype=torch.bool)
    region[4:13, 3:11] = True                     # the latent cells regenerated, written out independently
    return dict(family=family, model=model, src=src, empty=empty, inv=inv, source=latent["samples"], mask=mask,
                region=region)


@pytest.mark.parametrize("reference_kv", ["cache", "batch"])
def test_inpainting_keeps_the_unmasked_region_exactly_and_regenerates_the_masked(inpaint, reference_kv):
    s = inpaint
    inputs = []   # what the UNet reads at every step: outside the mask, the inversion chain's latent

    def spy(apply_model, args):
        if args["input"].any():   # all zeros: the batch layout's one call that reads the ADM vector (SDXL)
            inputs.append((float(args["timestep"][0]), args["input"].clone()))   # timestep: the sigma
        return apply_model(args["input"], args["timestep"], **args["c"])

    model = s["model"].clone()
    model.set_model_unet_function_wrapper(spy)
    variations, reference = rival(model, s["src"], s["empty"], s["inv"], seed=1, reference_kv=reference_kv,
                                  mask=s["mask"])
    out, keep = variations["samples"], ~s["region"]
    kept_vs_source = err(out[:, :, keep], s["source"][:, :, keep])
    kept_vs_reference = err(out[:, :, keep], reference["samples"][:, :, keep].expand(2, -1, -1))
    changed = float((out[:, :, s["region"]] - s["source"][:, :, s["region"]]).abs().mean())
    # every UNet call (the wrapper sees the sampler-space latent and sigma): outside the mask every row is that
    # step's chain latent, the start included
    chain_err, sigmas = 0.0, [float(x) for x in s["inv"].sigmas[:STEPS]]
    for sigma, x_in in inputs:
        i = min(range(STEPS), key=lambda j: abs(sigmas[j] - sigma))
        chain_err = max(chain_err, err(x_in[:, :, keep], s["inv"].chain[i][:1, :, keep].expand(x_in.shape[0], -1, -1)))
    measured(f"{s['family']} inpainting ({reference_kv}): kept region vs source latent {kept_vs_source:.2e}, vs "
             f"reference output {kept_vs_reference:.1e}; UNet input outside the mask vs chain {chain_err:.1e} over "
             f"{len(inputs)} calls; masked region mean |change| {changed:.3f}")
    assert kept_vs_reference == 0.0           # the chain's last latent, copied: bit-exact
    assert kept_vs_source < 1e-5              # the encoded photo, through the model's latent scaling and back
    assert chain_err == 0.0 and len(inputs) >= STEPS
    assert changed > 0.05
    assert not torch.allclose(out[0], out[1])  # two seeds, two inpaintings


def test_inpainting_mask_identity_cases(inpaint):
    s = inpaint
    zeros, ones = torch.zeros_like(s["mask"]), torch.ones_like(s["mask"])
    kept = rival(s["model"], s["src"], s["empty"], s["inv"], seed=2, mask=zeros, batch_size=1)[0]["samples"]
    full = rival(s["model"], s["src"], s["empty"], s["inv"], seed=2, mask=ones, batch_size=1)[0]["samples"]
    plain = rival(s["model"], s["src"], s["empty"], s["inv"], seed=2, batch_size=1)[0]["samples"]
    measured(f"{s['family']}: all-zeros mask vs source latent {err(kept, s['source']):.2e}; all-ones mask vs no mask "
             f"{err(full, plain):.1e}")
    assert err(kept, s["source"]) < 1e-5        # nothing regenerated: the photo itself
    assert torch.equal(full, plain)             # everything regenerated: plain RIVAL, same draw


def test_bad_masks_get_clear_errors(inpaint):
    s = inpaint
    h, w = s["source"].shape[-2:]
    go = lambda mask: rival(s["model"], s["src"], s["empty"], s["inv"], batch_size=1, mask=mask)  # noqa: E731
    with pytest.raises(InversionChainError, match=rf"input `mask` is 100x100 but the inversion's latent is {h}x{w}"):
        go(torch.ones(1, 100, 100))
    with pytest.raises(InversionChainError, match=r"input `mask` is .* accepted: a MASK of one image"):
        go(torch.ones(1, 8 * h, 4 * w))   # wrong aspect
    with pytest.raises(InversionChainError, match=r"input `mask` got shape \(2, "):
        go(torch.ones(2, 8 * h, 8 * w))
    with pytest.raises(InversionChainError, match=r"(?s)input `mask`.*accepted: a MASK"):
        go({"samples": torch.ones(1, 4, h, w)})   # a LATENT where a MASK belongs
    with pytest.raises(InversionChainError, match=r"input `mask` has values outside \[0, 1\]"):
        go(torch.full((1, h, w), 2.0))


# -- ControlNet --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(small_model, astronaut_latent):
    with torch.inference_mode():
        return _small(small_model, astronaut_latent)


def _small(small_model, astronaut_latent):
    model, clip, vae = small_model
    src = encode_as_stock(clip, PROMPT, "sd15")
    return dict(model=model, clip=clip, src=src, empty=encode_as_stock(clip, "", "sd15"),
                inv=invert(model, astronaut_latent, src), latent=astronaut_latent, source=astronaut_latent["samples"])


def stock_controlnet():
    path = extra_models.controlnet_path()
    folder_paths.add_model_folder_path("controlnet", str(path.parent))
    return comfy_nodes.ControlNetLoader().load_controlnet(path.name)[0]


def test_rival_under_a_controlnet(small):
    s = small
    net = stock_controlnet()
    hint = photos.photo("chelsea", 128)
    apply = comfy_nodes.ControlNetApplyAdvanced()
    pos, neg = apply.apply_controlnet(s["src"], s["empty"], net, hint, 1.0, 0.0, 1.0)[:2]
    plain = rival(s["model"], s["src"], s["empty"], s["inv"], seed=3, batch_size=1)[0]["samples"]
    runs = {mode: rival(s["model"], pos, neg, s["inv"], seed=3, batch_size=1, reference_kv=mode)
            for mode in ("cache", "batch")}
    controlled = runs["cache"][0]["samples"]
    # a control that never acts (its step range empty) through the same path: the plain run
    idle = apply.apply_controlnet(s["src"], s["empty"], net, hint, 1.0, 1.0, 1.0)[:2]
    idle_out = rival(s["model"], idle[0], idle[1], s["inv"], seed=3, batch_size=1)[0]["samples"]
    cache_vs_batch = err(controlled, runs["batch"][0]["samples"])
    measured(f"ControlNet: controlled vs plain {err(controlled, plain):.3f}; cache vs batch reference under control "
             f"{cache_vs_batch:.1e}; inactive control vs plain {err(idle_out, plain):.1e}; reference vs source "
             f"{err(runs['batch'][1]['samples'], s['source']):.1e}")
    assert err(controlled, plain) > 0.05
    # the control steers the variations only: the reference row (in the batch) reads the photo's K/V without
    # control residuals, as the cached reference (recorded from the inversion); fp16 K/V cache is the difference
    assert cache_vs_batch < 5e-3
    assert err(idle_out, plain) < 1e-5
    assert err(runs["batch"][1]["samples"], s["source"]) < 1e-5


def x0_prediction(model, positive, inv):
    """One UNet call at the inversion's first sigma through the stock sampling path (patches, LoRA, ADM)."""
    def one_call(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        return model_k(inv.chain[0][:1].to(x), sigmas[:1], **(extra_args or {}))
    return compat.sample_with_function(model, one_call, inv.sigmas[:2], positive, positive, 1.0,
                                       torch.zeros(inv.latent_shape))


# -- LoRA --------------------------------------------------------------------------------------------------------
def test_rival_with_a_lora_from_the_stock_loader(small):
    s = small
    path = extra_models.lora_path()
    folder_paths.add_model_folder_path("loras", str(path.parent))
    lora_model, lora_clip = comfy_nodes.LoraLoader().load_lora(s["model"], s["clip"], path.name, 1.0, 0.0)
    unet_change = err(x0_prediction(lora_model, s["src"], s["inv"]), x0_prediction(s["model"], s["src"], s["inv"]))
    # official DreamBooth script: the chain is inverted with the customised model
    inv_lora = invert(lora_model, s["latent"], s["src"])
    chain_change = err(inv_lora.chain[0], s["inv"].chain[0])
    variations, reference = rival(lora_model, s["src"], s["empty"], inv_lora, seed=4, batch_size=1)
    base = rival(s["model"], s["src"], s["empty"], s["inv"], seed=4, batch_size=1)[0]["samples"]
    measured(f"LoRA: x0 prediction change {unet_change:.3f}; x_T of the LoRA'd inversion vs base {chain_change:.3f}; "
             f"RIVAL LoRA vs base {err(variations['samples'], base):.3f}; reference vs source "
             f"{err(reference['samples'], s['source']):.1e}")
    assert unet_change > 0.05 and chain_change > 0.05
    assert err(variations["samples"], base) > 0.05 and torch.isfinite(variations["samples"]).all()
    assert err(reference["samples"], s["source"]) < 1e-5


# -- unCLIP -------------------------------------------------------------------------------------------------------
def test_rival_on_an_unclip_model_with_stock_unclip_conditioning():
    from tests.harness import models
    model, clip, vae = extra_models.load_unclip()
    vision = models.load_clip_vision()
    encode = comfy_nodes.CLIPVisionEncode()
    crop = ("center",) if "crop" in encode.INPUT_TYPES()["required"] else ()
    embed = lambda name: getattr(encode, encode.FUNCTION)(vision, photos.photo(name, 128), *crop)[0]  # noqa: E731
    text = comfy_nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
    empty = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
    unclip = lambda name: comfy_nodes.unCLIPConditioning().apply_adm(text, embed(name), 1.0, 0.0)[0]  # noqa: E731
    latent = encode_photo(vae)
    # the photo is inverted with its own image embedding; the variations are generated from another image's
    inv = invert(model, latent, unclip("astronaut"))
    adm_change = err(x0_prediction(model, unclip("chelsea"), inv), x0_prediction(model, text, inv))
    runs = {mode: rival(model, unclip("chelsea"), empty, inv, seed=5, batch_size=1, reference_kv=mode)
            for mode in ("cache", "batch")}
    text_only = rival(model, text, empty, inv, seed=5, batch_size=1)[0]["samples"]
    out = runs["cache"][0]["samples"]
    cache_vs_batch = err(out, runs["batch"][0]["samples"])
    measured(f"unCLIP: x0 prediction with vs without the image embedding {adm_change:.3f}; RIVAL chelsea-embedding vs "
             f"text-only {err(out, text_only):.4f}; cache vs batch {cache_vs_batch:.1e}; reference vs source "
             f"{err(runs['batch'][1]['samples'], latent['samples']):.1e}")
    assert type(model.model).__name__ == "SD21UNCLIP"
    # small on this test model: at width 32 the UNet's GroupNorm has one channel per group, which removes most of
    # the per-channel embedding offset a ResBlock adds (the timestep's too); the ADM input does reach the model
    assert adm_change > 5e-4 and err(out, text_only) > 1e-3
    # the reference row reads the inversion's embedding in both layouts (batch: the wrapper swaps its ADM vector in;
    # without the swap the batch layout differs by 1.0e-3 here); what remains is the fp16 K/V cache's rounding
    assert cache_vs_batch < 3e-4
    assert err(runs["batch"][1]["samples"], latent["samples"]) < 1e-5
