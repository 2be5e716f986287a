"""P2Plus Controller on the small model (SD1.5 block layout, 16 attention layers, 16x16 latent), in-process,
sampled through ComfyUI's stock path (SamplerCustom semantics: add_noise off, sampler ddim)."""
import pytest
import torch


from inversion_chain.artifacts import InversionChainError
from inversion_chain.attention.core import patching
from inversion_chain.attention.core.controller import CONTROLLER_KEY, Editor
from inversion_chain.attention.core.layers import MAP_SIZE_LEVELS
from inversion_chain.attention.editors.edit_plan import build_plan
from inversion_chain.attention.editors.p2p import P2PlusEditor
from inversion_chain.attention.core.tokens import prompt_tokens
from inversion_chain.attention.core.tokens import END, START
from inversion_chain.nodes.invert import ICDDIMInvert
from inversion_chain.nodes.p2plus import ICNullTextInversion, ICP2PlusController
from tests.harness.sampling import sampler
from tests.harness.measure import measured

STEPS = 5
SOURCE = "a photo of an astronaut"
TARGET = "a photo of a robot"         # same token count (5): a word swap


sample = sampler(cfg=3.0)


@pytest.fixture(scope="module")
def setup(small_model, encode, astronaut_latent):
    model, clip, _ = small_model
    with torch.inference_mode():
        noise, sigmas, inv = ICDDIMInvert().invert(model, astronaut_latent, encode(clip, SOURCE), STEPS, 1.0, 3)
    return dict(model=model, clip=clip, inv=inv, sigmas=sigmas, noise=noise["samples"],
                source=astronaut_latent["samples"])


def edit(s, target=TARGET, mode="replace", tau_c=0.6, tau_s=0.6, tau_u=0.0, **kw):
    kw.setdefault("inversion", s["inv"])
    return ICP2PlusController().build(s["model"], s["clip"], SOURCE, target, mode, tau_c, tau_s, tau_u, **kw)


def run(s, cfg=3.0, callback=None, **kw):
    m, pos, neg, latent, sigmas = edit(s, **kw)
    return sample(m, pos, neg, latent["samples"], sigmas, cfg, callback), m


@pytest.mark.fast
def test_outputs_are_two_rows_of_the_inversions_noise(setup):
    m, pos, neg, latent, sigmas = edit(setup)
    assert latent["samples"].shape[0] == 2 and torch.equal(latent["samples"][0], latent["samples"][1])
    assert torch.allclose(latent["samples"][:1], setup["noise"], atol=1e-5)
    assert pos[0][0].shape[0] == 2 and neg[0][0].shape[0] == 2 and not torch.equal(pos[0][0][0], pos[0][0][1])
    assert torch.equal(sigmas, setup["sigmas"])


@pytest.mark.fast
def test_same_prompt_makes_row_1_equal_row_0_exactly(setup):
    out, _ = run(setup, target=SOURCE, tau_c=0.6, tau_s=0.6, tau_u=0.5, blend_words="astronaut")
    assert torch.equal(out[0], out[1])


@pytest.mark.fast
def test_row_0_is_the_plain_reconstruction(setup, encode):
    """P2P never touches the source row: it samples as if unedited (up to attention-kernel rounding)."""
    out, _ = run(setup, cfg=1.0, tau_u=0.5)
    plain = sample(setup["model"], encode(setup["clip"], SOURCE), encode(setup["clip"], ""), setup["noise"],
                   setup["sigmas"], 1.0)
    assert float((out[:1] - plain).abs().max()) < 1e-4
    assert float((out[:1] - setup["source"]).abs().max()) < 1e-3      # cfg 1: the inversion round trip
    assert float((out[1] - out[0]).abs().max()) > 1e-2                # the edit changes row 1


