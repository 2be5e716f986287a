"""Every node on the three model families (SD1.5, SD2 v-prediction, SDXL with CLIPTextEncodeSDXL conditioning):
the behaviour each node promises, checked by invariants that do not depend on the family. Small models, few steps.

The per-node files check each node in depth on the SD1.5 layout; this file is the node x family matrix."""
import pytest
import torch


from inversion_chain.attention.core import patching
from inversion_chain.attention.core.layers import decoder_start
from inversion_chain.nodes.attention_maps import ICAttentionCapture, ICAttentionMapViewer
from inversion_chain.nodes.invert import ICDDIMInvert
from inversion_chain.nodes.kv_inject import ICKVInject
from inversion_chain.nodes.p2plus import ICNullTextInversion, ICP2PlusController
from inversion_chain.nodes.rival import ICRIVALAlignSampler
from tests.harness.sampling import sample
from tests.harness.measure import measured

STEPS = 5
CFG = 7.5
SOURCE = "a cat sitting on a wooden table"
TARGET = "a dog sitting on a wooden table"



@pytest.fixture(scope="module")
def s(family, family_model, family_encode, family_latent):
    model, clip, vae = family_model
    with torch.inference_mode():
        src, empty = family_encode(clip, SOURCE), family_encode(clip, "")
        noise, sigmas, inv = ICDDIMInvert().invert(model, family_latent, src, STEPS, 1.0, 6)
    return dict(family=family, model=model, clip=clip, src=src, empty=empty, noise=noise["samples"], sigmas=sigmas,
                inv=inv, source=family_latent["samples"], latent=family_latent)


def err(a, b):
    return float((a - b).abs().max())


def test_kv_inject_identity_and_masked_words(s):
    plain = sample(s["model"], s["src"], s["src"], s["noise"], s["sigmas"])
    kv = ICKVInject().patch(s["model"], s["inv"], 0.0, 0, "mutual")[0]
    identity = err(sample(kv, s["src"], s["src"], s["noise"], s["sigmas"]), plain)
    masked = ICKVInject().patch(s["model"], s["inv"], 0.0, 0, "masked", mask_words="cat", clip=s["clip"],
                                source_prompt=SOURCE, target_prompt=SOURCE)[0]
    out = sample(masked, s["src"], s["src"], s["noise"], s["sigmas"])
    measured(f"{s['family']}: KV Inject identity {identity:.2e}, masked vs plain {err(out, plain):.2e}")
    assert identity < 1e-3 and torch.isfinite(out).all()


def test_rival_cached_reference_equals_the_in_batch_reference(s):
    runs = {mode: ICRIVALAlignSampler().sample(s["model"], s["src"], s["empty"], s["inv"], 3, 2, 5.0, 0.4, 0.4,
                                               "permute", "eps", mode)[0]["samples"] for mode in ("cache", "batch")}
    diff = err(runs["cache"], runs["batch"])
    measured(f"{s['family']}: RIVAL cache vs batch {diff:.2e}")
    assert diff < 1e-3


def test_p2plus_same_prompt_rows_equal_and_negative_prompt_inversion_is_cfg_1(s):
    m, pos, neg, latent, sigmas = ICP2PlusController().build(s["model"], s["clip"], SOURCE, SOURCE, "replace", 0.6,
                                                             0.6, 0.5, inversion=s["inv"], blend_words="cat")
    same = sample(m, pos, neg, latent["samples"], sigmas, 3.0)
    assert torch.equal(same[0], same[1])
    # the P2Plus conditioning carries what the inversion was made with (SDXL: the size entries)
    for key, value in s["src"][0][1].items():
        if not torch.is_tensor(value):
            assert pos[0][1][key] == value
    npi = ICNullTextInversion().run(s["model"], s["inv"], s["src"], s["empty"], CFG, 1, "negative-prompt")[0]
    m, pos, neg, latent, sigmas = ICP2PlusController().build(s["model"], s["clip"], SOURCE, TARGET, "replace", 0.6,
                                                             0.6, 0.0, inversion=s["inv"], null_text=npi)
    row0 = sample(m, pos, neg, latent["samples"], sigmas, CFG)[:1]
    cfg1 = sample(s["model"], s["src"], s["empty"], s["noise"], s["sigmas"], 1.0)
    measured(f"{s['family']}: P2Plus NPI row 0 vs cfg-1 reconstruction {err(row0, cfg1):.2e}, vs source "
             f"{err(row0, s['source']):.2e}; edit row 1 moved "
             f"{err(sample(m, pos, neg, latent['samples'], sigmas, CFG)[1:], row0):.2e}")
    assert err(row0, cfg1) < 1e-4 and err(row0, s["source"]) < 1e-3


def test_null_text_lowers_the_row_0_error_under_guidance(s):
    nt = ICNullTextInversion().run(s["model"], s["inv"], s["src"], s["empty"], CFG, 3, "null-text",
                                   learning_rate=0.1)[0]
    rows = {}
    for name, null_text in (("plain", None), ("null-text", nt)):
        m, pos, neg, latent, sigmas = ICP2PlusController().build(s["model"], s["clip"], SOURCE, TARGET, "replace",
                                                                 0.6, 0.6, 0.0, inversion=s["inv"],
                                                                 null_text=null_text)
        rows[name] = err(sample(m, pos, neg, latent["samples"], sigmas, CFG)[:1], s["source"])
    measured(f"{s['family']}: row 0 at cfg {CFG}: plain {rows['plain']:.3f}, null-text {rows['null-text']:.3f}")
    assert rows["null-text"] < rows["plain"]


def test_capture_and_viewer_find_the_words(s):
    m, maps = ICAttentionCapture().capture(s["model"], "cross + self", "all", "per layer", 4, clip=s["clip"],
                                           prompt=SOURCE)
    plain = sample(s["model"], s["src"], s["empty"], s["noise"], s["sigmas"], 3.0)
    out = sample(m, s["src"], s["empty"], s["noise"], s["sigmas"], 3.0)
    assert torch.equal(out, plain)   # capturing never changes the result
    maps.flush()
    for (kind, unit, branch), t in maps.steps[0].maps.items():
        if kind == "cross":
            sums = t.float().sum(1)
            assert torch.allclose(sums, torch.ones_like(sums), atol=2e-3)
    result = ICAttentionMapViewer().view(maps, s["latent"], "cross", "cat, table", 0.0, 1.0, "all", "all captured",
                                         "cond", 0, "per tile", 0, None)
    image = result["result"][0] if isinstance(result, dict) else result[0]
    assert image.ndim == 4 and torch.isfinite(image).all()


def test_default_start_layer_means_the_same_on_every_family(s):
    """MasaCtrl's SD1.5 default (10) is the first decoder layer at the second-finest attention level; the default
    picks that layer on every layout (SDXL has attention at two levels only, so its whole decoder qualifies)."""
    layers = patching.layers_of(s["model"])
    start = decoder_start(layers)
    levels = sorted({l.level for l in layers})
    assert layers[start].part == "up" and layers[start].level == levels[1]
    assert all(l.level > levels[1] for l in layers if l.part == "up" and l.index < start)
    if s["family"] in ("sd15", "sd2v"):
        assert start == 10
