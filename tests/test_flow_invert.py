"""DDIM Invert on rectified-flow DiT models (Flux dev-style, Chroma, Qwen-Image, SD3.5): the small random-weight
layouts of tests/harness/flow_models.py (and flow_models_more.py), loaded through the stock loaders, inverted by the
pack and sampled back by the stock SamplerCustomAdvanced (euler / ddim) from Inverted Noise. These families exist
only in 0.3x trees: on others every test here skips and says the tree lacks the family."""
import pytest
import torch

from inversion_chain.artifacts import InversionChainError
from inversion_chain.model_info import model_key
from inversion_chain.nodes.invert import ICDDIMInvert
from inversion_chain.nodes.inverted_noise import ICInvertedNoise
from tests.harness.measure import measured
from tests.harness import flow_models, photos

SOURCE = "a photo of an astronaut"
GUIDANCE = 3.5          # the graph's FluxGuidance value (Flux-dev's usual one)
TARGET = 1e-3           # issue 25: round trip, LATENT max abs
CALLS_TARGET = 2.0      # issue 25: model calls per step
SCHEDULES = [(s, n) for s in ("simple", "beta") for n in (20, 28, 50)]
# Where the round trip misses TARGET on these random-weight layouts (Chroma's layout contracts too slowly at its
# lowest sigmas with these step sizes). strict: a case that starts passing fails, so the list stays true.
ERROR_NOT_YET = {("chroma", "simple", 20), ("chroma", "simple", 28), ("chroma", "simple", 50), ("chroma", "beta", 20),
                 ("chroma", "beta", 28)}
FAMILY_CLASS = {"flux": "Flux", "chroma": "Chroma", "qwen_image": "QwenImage", "sd3": "SD3"}
TRUE_CFG = ("chroma", "qwen_image", "sd3")    # families with a real unconditional branch
# the families' usual true-CFG values (Chroma's and Qwen-Image's templates use about 4, SD3.5's 4.5)
TRUE_CFG_VALUE = {"chroma": 4.0, "qwen_image": 4.0, "sd3": 4.5}
CFG_NOT_YET = {("chroma", 20): "6.9e-1", ("chroma", 50): "6.9e-2", ("qwen_image", 20): "1.8e-3"}   # measured
SHIFT_NODE_NOT_YET = set()
_inversions = {}


def _skip_without(family):
    reason = flow_models.missing_family(family)
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module", params=flow_models.FAMILIES)
def flow(request):
    family = request.param
    _skip_without(family)
    import node_helpers
    model, clip, vae = flow_models.load_family(family)
    with torch.inference_mode():
        latent = {"samples": vae.encode(photos.photo("astronaut", 128))}
        out = clip.encode_from_tokens(clip.tokenize(SOURCE), return_pooled=True, return_dict=True)
        cond = out.pop("cond")
        positive = [[cond, out]]
        if family == "flux":   # what the stock FluxGuidance node does
            positive = node_helpers.conditioning_set_values(positive, {"guidance": GUIDANCE})
    return dict(family=family, model=model, clip=clip, vae=vae, latent=latent, positive=positive)


def invert(f, steps, scheduler, refine_iters=6, model=None, inversion_cfg=1.0, **kw):
    with torch.inference_mode():
        return ICDDIMInvert().invert(model or f["model"], f["latent"], f["positive"], steps, inversion_cfg,
                                     refine_iters, scheduler=scheduler, **kw)


def sample_back(f, inv, sigmas, sampler_name="euler", positive=None, model=None):
    """The stock graph: Inverted Noise -> SamplerCustomAdvanced (BasicGuider, KSamplerSelect, DDIM Invert's sigmas),
    its latent_image an empty latent of the image's size."""
    import comfy_extras.nodes_custom_sampler as ncs
    model = model or f["model"]
    with torch.inference_mode():
        noise = ICInvertedNoise().noise(model, inv)["result"][0]
        guider = ncs.BasicGuider.execute(model, positive or f["positive"]).result[0]
        sampler = ncs.KSamplerSelect.execute(sampler_name).result[0]
        empty = {"samples": torch.zeros_like(f["latent"]["samples"])}
        return ncs.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, empty).result[0]["samples"]


