"""Partial DDIM inversion (DDIM Invert's end_percent): the chain stops at an intermediate noise level, its outputs
describe only the steps that ran, stock samplers reconstruct from there, and every node that takes an INVERSION
either works on the partial chain (identity cases) or says why not."""
import pytest
import torch

import nodes

from inversion_chain.artifacts import InversionChainError
from inversion_chain.nodes.attention_maps import ICAttentionCapture, ICAttentionMapViewer
from inversion_chain.nodes.invert import ICDDIMInvert
from inversion_chain.nodes.kv_inject import ICKVInject
from inversion_chain.nodes.p2plus import ICNullTextInversion, ICP2PlusController
from inversion_chain.nodes.rival import ICRIVALAlignSampler
from tests.harness.sampling import sample
from tests.harness.measure import measured

STEPS = 8
END = 0.5          # inverts steps j = 0..3 (j/8 < 0.5): the chain ends at the sigma of sampling step 4 of 8
RUN = 4
CFG = 7.5
SOURCE = "a cat sitting on a wooden table"
TARGET = "a dog sitting on a wooden table"



def ksampler_advanced(model, positive, negative, latent, start_at_step, cfg=1.0, add_noise="disable", seed=0):
    """The stock KSampler Advanced on the whole STEPS-step ddim_uniform schedule from `start_at_step`."""
    return nodes.KSamplerAdvanced().sample(model, add_noise, seed, STEPS, cfg, "ddim", "ddim_uniform", positive,
                                           negative, {"samples": latent}, start_at_step, 10000, "disable")[0]["samples"]


def err(a, b):
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def p(family, family_model, family_encode, family_latent):
    model, clip, _ = family_model
    with torch.inference_mode():
        src = family_encode(clip, SOURCE)
        full = ICDDIMInvert().invert(model, family_latent, src, STEPS, 1.0, 6)
        part = ICDDIMInvert().invert(model, family_latent, src, STEPS, 1.0, 6, end_percent=END)
    return dict(family=family, model=model, clip=clip, src=src, empty=family_encode(clip, ""),
                source=family_latent["samples"], latent=family_latent, full=full, part=part)


def test_partial_chain_is_the_full_chains_clean_end_and_stock_samplers_reconstruct_it(p):
    (_, _, full), (noise, sigmas, inv) = p["full"], p["part"]
    noise = noise["samples"]
    assert (inv.steps, inv.full_steps, inv.start_step, inv.is_partial) == (RUN, STEPS, STEPS - RUN, True)
    # the inversion runs from the clean end, so its first RUN steps are the full inversion's, bit for bit, and
    # cost the same model calls
    assert torch.equal(inv.chain, full.chain[STEPS - RUN:])
    assert torch.equal(sigmas, full.sigmas[STEPS - RUN:])
    assert inv.unet_calls == int(full.step_calls[STEPS - RUN:].sum())
    # SamplerCustom + the returned sigmas, and KSampler Advanced from start_at_step (which slices ComfyUI's own
    # schedule: an independent statement of where the chain stops), reconstruct the photo
    custom = sample(p["model"], p["src"], p["src"], noise, sigmas)
    advanced = ksampler_advanced(p["model"], p["src"], p["src"], noise, inv.start_step)
    rt_full = err(sample(p["model"], p["src"], p["src"], p["full"][0]["samples"], p["full"][1]), p["source"])
    measured(f"{p['family']}: round trip ({STEPS} ddim_uniform steps) end_percent 1.0: {rt_full:.2e} "
             f"({full.unet_calls} UNet calls); end_percent {END}: SamplerCustom {err(custom, p['source']):.2e}, "
             f"KSampler Advanced start_at_step {inv.start_step}: {err(advanced, p['source']):.2e} "
             f"({inv.unet_calls} UNet calls)")
    assert err(custom, p["source"]) < 1e-3 and err(advanced, custom) < 1e-5


def test_end_percent_counts_inversion_steps_from_the_clean_end(small_model, encode, astronaut_latent):
    """Inversion step j of N runs when j/N < end_percent (the pack's one rule), so end_percent e inverts
    ceil(e * N) steps; 0 inverts none and is refused naming the input."""
    model, clip, _ = small_model
    src = encode(clip, SOURCE)
    expected = {0.05: 1, 0.1: 1, 0.11: 2, 0.5: 5, 0.55: 6, 0.99: 10, 1.0: 10}   # N = 10, worked out by hand
    for end, run in expected.items():
        inv = ICDDIMInvert().invert(model, astronaut_latent, src, 10, 1.0, 0, end_percent=end)[2]
        assert inv.steps == run, (end, inv.steps)
        assert ("partial" in inv.summary()) == (run < 10)
    with pytest.raises(InversionChainError, match="end_percent"):
        ICDDIMInvert().invert(model, astronaut_latent, src, 10, 1.0, 0, end_percent=0.0)


# -- downstream nodes on a partial chain, every family -----------------------------------------------------------
@pytest.fixture(scope="module")
def q(family, family_model, family_encode, family_latent):
    model, clip, _ = family_model
    with torch.inference_mode():
        src = family_encode(clip, SOURCE)
        noise, sigmas, inv = ICDDIMInvert().invert(model, family_latent, src, STEPS, 1.0, 6, end_percent=END)
    return dict(family=family, model=model, clip=clip, src=src, tgt=family_encode(clip, TARGET),
                empty=family_encode(clip, ""), noise=noise["samples"], sigmas=sigmas, inv=inv,
                source=family_latent["samples"], latent=family_latent)