class ReferenceP2P(Editor):
    """An independent, literal Prompt-to-Prompt word-swap editor for the test: explicit probabilities in the cond
    branch only; the target's cross maps are the source's while step/N < tau_c, its self maps while < tau_s."""

    order = 50

    def __init__(self, sigmas, tau_c, tau_s):
        self.sigmas, self.tau_c, self.tau_s = sigmas, tau_c, tau_s

    def schedule(self):
        return self.sigmas

    def active(self, ctx):
        return bool(ctx.chunk_rows(0))

    def needs_probs(self, ctx):
        return True

    def edit_probs(self, probs, ctx):
        s, t = ctx.chunk_rows(0)
        f = ctx.step.index / ctx.step.total
        if f < (self.tau_c if ctx.kind == "cross" else self.tau_s):
            probs = probs.clone()
            probs[t] = probs[s]
        return probs


def test_tau_u_zero_is_exactly_prompt_to_prompt(setup, encode):
    s = setup
    ours, _ = run(s, cfg=5.0, tau_c=0.5, tau_s=0.5, tau_u=0.0)
    reference_model = patching.install(s["model"], ReferenceP2P(s["sigmas"], 0.5, 0.5))
    pos = [[torch.cat([encode(s["clip"], SOURCE)[0][0], encode(s["clip"], TARGET)[0][0]]), {}]]
    neg = [[encode(s["clip"], "")[0][0].repeat(2, 1, 1), {}]]
    reference = sample(reference_model, pos, neg, s["noise"].repeat(2, 1, 1, 1), s["sigmas"], 5.0)
    p2plus, _ = run(s, cfg=5.0, tau_c=0.5, tau_s=0.5, tau_u=0.5)
    diff_ref = float((ours - reference).abs().max())
    diff_p2plus = float((p2plus - reference).abs().max())
    measured(f"tau_u=0 vs reference P2P: {diff_ref:.2e}; tau_u=0.5 vs reference: {diff_p2plus:.2e}")
    assert diff_ref < 1e-4 and diff_p2plus > 100 * max(diff_ref, 1e-6)


@pytest.fixture(scope="module")
def fsetup(family, family_model, family_encode, family_latent):
    """``setup`` on another family (stock loader, stock text-encode node)."""
    model, clip, _ = family_model
    with torch.inference_mode():
        noise, sigmas, inv = ICDDIMInvert().invert(model, family_latent, family_encode(clip, SOURCE), STEPS, 1.0, 3)
    return dict(model=model, clip=clip, inv=inv, sigmas=sigmas, noise=noise["samples"], encode=family_encode,
                source=family_latent["samples"])


@pytest.mark.parametrize("family", ["sd2v", "sdxl"], indirect=True)
def test_other_families_tau_u_zero_is_exactly_prompt_to_prompt(fsetup):
    """The independent editor above on SD2-v and SDXL: its rows carry each prompt's own conditioning as the stock
    text-encode node makes it (SDXL: pooled output per row and the size entries)."""
    s = fsetup
    ours, _ = run(s, cfg=5.0, tau_c=0.5, tau_s=0.5, tau_u=0.0)
    src, tgt, empty = (s["encode"](s["clip"], text) for text in (SOURCE, TARGET, ""))
    options = dict(src[0][1])
    if options.get("pooled_output") is not None:
        options["pooled_output"] = torch.cat([src[0][1]["pooled_output"], tgt[0][1]["pooled_output"]])
    pos = [[torch.cat([src[0][0], tgt[0][0]]), options]]
    neg = [[empty[0][0].repeat(2, 1, 1), dict(empty[0][1])]]
    reference_model = patching.install(s["model"], ReferenceP2P(s["sigmas"], 0.5, 0.5))
    reference = sample(reference_model, pos, neg, s["noise"].repeat(2, 1, 1, 1), s["sigmas"], 5.0)
    diff = float((ours - reference).abs().max())
    moved = float((ours[1] - ours[0]).abs().max())
    measured(f"tau_u=0 vs reference P2P: {diff:.2e} (edit row moved {moved:.2e})")
    assert diff < 1e-4 and moved > 1e-2