def error(a, b):
    return float((a.float() - b.float()).abs().max())


def test_test_models_load_through_the_stock_loaders(flow):
    """The saved diffusion model reloads bit-exactly through UNETLoader's loader; its sampling is rectified flow."""
    import comfy.model_sampling
    family, model = flow["family"], flow["model"]
    built = flow_models.build_state_dict(family)
    loaded = model.model.diffusion_model.state_dict()
    assert set(loaded) == set(built)
    assert all(torch.equal(loaded[k].float(), built[k]) for k in built)
    assert isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.CONST)
    assert type(model.model.model_config).__name__.endswith(FAMILY_CLASS[family])
    assert sum(v.numel() for v in built.values()) < 2_000_000
    assert flow["vae"].latent_channels == 16 and flow["latent"]["samples"].shape[1] == 16
    key = model_key(model)   # what an INVERSION records to match its model: the DiT's width and text width
    assert key.channels == 128 and key.context_dim == {"sd3": 4096}.get(family, 32)


def cached_inversion(f, scheduler, steps):
    key = (f["family"], scheduler, steps)
    if key not in _inversions:
        _inversions[key] = invert(f, steps, scheduler)
    return _inversions[key]


@pytest.mark.parametrize("scheduler,steps", SCHEDULES, ids=[f"{s}-{n}" for s, n in SCHEDULES])
def test_round_trip_within_the_issue_target(flow, scheduler, steps, request):
    """Invert with default settings, sample back with euler and with ddim: both < TARGET in LATENT space."""
    if (flow["family"], scheduler, steps) in ERROR_NOT_YET:
        request.applymarker(pytest.mark.xfail(strict=True, reason="round trip above issue 25's target on this "
                                              "random-weight layout"))
    _, sigmas, inv = cached_inversion(flow, scheduler, steps)
    source = flow["latent"]["samples"]
    errs = {name: error(sample_back(flow, inv, sigmas, name), source) for name in ("euler", "ddim")}
    measured(f"{flow['family']} {scheduler} {steps} steps: round trip euler {errs['euler']:.3e}, ddim "
          f"{errs['ddim']:.3e}, {inv.unet_calls / steps:.2f} model calls per step")
    assert errs["euler"] == errs["ddim"]   # ComfyUI's ddim sampler is its euler on these models
    assert errs["euler"] < TARGET


@pytest.mark.parametrize("scheduler,steps", SCHEDULES, ids=[f"{s}-{n}" for s, n in SCHEDULES])
@pytest.mark.xfail(strict=True, reason="issue 25's budget of two model calls per step is not met yet: the default "
                   "tolerance needs 2.7-4.9 evaluations per step on these random-weight layouts (measured; "
                   "docs/nodes.md, DDIM Invert, says what was tried)")
def test_model_calls_per_step_within_the_issue_budget(flow, scheduler, steps):
    _, _, inv = cached_inversion(flow, scheduler, steps)
    assert inv.unet_calls / steps <= CALLS_TARGET


