"""The node x family matrix on the rectified-flow families (Flux dev-style, Chroma, Qwen-Image, SD3.5): the flow half
of tests/test_families.py. Every cell is either the family-independent invariant that file checks on SD1.5 / SD2-v /
SDXL, adapted to how the node is used on a flow model (Inverted Noise -> SamplerCustomAdvanced, FluxGuidance on
Flux's positive, Null-Text Conditioning for the negative), or, where the technique does not run on that family, the
node's refusal naming the node, the family, why, and what is supported.

The models are the small random-weight layouts of tests/harness/flow_models.py / flow_models_more.py through the
stock loaders; one 4-step inversion of a 64 px photo per family is shared by every cell. The in-depth checks of each
node stay in tests/test_flow_*.py; this file is the one place that shows the whole matrix. On trees without these
families (2024-03) every cell skips and names the missing family."""
import pytest
import torch

from inversion_chain.artifacts import InversionChainError
from inversion_chain.attention.core import dit_layers
from inversion_chain.attention.viewer.capture import query_points
from inversion_chain.nodes.attention_maps import ICAttentionCapture, ICAttentionMapViewer
from inversion_chain.nodes.invert import ICDDIMInvert
from inversion_chain.nodes.inverted_noise import ICInvertedNoise
from inversion_chain.nodes.kv_inject import ICKVInject
from inversion_chain.nodes.p2plus import ICNullTextConditioning, ICNullTextInversion, ICP2PlusController
from inversion_chain.nodes.rival import ICRIVALAlignSampler
from inversion_chain.nodes.style_diffusion import (ICStyleDiffusionApply, ICStyleDiffusionMapper,
                                                   ICStyleDiffusionStyleTransfer)
from tests.harness import flow_models, models, photos
from tests.harness.measure import measured

FAMILIES = flow_models.FAMILIES                        # flux, chroma, qwen_image, sd3
NAME = {"flux": "Flux", "chroma": "Chroma", "qwen_image": "QwenImage", "sd3": "SD3"}   # in compat.family_name
SOURCE = "a photo of an astronaut"
TARGET = "a photo of an elephant"
NEGATIVE = "a photo of an animal"     # as many T5 tokens as SOURCE: RIVAL's batch layout on Chroma stacks both
GUIDANCE = 3.5                         # FluxGuidance on Flux's positive
STEPS = 4
PX = 64                                # 8 x 8 latent: 16 image tokens
TRUE_CFG = {"chroma": 4.0, "qwen_image": 4.0, "sd3": 4.5}    # the families' usual true cfg (test_flow_invert.py)
CAPTURE_FAMILIES = ("flux", "chroma", "qwen_image", "sd3")


@pytest.fixture(scope="module", params=FAMILIES)
def f(request):
    family = request.param
    reason = flow_models.missing_family(family)
    if reason:
        pytest.skip(reason)
    import node_helpers
    model, clip, vae = flow_models.load_family(family)

    def encode(text):
        out = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True, return_dict=True)
        cond = [[out.pop("cond"), out]]
        if family == "flux":   # what the stock FluxGuidance node does
            cond = node_helpers.conditioning_set_values(cond, {"guidance": GUIDANCE})
        return cond

    with torch.inference_mode():
        latent = {"samples": vae.encode(photos.photo("astronaut", PX))}
        positive, negative, empty = encode(SOURCE), encode(NEGATIVE), encode("")
        _, sigmas, inv = ICDDIMInvert().invert(model, latent, positive, STEPS, 1.0, 6, scheduler="simple")
    return dict(family=family, name=NAME[family], model=model, clip=clip, latent=latent, positive=positive,
                negative=negative, empty=empty, sigmas=sigmas, inv=inv)


sample_back = flow_models.sample_back


def err(a, b):
    return float((a.float() - b.float()).abs().max())


def family_pattern(f):
    """The family as the nodes name it (compat.family_name: the config class, the test layouts' subclass, the
    network class), for message matching."""
    return rf"'[^']*{f['name']}[^']*'"


def bare_family(f):
    """The family name where a message gives it without quotes."""
    return rf"[^`']*?{f['name']}[^`']*?"


# -- KV Inject ---------------------------------------------------------------------------------------------------
# Identity edit (source prompt, every block from step 0) against the plain reconstruction, at 64 px / 4 steps: the
# injected K/V are the source's at the chain latents, which the sampled path misses by the round trip's error only.
# Measured (scripts/test_figures.py): below 1e-4 on Flux, Chroma, Qwen-Image and SD3.5 (test_flow_kv_inject.py:
# < 5e-4 at 256 px / 8 steps); asserted below 5e-4 and 1% of the round trip, as there.
KV_IDENTITY_TOL = 5e-4