# the cross-attention map sizes each layout has: SD1.x/SD2.x attention at latent/1, /2, /4 and the 8x8 middle block;
# SDXL none at full latent size and none in a latent/8 level (its UNet downsamples twice)
MAP_SIZES_OF = {"sd15": ("latent/1", "latent/2", "latent/4", "latent/8"),
                "sd2v": ("latent/1", "latent/2", "latent/4", "latent/8"), "sdxl": ("latent/2", "latent/4")}


def test_blend_map_size_reads_the_chosen_maps_and_names_the_sizes_a_model_has(fsetup, family):
    """The local blend records its words' maps on the grid of `blend_map_size` (auto: latent/4, the 4x4 grid of this
    16x16 latent); a size the model lacks is refused, naming the input, what arrived and the sizes it has."""
    s = fsetup
    latent_side = s["source"].shape[-1]
    have = MAP_SIZES_OF[family]
    for size in ("auto",) + tuple(MAP_SIZE_LEVELS):
        if size != "auto" and size not in have:
            with pytest.raises(InversionChainError, match=rf"`blend_map_size` is '{size}', but this model has no "
                                                          rf"cross-attention layers at that size\. It has maps at "
                                                          rf"{', '.join(have)} .*auto \(here latent/4\)"):
                edit(s, blend_words="astronaut, robot", blend_map_size=size)
            continue
        _, m = run(s, blend_words="astronaut, robot", blend_map_size=size)
        blend = next(e for e in patching.controller_of(m).editors if isinstance(e, P2PlusEditor)).blend
        side = latent_side // int((size if size != "auto" else "latent/4").split("/")[1])
        assert blend.maps and {tuple(v.shape[-2:]) for v in blend.maps.values()} == {(side, side)}, size


class CrossMapProbe(Editor):
    """Observer (order 90, after the edit): for every cross-attention call, are the target row's maps the
    source row's, bit for bit?"""

    order = 90
    kinds = ("cross",)

    def __init__(self):
        self.seen = {}

    def active(self, ctx):
        return ctx.kind == "cross" and bool(ctx.chunk_rows(0))

    def needs_probs(self, ctx):
        return True

    def edit_probs(self, probs, ctx):
        s, t = ctx.chunk_rows(0)
        self.seen.setdefault(ctx.step.index, []).append(bool(torch.equal(probs[s], probs[t])))
        return probs


@pytest.mark.fast
@pytest.mark.parametrize("tau_c", [1.0, 0.0])
def test_full_cross_replace_makes_target_maps_the_sources_at_every_step(setup, tau_c):
    s = setup
    m, pos, neg, latent, sigmas = edit(s, tau_c=tau_c, tau_s=1.0)
    probe = CrossMapProbe()
    m = patching.install(m, probe)
    out = sample(m, pos, neg, latent["samples"], sigmas, 3.0)
    assert sorted(probe.seen) == list(range(STEPS))
    assert all(len(v) == 16 for v in probe.seen.values()), {k: len(v) for k, v in probe.seen.items()}
    if tau_c == 1.0:
        assert all(all(v) for v in probe.seen.values())
        assert not torch.equal(out[0], out[1])                  # values stay the target's own
    else:
        assert not any(any(v) for v in probe.seen.values())


@pytest.mark.fast
def test_refine_alignment_on_real_clip_tokenization(setup):
    clip = setup["clip"]
    source, target = "a castle next to a river", "children drawing of a castle next to a river"
    plan = build_plan(clip, source, target, "refine")
    src, tgt = prompt_tokens(clip, source, "s"), prompt_tokens(clip, target, "t")
    added = len([t for t in prompt_tokens(clip, "children drawing of", "t") if t not in (START, END)])
    n_src = src.index(END) + 1
    new = [j for j in range(77) if plan.aligned[j] == 0]
    assert new == list(range(1, 1 + added))                          # exactly "children drawing of" are new
    for j in range(77):
        if plan.aligned[j]:
            assert src[int(plan.mapper[j])] == tgt[j]                # aligned columns carry the same token
    # every source word token (start .. end) is aligned, in order, shifted by the added tokens
    for i in range(n_src):
        assert int(plan.mapper[i + added if i else 0]) == i
    assert plan.equalizer is None and not plan.word_swap