@pytest.mark.parametrize("scheduler", ["simple", "beta"])
def test_exact_inversion_beats_naive_and_the_flux_schedule_is_used(flow, scheduler):
    """At 50 steps (default settings) the fixed point reconstructs far better than the naive inversion, through the
    stock sampler, on the family's own shifted schedule."""
    steps = 50
    source = flow["latent"]["samples"]
    _, sigmas, inv = invert(flow, steps, scheduler)
    _, naive_sigmas, naive = invert(flow, steps, scheduler, refine_iters=0)
    exact_err, naive_err = error(sample_back(flow, inv, sigmas), source), error(sample_back(flow, naive, naive_sigmas),
                                                                                source)
    measured(f"{flow['family']} {scheduler} {steps}: exact {exact_err:.3e} ({inv.unet_calls / steps:.2f} calls/step), "
          f"naive {naive_err:.3e}")
    assert exact_err * 20 < naive_err
    ms = flow["model"].get_model_object("model_sampling")
    assert float(sigmas[0]) == pytest.approx(1.0) and float(sigmas[-1]) == 0.0
    assert getattr(ms, "shift", 1.0) != 1.0   # Flux's shifted sigmas (ModelSamplingFlux), not a linear ramp
    if scheduler == "simple":
        assert torch.allclose(sigmas[:-1], ms.sigmas.flip(0)[::len(ms.sigmas) // steps][:steps].float(), atol=1e-6)


def row_counting_clone(model):
    """A clone of ``model`` that records the batch rows of every model forward: (clone, rows)."""
    model, rows = model.clone(), []

    def count(apply_model, args):
        rows.append(int(args["input"].shape[0]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(count)
    return model, rows


def test_flux_guidance_is_the_graphs_and_inversion_runs_one_forward_per_evaluation(flow):
    """cfg 1: one model forward of one row per evaluation (no unconditional branch); Flux reads the FluxGuidance
    value of `positive`, so sampling back at another guidance does not reconstruct."""
    import node_helpers
    model, rows = row_counting_clone(flow["model"])
    steps = 20
    _, sigmas, inv = invert(flow, steps, "simple", model=model)
    assert len(rows) == inv.unet_calls and set(rows) == {1}
    if flow["family"] != "flux":
        return
    source = flow["latent"]["samples"]
    other = node_helpers.conditioning_set_values(flow["positive"], {"guidance": GUIDANCE + 2.0})
    same_err = error(sample_back(flow, inv, sigmas), source)
    other_err = error(sample_back(flow, inv, sigmas, positive=other), source)
    assert same_err * 10 < other_err


def stock_shift_node(family, model):
    """The family's stock model-sampling node as its workflows use it: Flux's resolution-dependent shift, SD3's
    ModelSamplingSD3 at another shift than the config's 3.0, Qwen-Image's ModelSamplingAuraFlow at 3.1 (the value of
    ComfyUI's Qwen-Image template). (patched MODEL, label), or None for Chroma."""
    import comfy_extras.nodes_model_advanced as nma
    if family == "flux":
        return nma.ModelSamplingFlux().patch(model, 1.15, 0.5, 128, 128)[0], "ModelSamplingFlux(128x128)"
    if family == "sd3":
        return nma.ModelSamplingSD3().patch(model, 6.0)[0], "ModelSamplingSD3(shift 6.0)"
    if family == "qwen_image":
        return nma.ModelSamplingAuraFlow().patch_aura(model, 3.1)[0], "ModelSamplingAuraFlow(shift 3.1)"
    return None


def test_stock_model_sampling_node_shift(flow, request):
    """With the family's stock shift node the inversion follows the patched schedule and still reconstructs."""
    patched = stock_shift_node(flow["family"], flow["model"])
    if patched is None:
        pytest.skip("Chroma's workflows use its config's schedule; no stock shift node to follow")
    if flow["family"] in SHIFT_NODE_NOT_YET:
        request.applymarker(pytest.mark.xfail(strict=True, reason="round trip above issue 25's target with this "
                                              "shift on this random-weight layout"))
    model, label = patched
    steps = 50
    _, sigmas, inv = invert(flow, steps, "simple", model=model)
    _, plain_sigmas, _ = invert(flow, 4, "simple")
    assert not torch.allclose(sigmas[1:2], plain_sigmas[1:2])
    err = error(sample_back(flow, inv, sigmas, model=model), flow["latent"]["samples"])
    measured(f"{flow['family']} with {label} simple {steps}: round trip {err:.3e}, "
          f"{inv.unet_calls / steps:.2f} calls/step")
    assert err < TARGET


def true_cfg_round_trip(flow, steps, **invert_kw):
    """Invert at the family's usual true cfg with an empty negative, sample back with the stock CFGGuider at the same
    cfg: (round-trip error, error of the same chain sampled back at cfg 1, INVERSION). Asserts every evaluation ran
    the cond and the uncond row (one batched forward, or two where ComfyUI cannot batch them)."""
    import comfy_extras.nodes_custom_sampler as ncs
    family = flow["family"]
    cfg = TRUE_CFG_VALUE[family]
    clip = flow["clip"]
    with torch.inference_mode():
        out = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True, return_dict=True)
    negative = [[out.pop("cond"), out]]
    model, rows = row_counting_clone(flow["model"])
    _, sigmas, inv = invert(flow, steps, "simple", model=model, inversion_cfg=cfg, negative=negative, **invert_kw)
    assert sum(rows) == 2 * inv.unet_calls and len(rows) in (inv.unet_calls, 2 * inv.unet_calls)
    with torch.inference_mode():
        noise = ICInvertedNoise().noise(flow["model"], inv)["result"][0]
        guider = ncs.CFGGuider.execute(flow["model"], flow["positive"], negative, cfg).result[0]
        sampler = ncs.KSamplerSelect.execute("euler").result[0]
        empty = {"samples": torch.zeros_like(flow["latent"]["samples"])}
        back = ncs.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, empty).result[0]["samples"]
    source = flow["latent"]["samples"]
    return error(back, source), error(sample_back(flow, inv, sigmas), source), inv


@pytest.mark.parametrize("steps", [20, 50])
def test_true_cfg_inversion_round_trip(flow, steps, request):
    """Families with a real unconditional branch invert at their usual cfg with a negative prompt: every evaluation
    runs the cond and the uncond row (one batched forward, or two where ComfyUI cannot batch them: Qwen-Image's
    prompts of different token counts), and the stock CFGGuider at the same cfg samples back the source."""
    family = flow["family"]
    if family not in TRUE_CFG:
        pytest.skip("guidance-distilled Flux has no unconditional branch: it inverts at cfg 1 with the FluxGuidance "
                    "value")
    if (family, steps) in CFG_NOT_YET:
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"round trip at true cfg measured "
                                              f"{CFG_NOT_YET[family, steps]}, above issue 25's target on this "
                                              f"random-weight layout"))
    err, at_cfg1, inv = true_cfg_round_trip(flow, steps)
    measured(f"{family} cfg {TRUE_CFG_VALUE[family]} simple {steps}: round trip {err:.3e} "
          f"({inv.unet_calls / steps:.2f} calls/step); sampled back at cfg 1 instead: {at_cfg1:.3e}")
    assert err * 10 < at_cfg1      # control: the check sees which guidance the chain was made with
    assert err < TARGET