def test_kv_inject_identity_or_refusal(f, store):
    plain = sample_back(f)
    with torch.inference_mode():
        kv = ICKVInject().patch(f["model"], f["inv"], 0.0, 0, "mutual")[0]
    identity, round_trip = err(sample_back(f, kv), plain), err(plain, f["latent"]["samples"])
    measured(f"{f['family']}: KV Inject identity {identity:.2e} (round trip {round_trip:.2e})")
    assert identity < KV_IDENTITY_TOL and identity < 1e-2 * round_trip
    # the default (start_layer -1) means the same on every joint-attention family: the blocks of Stable Flow's vital
    # layers at their relative depth (Qwen-Image: its middle band), what KV Inject records; never none
    blocks = dit_layers.enumerate_blocks(f["model"])
    store.clear()
    with torch.inference_mode():
        ICKVInject().patch(f["model"], f["inv"], 0.0, -1, "mutual")
    (entry,) = store.entries.values()
    recorded = {(kind, index) for _step, kind, index, _branch in entry.store}
    assert recorded == {b.key for b in dit_layers.select_blocks(blocks, -1)} and recorded


# -- RIVAL -------------------------------------------------------------------------------------------------------
# Cache vs batch: not bit for bit (the cache records the photo in a one-row forward, the batch layout in a three-row
# one, and the stock model on this CPU is not batch-invariant; test_flow_rival.py measures that yardstick at 128 px:
# flux 4.1e-6, chroma 1.2e-5). Measured here at 64 px: see scripts/test_figures.py; asserted below 1e-4.
RIVAL_TOL = 1e-4
RIVAL_FAMILIES = ("flux", "chroma", "qwen_image", "sd3")


def test_rival_cached_reference_equals_the_in_batch_reference_or_refusal(f, store):
    cfg = 2.0 if f["family"] in TRUE_CFG else 1.0   # Chroma: true CFG (both halves); guidance-distilled Flux: 1

    def run(mode):
        with torch.inference_mode():
            return ICRIVALAlignSampler().sample(f["model"], f["positive"], f["negative"], f["inv"], 0, 2, cfg,
                                                0.5, 0.5, "permute", "eps", mode)
    assert f["family"] in RIVAL_FAMILIES   # every flow family runs RIVAL (tests/test_flow_rival.py)
    cached, batched = run("cache"), run("batch")
    assert torch.equal(cached[1]["samples"], batched[1]["samples"])      # the photo's reference row
    diff = err(cached[0]["samples"], batched[0]["samples"])
    measured(f"{f['family']}: RIVAL cache vs batch {diff:.2e} (variation std {float(cached[0]['samples'].std()):.2f})")
    assert diff < RIVAL_TOL


# -- P2Plus Controller -------------------------------------------------------------------------------------------
P2PLUS_FAMILIES = ("flux", "chroma", "qwen_image")


def p2plus(f, target=SOURCE, **kw):
    with torch.inference_mode():
        return ICP2PlusController().build(f["model"], f["clip"], SOURCE, target, "replace", 1.0, 1.0, 1.0, **kw)


def test_p2plus_identical_prompts_give_identical_rows_or_refusal(f):
    """On Flux and Chroma the controller edits generated images (add_noise on, the seed's noise in both rows):
    identical prompts with every window open give identical rows bit for bit, and on a real image (`inversion`, sampled
    from Inverted Noise) row 0 is the plain reconstruction (`style`: the StyleDiffusion test below). Elsewhere the
    family is refused."""
    latent = {"samples": torch.zeros_like(f["latent"]["samples"])}
    if f["family"] not in P2PLUS_FAMILIES:
        # COORDINATOR: flip on merge of the P2Plus-on-Qwen-Image branch (this is today's refusal)
        with pytest.raises(InversionChainError, match=rf"^P2Plus Controller: the model family {family_pattern(f)} "
                                                      r"is not supported yet by this node; on rectified-flow models "
                                                      r"it edits Flux .*, Chroma and Qwen-Image"):
            p2plus(f, latent=latent, steps=STEPS, scheduler="simple")
        return
    import nodes
    model, positive, negative, rows, _ = p2plus(f, latent=latent, seed=1, steps=STEPS, scheduler="simple")
    cfg = 1.0 if f["family"] == "flux" else 2.0
    with torch.inference_mode():
        out = nodes.common_ksampler(model, 0, STEPS, cfg, "euler", "simple", positive, negative, rows)[0]["samples"]
    assert torch.equal(out[0], out[1])
    # a real image (the controller given the inversion): both rows start at the inverted latent (Inverted Noise over
    # the controller's 2-row LATENT); identical prompts: identical rows, row 0 the plain reconstruction
    import comfy_extras.nodes_custom_sampler as ncs
    model, positive, negative, rows, sigmas = p2plus(f, inversion=f["inv"])
    with torch.inference_mode():
        noise = ICInvertedNoise().noise(f["model"], f["inv"])["result"][0]
        guider = ncs.CFGGuider.execute(model, positive, negative, cfg).result[0]
        sampler = ncs.KSamplerSelect.execute("euler").result[0]
        real = ncs.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, rows).result[0]["samples"]
    plain = sample_back(f, negative=negative[:1] if cfg > 1 else None, cfg=cfg)
    measured(f"{f['family']}: P2Plus on the inverted photo, identical prompts: row 0 vs the plain reconstruction "
             f"{err(real[0], plain[0]):.2e}")
    assert torch.equal(real[0], real[1]) and err(real[0], plain[0]) < 1e-3