def denoised_per_step(model, positive, q):
    seen = []
    sample(model, positive, positive, q["noise"], q["sigmas"], callback=lambda i, d, x, n: seen.append(d.clone()))
    return seen


def test_kv_inject_identity_and_start_percent_counts_the_sampled_steps(q):
    plain = sample(q["model"], q["src"], q["src"], q["noise"], q["sigmas"])
    kv = ICKVInject().patch(q["model"], q["inv"], 0.0, 0, "mutual")[0]
    identity = err(sample(kv, q["src"], q["src"], q["noise"], q["sigmas"]), plain)
    # start_percent 0.5 of the 4 sampled steps = steps 2 and 3 (were it counted on the whole 8-step schedule, the
    # sampled steps 4..7 of 8 would all inject)
    late = ICKVInject().patch(q["model"], q["inv"], 0.5, 0, "mutual")[0]
    own, injected = denoised_per_step(q["model"], q["tgt"], q), denoised_per_step(late, q["tgt"], q)
    same = [torch.equal(a, b) for a, b in zip(own, injected)]
    measured(f"{q['family']}: KV Inject on the partial chain: identity {identity:.2e}; steps equal to the plain run: "
             f"{same}")
    assert identity < 1e-3 and same == [True, True, False, False]


def test_rival_edits_from_the_partial_level_and_refuses_new_noise(q):
    out, ref = ICRIVALAlignSampler().sample(q["model"], q["src"], q["src"], q["inv"], 0, 1, 1.0, 0.4, 0.4,
                                            "inverted", "eps", "batch")
    identity = err(out["samples"], q["source"])   # same prompt, cfg 1: every row stays on the chain
    measured(f"{q['family']}: RIVAL init inverted on the partial chain, cfg 1: variation vs photo {identity:.2e}")
    assert identity < 1e-3 and err(ref["samples"], q["source"]) < 1e-5
    with pytest.raises(InversionChainError, match=r"(?s)`inversion` is partial.*init 'permute'.*end_percent 1"):
        ICRIVALAlignSampler().sample(q["model"], q["src"], q["empty"], q["inv"], 0, 1, 5.0, 0.4, 0.4, "permute",
                                     "eps")


def test_p2plus_and_null_text_on_the_partial_chain(q):
    m, pos, neg, latent, sigmas = ICP2PlusController().build(q["model"], q["clip"], SOURCE, SOURCE, "replace", 0.6,
                                                             0.6, 0.5, inversion=q["inv"], blend_words="cat")
    assert torch.equal(sigmas, q["sigmas"])
    same = sample(m, pos, neg, latent["samples"], sigmas, 3.0)
    assert torch.equal(same[0], same[1])
    # the P2Plus latent and sigmas on KSampler Advanced's wiring (start_at_step) give the same rows
    assert err(ksampler_advanced(m, pos, neg, latent["samples"], q["inv"].start_step, 3.0), same) < 1e-5
    npi = ICNullTextInversion().run(q["model"], q["inv"], q["src"], q["empty"], CFG, 1, "negative-prompt")[0]
    nt = ICNullTextInversion().run(q["model"], q["inv"], q["src"], q["empty"], CFG, 3, "null-text",
                                   learning_rate=0.1)[0]
    cfg1 = sample(q["model"], q["src"], q["src"], q["noise"], q["sigmas"])
    rows = {}
    for name, null_text in (("plain", None), ("negative-prompt", npi), ("null-text", nt)):
        m, pos, neg, latent, sigmas = ICP2PlusController().build(q["model"], q["clip"], SOURCE, TARGET, "replace",
                                                                 0.6, 0.6, 0.0, inversion=q["inv"],
                                                                 null_text=null_text)
        rows[name] = sample(m, pos, neg, latent["samples"], sigmas, CFG)[:1]
    errors = {k: err(v, q["source"]) for k, v in rows.items()}
    measured(f"{q['family']}: P2Plus row 0 vs photo on the partial chain, cfg 7.5: " + ", ".join(f"{k} {v:.3g}"
                                                                          for k, v in errors.items()))
    assert err(rows["negative-prompt"], cfg1) < 1e-4
    assert errors["null-text"] < errors["plain"]
    # sampled on the whole schedule instead, the edit names the partial wiring
    with pytest.raises(InversionChainError, match=f"start_at_step {q['inv'].start_step}"):
        ksampler_advanced(m, pos, neg, latent["samples"], 0, CFG)


def test_attention_capture_and_viewer_count_the_sampled_steps(q):
    m, maps = ICAttentionCapture().capture(q["model"], "cross", "all", "per layer", 4, clip=q["clip"],
                                           prompt=SOURCE)
    out = sample(m, q["src"], q["empty"], q["noise"], q["sigmas"], 3.0)
    assert torch.equal(out, sample(q["model"], q["src"], q["empty"], q["noise"], q["sigmas"], 3.0))
    maps.flush()
    assert maps.fractions() == [i / RUN for i in range(RUN)]   # the viewer's percents: of the sampled steps
    view = ICAttentionMapViewer().view(maps, q["latent"], "cross", "cat", 0.5, 1.0, "all", "all captured", "cond",
                                       0, "per tile", 0, None)
    image = view["result"][0] if isinstance(view, dict) else view[0]
    assert torch.isfinite(image).all()