# Where the defaults (refine_iters 6, tolerance 3e-4) miss the target: the same solver with a higher cap and a
# tighter tolerance (what docs/nodes.md tells Chroma users to set). Cases: (family, scheduler, steps, cfg), cfg "1" or
# "true" (the family's usual true cfg).
TIGHT = dict(refine_iters=20, tolerance=1e-4)
TIGHT_CASES = sorted({(f, s, n, "1") for f, s, n in ERROR_NOT_YET} | {(f, "simple", n, "true") for f, n in CFG_NOT_YET})
TIGHT_NOT_YET = {("chroma", "simple", 20, "true"): "7.4e-2"}   # measured, where even the tight settings miss


@pytest.mark.parametrize("flow,scheduler,steps,cfg", TIGHT_CASES, ids=["-".join(map(str, c)) for c in TIGHT_CASES],
                         indirect=["flow"])
def test_tight_settings_reach_the_target_where_the_defaults_miss(flow, scheduler, steps, cfg, request):
    family = flow["family"]
    if (family, scheduler, steps, cfg) in TIGHT_NOT_YET:
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"measured "
                                              f"{TIGHT_NOT_YET[family, scheduler, steps, cfg]}"))
    if cfg == "1":
        _, sigmas, inv = invert(flow, steps, scheduler, **TIGHT)
        err = error(sample_back(flow, inv, sigmas), flow["latent"]["samples"])
    else:
        err, at_cfg1, inv = true_cfg_round_trip(flow, steps, **TIGHT)
        assert err * 10 < at_cfg1
    measured(f"{family} {scheduler} {steps} cfg {cfg}: tight round trip {err:.3e} ({inv.unet_calls / steps:.2f} "
          f"calls/step)")
    assert err < TARGET