# -- Null-Text Inversion (sampled through Null-Text Conditioning) --------------------------------------------------
# 4 steps x 3 iterations at the node's learning_rate 0.1 (test_flow_null_text.py: 8 x 10, gains 3.5x-6.6x):
# measured gains in scripts/test_figures.py; asserted: null-text below plain inversion, and negative-prompt inversion
# at true cfg samples as cfg 1 does (within 1e-3 relative, as test_flow_null_text.py).
NT_INNER = 3


def test_null_text_lowers_the_reconstruction_error_under_true_cfg_or_refusal(f):
    if f["family"] not in TRUE_CFG:
        with pytest.raises(InversionChainError, match=rf"^Null-Text Inversion: input `model` is a "
                                                      rf"{bare_family(f)} model\. Flux is guidance-distilled"
                                                      r".*no real unconditional branch.*runs on Chroma, Qwen-Image, "
                                                      r"SD3\.5"):
            with torch.inference_mode():
                ICNullTextInversion().run(f["model"], f["inv"], f["positive"], f["empty"], 4.0, 1, "null-text")
        return
    cfg = TRUE_CFG[f["family"]]
    with torch.inference_mode():
        nt = ICNullTextInversion().run(f["model"], f["inv"], f["positive"], f["empty"], cfg, NT_INNER, "null-text",
                                       learning_rate=0.1)[0]
        npi = ICNullTextInversion().run(f["model"], f["inv"], f["positive"], f["empty"], cfg, 1,
                                        "negative-prompt")[0]
        negatives = {name: ICNullTextConditioning().convert(f["model"], made)[0]
                     for name, made in (("null-text", nt), ("negative-prompt", npi))}
    source = f["latent"]["samples"]
    errors = {name: err(sample_back(f, negative=neg, cfg=cfg), source) for name, neg in negatives.items()}
    errors["plain"] = err(sample_back(f, negative=f["empty"], cfg=cfg), source)
    errors["cfg 1"] = err(sample_back(f, negative=f["empty"], cfg=1.0), source)
    measured(f"{f['family']} cfg {cfg}: max LATENT error of the reconstruction: "
             + ", ".join(f"{k} {v:.3e}" for k, v in errors.items()))
    assert errors["null-text"] < errors["plain"]
    assert errors["negative-prompt"] == pytest.approx(errors["cfg 1"], rel=1e-3, abs=1e-5)