def test_reweight_scales_the_target_words_maps(setup):
    s = setup
    plan = build_plan(s["clip"], SOURCE, TARGET, "reweight", "robot:2.0")
    robot = [j for j in range(77) if float(plan.equalizer[j]) == 2.0]
    assert robot == [5] and float(plan.equalizer.sum()) == 77 + 1
    neutral, _ = run(s, mode="reweight", reweight="robot:1.0")       # explicit maps path, scale 1
    swap, _ = run(s, mode="replace")                                  # q/k copy path
    strong, _ = run(s, mode="reweight", reweight="robot:2.0")
    assert float((neutral - swap).abs().max()) < 1e-4
    assert float((strong[1] - swap[1]).abs().max()) > 1e-3 and float((strong[0] - swap[0]).abs().max()) < 1e-4


@pytest.mark.fast
def test_refine_runs_with_different_token_counts(setup):
    out, _ = run(setup, target="a photo of an astronaut riding a horse", mode="refine")
    assert torch.isfinite(out).all() and not torch.equal(out[0], out[1])


def test_local_blend_keeps_the_target_equal_to_the_source_outside_the_mask(setup):
    s = setup
    # the random model's word maps are nearly flat (0.6-1.0 of their maximum at 4x4), so a high threshold
    out, m = run(s, blend_words="astronaut, robot", blend_threshold=0.98, blend_start_percent=0.2, tau_c=0.3, tau_s=0.3)
    editor = next(e for e in patching.controller_of(m).editors if isinstance(e, P2PlusEditor))
    mask = editor.blend.last_mask[0, 0]                               # the mask of the last step, latent size
    coverage = float(mask.float().mean())
    outside = float((out[1] - out[0]).abs()[:, ~mask].max())
    inside = float((out[1] - out[0]).abs()[:, mask].max())
    measured(f"local blend: mask covers {coverage:.0%}; |row1 - row0| outside {outside:.2e}, inside {inside:.2e}")
    assert 0 < coverage < 1
    assert outside < 1e-4 and inside > 1e-2
    unblended, _ = run(s, tau_c=0.3, tau_s=0.3)
    assert float((unblended[1] - unblended[0]).abs()[:, ~mask].max()) > 1e-2


@pytest.mark.fast
def test_generated_image_mode_uses_seeded_noise_and_the_given_schedule(setup):
    s = setup
    empty = {"samples": torch.zeros(1, 4, 16, 16)}
    m, pos, neg, latent, sigmas = edit(s, target=SOURCE, inversion=None, latent=empty, seed=7, steps=4,
                                       scheduler="ddim_uniform")
    again = edit(s, target=SOURCE, inversion=None, latent=empty, seed=7, steps=4)[3]
    assert torch.equal(latent["samples"], again["samples"]) and sigmas.numel() == 5
    out = sample(m, pos, neg, latent["samples"], sigmas, 5.0)
    assert torch.equal(out[0], out[1])
    with pytest.raises(InversionChainError, match="Sample with 4 steps and scheduler 'ddim_uniform'"):
        sample(m, pos, neg, latent["samples"], s["sigmas"], 5.0)


def test_no_leak_into_the_original_model(setup, encode):
    s = setup
    pos, neg = encode(s["clip"], TARGET), encode(s["clip"], "")
    before = sample(s["model"], pos, neg, s["noise"], s["sigmas"])
    run(s, tau_u=0.5, blend_words="robot")
    after = sample(s["model"], pos, neg, s["noise"], s["sigmas"])
    assert torch.equal(before, after)
    to = s["model"].model_options.get("transformer_options", {})
    assert CONTROLLER_KEY not in to and not to.get("patches", {}).get("attn2_patch")
    assert not s["model"].model_options.get("sampler_post_cfg_function")