def test_samplercustom_without_noise_cannot_start_a_flow_model_at_sigma_1(flow):
    """Why Inverted Noise exists: SamplerCustom (add_noise off) scales the LATENT by 1 - sigma = 0 at sigma 1."""
    import comfy.sample
    import comfy.samplers
    noise, sigmas, inv = cached_inversion(flow, "beta", 50)
    with torch.inference_mode():
        stock = comfy.sample.sample_custom(flow["model"], torch.zeros_like(noise["samples"]), 1.0,
                                           comfy.samplers.sampler_object("euler"), sigmas, flow["positive"],
                                           flow["positive"], noise["samples"], seed=0)
    source = flow["latent"]["samples"]
    assert error(stock, source) > 100 * error(sample_back(flow, inv, sigmas), source)


def test_partial_inversion_samples_back_with_stock_samplercustom_and_ksampler_advanced(flow):
    """end_percent < 1 stops below sigma 1: DDIM Invert's `noise` LATENT follows ComfyUI's mid-schedule convention
    (x / (1 - sigma) on flow models), so SamplerCustom (add_noise off) and KSampler Advanced (start_at_step,
    add_noise disable) start exactly at the chain's latent, as Inverted Noise does."""
    import comfy_extras.nodes_custom_sampler as ncs
    import nodes
    steps, end = 20, 0.5
    noise, sigmas, inv = invert(flow, steps, "simple", end_percent=end)
    assert 0.0 < float(sigmas[0]) < 1.0 and inv.steps == steps // 2
    source = flow["latent"]["samples"]
    with torch.inference_mode():
        sampler = ncs.KSamplerSelect.execute("euler").result[0]
        custom = ncs.SamplerCustom.execute(flow["model"], False, 0, 1.0, flow["positive"], flow["positive"], sampler,
                                           sigmas, noise).result[0]["samples"]
        advanced = nodes.KSamplerAdvanced().sample(flow["model"], "disable", 0, steps, 1.0, "euler", "simple",
                                                   flow["positive"], flow["positive"], noise, steps - inv.steps,
                                                   10000, "disable")[0]["samples"]
    reference = sample_back(flow, inv, sigmas)
    measured(f"{flow['family']} partial {inv.steps}/{steps}: round trip SamplerCustom {error(custom, source):.3e}, "
          f"KSampler Advanced {error(advanced, source):.3e}, SamplerCustomAdvanced {error(reference, source):.3e}")
    assert error(custom, reference) < 1e-5 and error(advanced, reference) < 1e-5
    if flow["family"] == "flux":
        assert error(custom, source) < TARGET