# -- Attention Capture + Attention Map Viewer ----------------------------------------------------------------------
def test_capture_changes_nothing_joint_probabilities_sum_to_1_and_the_viewer_renders_or_refusal(f):
    if f["family"] not in CAPTURE_FAMILIES:
        with pytest.raises(InversionChainError, match=rf"^Attention Capture: the model family {family_pattern(f)} "
                                                      r"is not supported yet by this node \(SD3\.5's prompt is "
                                                      r"CLIP-L/G and T5 tokens side by side"):
            with torch.inference_mode():
                ICAttentionCapture().capture(f["model"], "cross + self", "all", "per layer", 2, clip=f["clip"],
                                             prompt=SOURCE)
        return
    import nodes
    cfg = 2.0 if f["family"] in TRUE_CFG else 1.0

    def generate(model):
        with torch.inference_mode():
            return nodes.common_ksampler(model, 3, 2, cfg, "euler", "simple", f["positive"], f["negative"],
                                         f["latent"])[0]["samples"]
    with torch.inference_mode():
        patched, maps = ICAttentionCapture().capture(f["model"], "cross + self", "all", "per layer", 2,
                                                     clip=f["clip"], prompt=SOURCE, negative_prompt=NEGATIVE)
    plain = generate(f["model"])
    out = generate(patched)
    assert torch.equal(out, plain)        # capturing never changes the result
    maps.flush()
    # joint attention: a query's text share (cross, every text token) plus its image share (self, every image
    # token) is its whole softmax; checked at the self maps' query points (float16 storage: 2^-11 relative each)
    worst, text_shares = 0.0, []
    for (kind, unit, branch), cross in maps.steps[0].maps.items():
        if kind != "cross":
            continue
        own = maps.steps[0].maps[("self", unit, branch)].float()
        h, w = cross.shape[-2:]
        for p, flat in enumerate(query_points((h, w), 2).tolist()):
            y, x = divmod(flat, w)
            text = cross[:, :, y, x].float().sum(1)
            text_shares.append(text)
            worst = max(worst, float((text + own[:, p].sum((-2, -1)) - 1).abs().max()))
    shares = torch.cat(text_shares)
    measured(f"{f['family']}: captured joint attention, |text share + image share - 1| at most {worst:.1e}; text "
             f"share {float(shares.min()):.3f}..{float(shares.max()):.3f}")
    assert worst < 2e-3
    # the control: neither part alone is the whole softmax (a capture that dropped one would fail above)
    assert float(shares.min()) > 2e-3 and float(shares.max()) < 1 - 2e-3
    with torch.inference_mode():
        grid, masks = ICAttentionMapViewer().view(maps, {"samples": out}, "cross", "astronaut", 0.0, 1.0, "all",
                                                  "all captured", "cond", 0, "per tile", 0)
    assert grid.ndim == 4 and bool(torch.isfinite(grid).all()) and bool(torch.isfinite(masks).all())


# -- StyleDiffusion ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd_style(small_model, encode, astronaut_latent):
    """A real STYLE (StyleDiffusion Mapper's training on the SD1.5 test model, 2 steps x 1 iteration) and the CLIP
    vision model: what a user would wire into the StyleDiffusion nodes next to a flow MODEL."""
    from inversion_chain.optimize import style_diffusion
    model, clip, _ = small_model
    vision = models.load_clip_vision()
    with torch.inference_mode():
        src, empty = encode(clip, SOURCE), encode(clip, "")
        _, _, inv = ICDDIMInvert().invert(model, astronaut_latent, src, 2, 1.0, 1)
        style = style_diffusion.train(model, vision, photos.photo("astronaut", 128), inv, src, empty, 7.5, 1, 0.01,
                                      1.0, use_cache=False)
    return style, vision


WHY_NO_STYLE = (r"is a rectified-flow DiT with joint attention: its text tokens are a stream that every block "
                r"updates and projects to queries, keys and values from one hidden state, so there is no "
                r"cross-attention value input that is the prompt embedding\..* keys included\. StyleDiffusion runs on "
                r"the UNet families with cross-attention \(SD1\.x, SD2\.x, SDXL\); on this model use DDIM Invert "
                r"with KV Inject, RIVAL or P2Plus")


def test_stylediffusion_nodes_refuse_dit_families_saying_why(f, sd_style):
    """Joint attention has no value input that is the prompt embedding (text tokens are a stream each block updates
    and projects to q, k and v alike): every StyleDiffusion node refuses every flow family, naming the node, the
    family, why and what runs. P2Plus's `style` input is refused too."""
    style, vision = sd_style
    with torch.inference_mode():
        image = photos.photo("astronaut", PX)
        for node, call in (
                ("StyleDiffusion Mapper", lambda: ICStyleDiffusionMapper().train(
                    f["model"], vision, image, f["inv"], f["positive"], f["empty"], 4.0, 1)),
                ("StyleDiffusion Apply", lambda: ICStyleDiffusionApply().apply(f["model"], style)),
                ("StyleDiffusion Style Transfer", lambda: ICStyleDiffusionStyleTransfer().build(
                    f["model"], style, f["inv"]))):
            with pytest.raises(InversionChainError, match=rf"^{node}: the model family {family_pattern(f)} "
                                                          + WHY_NO_STYLE):
                call()
    if f["family"] in P2PLUS_FAMILIES:
        with pytest.raises(InversionChainError, match=rf"^P2Plus Controller: `style`: the model family "
                                                      rf"{family_pattern(f)} " + WHY_NO_STYLE):
            p2plus(f, latent={"samples": torch.zeros_like(f["latent"]["samples"])}, style=style)