@pytest.mark.fast
def test_bad_input_gets_clear_errors(setup, small_model, encode, astronaut_latent):
    s = setup
    long_prompt = "a photo of " + " ".join(["an astronaut"] * 40)
    with pytest.raises(InversionChainError, match=r"target prompt .* is \d+ tokens long; .* 77 tokens"):
        edit(s, target=long_prompt, mode="refine")
    with pytest.raises(InversionChainError, match="mode 'replace' swaps words token for token.*Use mode 'refine'"):
        edit(s, target="a photo of a small grey robot")
    with pytest.raises(InversionChainError, match="reweight word 'dog' is not in the target prompt.*Its tokens are: "
                                                  "a, photo, of, a, robot"):
        edit(s, mode="reweight", reweight="dog:2")
    with pytest.raises(InversionChainError, match=r"outside \[-2, 2\]"):
        edit(s, mode="reweight", reweight="robot:3")
    with pytest.raises(InversionChainError, match="mode 'reweight' needs `reweight`"):
        edit(s, mode="reweight")
    with pytest.raises(InversionChainError, match="blend word 'dog' is in neither"):
        edit(s, blend_words="dog")
    with pytest.raises(InversionChainError, match="connect `inversion`"):
        edit(s, inversion=None)
    other_inv = ICDDIMInvert().invert(s["model"], astronaut_latent, encode(s["clip"], SOURCE), STEPS + 1, 1.0, 0)[2]
    foreign = ICNullTextInversion().run(s["model"], other_inv, encode(s["clip"], SOURCE), encode(s["clip"], ""),
                                        7.5, 1, "negative-prompt")[0]
    with pytest.raises(InversionChainError, match="NULL_TEXT was made from another INVERSION"):
        edit(s, null_text=foreign)
    with pytest.raises(InversionChainError, match="NULL_TEXT needs the INVERSION"):
        edit(s, inversion=None, null_text=foreign, latent={"samples": torch.zeros(1, 4, 16, 16)})
    m, pos, neg, latent, _ = edit(s)
    other_sigmas = ICDDIMInvert().invert(s["model"], astronaut_latent, encode(s["clip"], SOURCE), STEPS + 2, 1.0,
                                         0)[1]
    with pytest.raises(InversionChainError, match=f"Sample with {STEPS} steps, scheduler 'ddim_uniform'"):
        sample(m, pos, neg, latent["samples"], other_sigmas)
    with pytest.raises(InversionChainError, match="expected a 2-row latent"):
        sample(m, [[pos[0][0][:1], {}]], [[neg[0][0][:1], {}]], latent["samples"][:1], s["sigmas"])


@pytest.mark.server
def test_nodes_are_registered_with_tooltips_on_every_input(comfy_server):
    info = comfy_server.object_info
    for name, display in (("ICP2PlusController", "P2Plus Controller"), ("ICNullTextInversion", "Null-Text Inversion")):
        assert info[name]["display_name"] == display
        for section in ("required", "optional"):
            for input_name, spec in (info[name]["input"].get(section) or {}).items():
                assert spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"


@pytest.mark.server
def test_p2plus_edit_real_workflow_runs_headless(comfy_server):
    """The shipped workflow (DDIM Invert -> Null-Text Inversion -> P2Plus Controller -> KSamplerAdvanced) runs on
    the small test checkpoint; its row 0 is closer to the source than the same graph without the NULL_TEXT."""
    import copy
    from tests.harness.server import for_test_model, load_api_workflow, nodes_of, ui_output
    graph = for_test_model(load_api_workflow("p2plus_edit_real"), "small")
    entry = comfy_server.run_once(graph)
    assert entry["status"]["status_str"] == "success"
    assert len(comfy_server.output_images(entry)) == 2                # row 0 reconstruction, row 1 edit
    with_null_text = ui_output(entry, "ICLatentDifference", graph)["max_abs"][0]
    plain_graph = copy.deepcopy(graph)
    for nid in nodes_of(plain_graph, "ICP2PlusController"):
        del plain_graph[nid]["inputs"]["null_text"]
    plain = ui_output(comfy_server.run_once(plain_graph), "ICLatentDifference", plain_graph)["max_abs"][0]
    measured(f"workflow row-0 max latent error: with NULL_TEXT {with_null_text:.4f}, without {plain:.4f}")
    assert with_null_text < plain