def test_qwen_image_samples_back_from_the_stock_empty_latent(flow):
    """Qwen-Image graphs start from EmptySD3LatentImage ([B, 16, H, W]); SamplerCustomAdvanced makes it
    [B, 16, 1, H, W] before asking Inverted Noise, so the inversion of a VAE-encoded [B, 16, 1, H, W] latent
    samples back the same from it."""
    if flow["family"] != "qwen_image":
        pytest.skip("only Qwen-Image's VAE gives 5-D latents")
    import comfy_extras.nodes_sd3 as nsd3
    _, sigmas, inv = cached_inversion(flow, "simple", 20)
    h, w = flow["latent"]["samples"].shape[-2:]
    empty = nsd3.EmptySD3LatentImage.execute(w * 8, h * 8, 1).result[0]
    assert empty["samples"].ndim == 4
    with torch.inference_mode():
        import comfy_extras.nodes_custom_sampler as ncs
        noise = ICInvertedNoise().noise(flow["model"], inv)["result"][0]
        guider = ncs.BasicGuider.execute(flow["model"], flow["positive"]).result[0]
        sampler = ncs.KSamplerSelect.execute("euler").result[0]
        back = ncs.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, empty).result[0]["samples"]
    assert back.shape == flow["latent"]["samples"].shape
    assert error(back, sample_back(flow, inv, sigmas)) == 0.0


def test_other_nodes_refuse_flow_models_naming_the_family(flow):
    from inversion_chain.artifacts import naming
    from inversion_chain.model_info import check_supported
    name = FAMILY_CLASS[flow["family"]]
    for node in ("RIVAL Align Sampler", "P2Plus Controller"):
        with pytest.raises(InversionChainError, match=f"^{node}: the model family '[^']*{name}[^']*' .*not supported "
                                                      f"yet"), naming(node):   # as the node contract runs them
            check_supported(flow["model"])


@pytest.mark.parametrize("given", ["empty", "source"])
def test_inverted_noise_on_sd_starts_where_samplercustom_does(small_model, astronaut_latent, encode, given):
    """On every tree (no flow family needed): the NOISE Inverted Noise makes, given to ComfyUI's sampler with an empty
    or the source latent, starts at the inverted latent, so it samples back what SamplerCustom (add_noise off)
    does from DDIM Invert's `noise` LATENT."""
    import comfy.sample
    import comfy.samplers
    model, clip = small_model[0], small_model[1]
    positive = encode(clip, SOURCE)
    with torch.inference_mode():
        noise, sigmas, inv = ICDDIMInvert().invert(model, astronaut_latent, positive, 10, 1.0, 3)
        latent = astronaut_latent["samples"] if given == "source" else torch.zeros_like(astronaut_latent["samples"])
        start = ICInvertedNoise().noise(model, inv)["result"][0].generate_noise({"samples": latent})
        sampler = comfy.samplers.sampler_object("ddim")
        ours = comfy.sample.sample_custom(model, start, 1.0, sampler, sigmas, positive, positive, latent, seed=0)
        stock = comfy.sample.sample_custom(model, torch.zeros_like(latent), 1.0, sampler, sigmas, positive, positive,
                                           noise["samples"], seed=0)
    assert error(ours, stock) < 1e-4
    assert error(stock, astronaut_latent["samples"]) < 1e-2


@pytest.mark.fast
def test_latent_contract_takes_one_frame_of_a_video_vae_latent_only():
    """Qwen-Image's VAE Encode gives [B, 16, 1, H, W]: DDIM Invert's LATENT input takes it (every tree; the check does
    not need the family); more frames, or a 3-D tensor, are refused naming the input and what is accepted."""
    from inversion_chain.nodes.contract import validate
    from inversion_chain.samplers.inversion import check_latent
    one_frame = torch.zeros(1, 16, 1, 8, 8)
    validate(ICDDIMInvert, {"latent": {"samples": one_frame}})
    check_latent(one_frame)
    for bad in (torch.zeros(1, 16, 2, 8, 8), torch.zeros(16, 8, 8)):
        with pytest.raises(InversionChainError, match=r"(?s)DDIM Invert: input `latent` got .*accepted: a LATENT: .*"
                                                      r"\[B, C, 1, H, W\]"):
            validate(ICDDIMInvert, {"latent": {"samples": bad}})
        with pytest.raises(InversionChainError, match=r"^expected a LATENT .*\[batch, channels, 1, height"):
            check_latent(bad)   # unnamed below the node: the contract puts "DDIM Invert: " in front
