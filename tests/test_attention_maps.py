"""Attention Capture and Attention Map Viewer on the small model (SD1.5 block layout, 16 attention layers,
16x16 latents), in-process; plus the shipped workflow through a headless server."""

import pytest
import torch


from inversion_chain import compat
from inversion_chain.artifacts import InversionChainError
from inversion_chain.attention.viewer import map_view
from inversion_chain.attention.core import patching
from inversion_chain.attention.viewer.capture import (AttentionCaptureEditor, AttentionMaps, capture_layers,
                                                     storage_bytes)
from inversion_chain.attention.viewer.map_query import select
from inversion_chain.attention.core.controller import CONTROLLER_KEY, Controller, Editor, apply_probs, attention_probs
from inversion_chain.attention.core.layers import enumerate_layers
from inversion_chain.nodes.attention_maps import ICAttentionCapture, ICAttentionMapViewer
from inversion_chain.nodes.invert import ICDDIMInvert
from inversion_chain.nodes.kv_inject import ICKVInject
from tests.harness.sampling import noised_sampler
from tests.harness.measure import measured

STEPS = 4
PROMPT = "a photo of an astronaut"
WORDS = ["a", "photo", "of", "an", "astronaut"]
LEVEL0 = "0,1,13-15"            # the small model's 16x16 layers (latent/1)


sample = noised_sampler(cfg=3.0)


@pytest.fixture(scope="module", autouse=True)
def _pinned_free_memory():
    """ComfyUI batches cond and uncond rows into one UNet call only while free RAM exceeds its estimate, and the
    batch layout changes the last bits of the result. Pin the free-memory reading so that compared runs batch alike
    whatever else runs on the machine (measured: a 1.2 GB reading splits the batch, max diff 1.3e-5)."""
    import comfy.model_management as mm
    big = 64 * 2 ** 30
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: (big, big) if torch_free_too else big)
        yield


@pytest.fixture(scope="module")
def s(small_model, encode, astronaut_latent):
    model, clip, vae = small_model
    return dict(model=model, clip=clip, vae=vae, pos=encode(clip, PROMPT), neg=encode(clip, ""),
                noise=torch.randn(astronaut_latent["samples"].shape, generator=torch.Generator().manual_seed(7)),
                sigmas=compat.calculate_sigmas(model, "ddim_uniform", STEPS), latent=astronaut_latent)


def capture(s, model=None, kinds="cross + self", resolution="latent/1", detail="per layer", query_grid=4, **kw):
    kw.setdefault("clip", s["clip"])
    kw.setdefault("prompt", PROMPT)
    return ICAttentionCapture().capture(model or s["model"], kinds, resolution, detail, query_grid, **kw)


def view(s, maps, kind="cross", tokens="", start_percent=0.0, end_percent=1.0, layers="all", resolution="all captured",
         branch="cond", row=0, normalize="per tile", columns=0, image=None):
    return ICAttentionMapViewer().view(maps, s["latent"], kind, tokens, start_percent, end_percent, layers, resolution,
                                       branch,                                        row, normalize, columns, image)


@pytest.fixture(scope="module")
def captured(s):
    """One captured run at cfg 3, every layer, cross + self."""
    with torch.inference_mode():
        m, maps = capture(s, resolution="all")
        out = sample(m, s["pos"], s["neg"], s["noise"], s["sigmas"])
    return maps, out


@pytest.mark.fast
def test_cross_attention_over_all_77_tokens_sums_to_one_per_query_position(s, captured):
    maps, _ = captured
    maps.flush()
    assert len(maps.steps) == STEPS and maps.fractions() == [i / STEPS for i in range(STEPS)]
    assert len(maps.units) == 16 and maps.branches("cross") == [0, 1] and maps.branches("self") == [0, 1]
    layers = patching.layers_of(s["model"])
    for step in maps.steps:
        assert len(step.maps) == 16 * 2 * 2
        for (kind, unit, branch), t in step.maps.items():
            layer = layers[int(unit[1:])]
            h, w = layer.grid(16, 16)
            if kind == "cross":
                assert t.shape == (1, 77, h, w) and t.dtype == torch.float16
                sums = t.float().sum(1)
            else:
                assert t.shape == (1, 16, h, w)   # 4x4 query points, each a map over the grid
                sums = t.float().sum((2, 3))
            assert torch.allclose(sums, torch.ones_like(sums), atol=2e-3), (kind, unit, branch, sums)


@pytest.mark.fast
def test_capture_does_not_change_the_sampler_output(s, captured):
    _, out = captured
    stock = sample(s["model"], s["pos"], s["neg"], s["noise"], s["sigmas"])
    assert torch.equal(out, stock)
    m, _ = capture(s, kinds="cross", resolution="latent/4", detail="per resolution")
    assert torch.equal(sample(m, s["pos"], s["neg"], s["noise"], s["sigmas"]), stock)


class Probe(Editor):
    """Observer before the capture: keeps the q/k/branch layout of every call at one layer."""
    order = 20

    def __init__(self, index, kind):
        self.index, self.kinds, self.calls = index, (kind,), []

    def layers(self, all_layers):
        return [l for l in all_layers if l.index == self.index]

    def active(self, ctx):
        return ctx.layer.index == self.index

    def edit_qkv(self, q, k, v, ctx):
        self.calls.append((ctx.step.sigma, q.clone(), k.clone(), list(ctx.cond_or_uncond), ctx.heads))
        return q, k, v


@pytest.mark.fast
@pytest.mark.parametrize("kind,index", [("cross", 14), ("self", 2)])
def test_captured_maps_equal_softmax_attention_computed_by_hand(s, kind, index):
    maps_equal_softmax_by_hand(s, kind, index)


@pytest.fixture(scope="module")
def fs(family, family_model, family_encode, family_latent):
    """``s`` for another family (stock loader, stock text-encode node: SDXL's carries its size entries)."""
    model, clip, vae = family_model
    return dict(model=model, clip=clip, vae=vae, pos=family_encode(clip, PROMPT), neg=family_encode(clip, ""),
                noise=torch.randn(family_latent["samples"].shape, generator=torch.Generator().manual_seed(7)),
                sigmas=compat.calculate_sigmas(model, "ddim_uniform", STEPS), latent=family_latent)


@pytest.mark.fast
@pytest.mark.parametrize("family", ["sd2v", "sdxl"], indirect=True)
@pytest.mark.parametrize("kind,where", [("cross", "last"), ("self", "first")])
def test_other_families_captured_maps_equal_softmax_attention_computed_by_hand(fs, kind, where):
    """SD2-v (linear proj_in, 16 layers) and SDXL (17 layers at two levels, two text encoders' 77 tokens): the
    decoder's last layer (finest grid) and the encoder's first."""
    layers = patching.layers_of(fs["model"])
    maps_equal_softmax_by_hand(fs, kind, layers[-1 if where == "last" else 0].index)


def maps_equal_softmax_by_hand(s, kind, index):
    probe = Probe(index, kind)
    m, maps = capture(s, kinds=kind, resolution="all", query_grid=3)
    m = patching.install(m, probe)
    sample(m, s["pos"], s["neg"], s["noise"], s["sigmas"])
    maps.flush()
    layer = patching.layers_of(s["model"])[index]
    h, w = layer.grid(*s["latent"]["samples"].shape[-2:])
    assert len(probe.calls) == STEPS == len(maps.steps)
    for step, (sigma, q, k, order, heads) in zip(maps.steps, probe.calls):
        assert step.sigma == sigma
        probs = attention_probs(q, k, heads).mean(1)                   # (B, Nq, Nk)
        for branch in (0, 1):
            row = order.index(branch)
            if kind == "cross":
                expected = probs[row].T.reshape(77, h, w)
            else:
                ys = [int((i + 0.5) * h / 3) for i in range(3)]
                xs = [int((j + 0.5) * w / 3) for j in range(3)]
                pts = [y * w + x for y in ys for x in xs]
                expected = probs[row, pts].reshape(9, h, w)
            got = step.maps[(kind, f"L{index}", branch)][0].float()
            assert torch.allclose(got, expected, atol=1e-3), float((got - expected).abs().max())


class RegionBias(Editor):
    """Makes the queries of the top-left quadrant attend to one token: by editing probabilities ('probs') or by
    computing attention itself with an additive bias it publishes for observers ('bias')."""
    order = 50
    kinds = ("cross",)

    def __init__(self, token, mode):
        self.token, self.mode = token, mode

    def active(self, ctx):
        return ctx.kind == "cross" and ctx.layer.level == 0

    def region(self, ctx):
        h, w = ctx.grid
        mask = torch.zeros(h, w, dtype=torch.bool)
        mask[: h // 2, : w // 2] = True
        return mask.flatten()

    def needs_probs(self, ctx):
        return self.mode == "probs"

    def edit_probs(self, probs, ctx):
        r = self.region(ctx)
        probs = probs.clone()
        probs[:, :, r] *= 0.1
        probs[:, :, r, self.token] += 0.9
        return probs

    def attend(self, q, k, v, ctx):
        if self.mode != "bias":
            return None
        bias = torch.zeros(q.shape[1], k.shape[1])
        bias[self.region(ctx), self.token] = 12.0
        ctx.scratch["attention_bias"] = bias
        return apply_probs(attention_probs(q, k, ctx.heads, bias), v, ctx.heads)


@pytest.mark.fast
@pytest.mark.parametrize("mode", ["probs", "bias"])
def test_map_lights_up_where_an_editor_makes_the_token_dominate(s, mode):
    m, maps = capture(s, kinds="cross", resolution="latent/1")
    m = patching.install(m, RegionBias(WORDS.index("astronaut") + 1, mode))
    sample(m, s["pos"], s["neg"], s["noise"], s["sigmas"])
    _, masks = view(s, maps, tokens="astronaut, photo", layers=LEVEL0)
    inside, outside = masks[0, 8:56, 8:56].mean(), masks[0, 72:, 72:].mean()
    measured(f"{mode}: 'astronaut' attention inside the region {inside:.3f}, outside {outside:.3f}")
    assert inside > 0.85 and outside < 0.3
    assert masks[1, 8:56, 8:56].mean() < 0.1          # 'photo' lost the region


@pytest.mark.fast
def test_viewer_tiles_follow_the_inputs(s, captured):
    maps, _ = captured
    grid, masks = view(s, maps)
    assert masks.shape == (5, 128, 128)                 # every token of the prompt, tiles at latent x 8
    lay = map_view.layout(5, (128, 128))
    assert (lay.columns, lay.rows) == (3, 2)
    assert grid.shape == (1, lay.height, lay.width, 3) and lay.width == 4 + 3 * (128 + 4)
    assert lay.height == 4 + 2 * (lay.label_h + 128 + 4) + map_view.scale_height()

    image = torch.rand(1, 96, 160, 3)
    grid, masks = view(s, maps, tokens="astronaut, photo", columns=1, image=image)
    assert masks.shape == (2, 96, 160)
    assert grid.shape[2] == 4 + 160 + 4 and grid.shape[1] == 4 + 2 * (map_view.layout(2, (96, 160)).label_h
                                                                         + 96 + 4) + map_view.scale_height()
    assert view(s, maps, kind="self")[1].shape[0] == 16
    assert view(s, maps, kind="self", tokens="#0, #15")[1].shape[0] == 2
    assert view(s, maps, tokens="#5, #6")[1].shape[0] == 2

    sel = select(maps, "cross", "", 0.0, 0.5, LEVEL0, "all captured", "cond", 0)
    assert [t.label for t in sel.tiles] == [f"{w} (#{i + 1})" for i, w in enumerate(WORDS)]
    assert sel.steps == [0, 1] and sel.step_label == "steps 0.00-0.50 (0-1 of 4)"
    assert sel.layer_label == "L0,1,13-15 @16x16" and sel.grid == (16, 16)
    # averaging over steps and layers of raw maps, with the start token dropped and the rest renormalised
    t = torch.stack([maps.steps[i].maps[("cross", f"L{l}", 0)][0, 1:].float() for i in (0, 1)
                     for l in (0, 1, 13, 14, 15)])
    expected = (t / t.sum(1, keepdim=True)).mean(0)
    assert torch.allclose(sel.tiles[4].map, expected[4], atol=1e-5)
    assert torch.allclose(torch.stack([x.map for x in sel.tiles]).sum(0) + 0, expected[:5].sum(0), atol=1e-5)
    # mixed resolutions: coarser maps are upsampled to the finest grid
    sel = select(maps, "cross", "#5", 0.0, 1.0, "all", "all captured", "uncond", 0)
    assert sel.grid == (16, 16) and sel.layer_label == "L0-15 @16x16" and sel.step_label == "steps 0.00-1.00 (0-3 of 4)"


@pytest.mark.fast
def test_bad_input_gets_clear_errors(s, captured):
    maps, _ = captured
    with pytest.raises(InversionChainError, match="is not in the prompt.*Its tokens are: a, photo, of, an, astronaut"):
        view(s, maps, tokens="dog")
    with pytest.raises(InversionChainError, match=r"row 1 is outside the run's batch of 1 row\(s\) \(valid: 0..0\)"):
        view(s, maps, row=1)
    with pytest.raises(InversionChainError, match=r"selects none of the run's 4 steps \(they start at fractions "
                                                  r"0, 0.25, 0.5, 0.75\)"):
        view(s, maps, start_percent=0.8, end_percent=0.9)
    with pytest.raises(InversionChainError, match="must satisfy 0 <= start_percent < end_percent <= 1"):
        view(s, maps, start_percent=0.6, end_percent=0.4)
    with pytest.raises(InversionChainError, match="query points as #0..#15"):
        view(s, maps, kind="self", tokens="#16")
    with pytest.raises(InversionChainError, match=r"token position #77 is outside 1..#76"):
        view(s, maps, tokens="#77")
    with pytest.raises(InversionChainError, match="uncond branch has no tokens|has no tokens"):
        view(s, maps, branch="uncond")  # empty negative prompt: name tokens by position instead

    m, cond_only = capture(s, kinds="cross", resolution="latent/2")
    with pytest.raises(InversionChainError, match="no attention was captured"):
        view(s, cond_only)
    sample(m, s["pos"], s["neg"], s["noise"], s["sigmas"], cfg=1.0)
    with pytest.raises(InversionChainError, match="the uncond branch was not captured.*only when cfg > 1"):
        view(s, cond_only, branch="uncond")
    with pytest.raises(InversionChainError, match="self-attention was not captured"):
        view(s, cond_only, kind="self")
    with pytest.raises(InversionChainError, match="no captured unit lies within layers '0,1'.*L2: layers 2"):
        view(s, cond_only, layers="0,1")
    with pytest.raises(InversionChainError, match="latent/1 was not captured; captured: latent/2"):
        view(s, cond_only, resolution="latent/1")
    with pytest.raises(InversionChainError, match="`layers` must be 'all' or layer numbers"):
        view(s, cond_only, layers="down")

    with pytest.raises(InversionChainError, match="connect `clip`"):
        capture(s, clip=None)
    no_level = [l for l in patching.layers_of(s["model"]) if l.level != 3]
    with pytest.raises(InversionChainError, match=r"no attention layers at latent/8. Its resolutions: latent/1 "
                                                  r"\(layers 0,1,13-15\), latent/2 \(layers 2,3,10-12\)"):
        capture_layers(no_level, "latent/8")
    m, no_prompt = capture(s, kinds="cross", resolution="latent/2", clip=None, prompt="")
    sample(m, s["pos"], s["neg"], s["noise"], s["sigmas"])
    with pytest.raises(InversionChainError,
                       match="give Attention Capture `clip` and `prompt`; or list token positions"):
        view(s, no_prompt)
    assert view(s, no_prompt, tokens="#1")[1].shape[0] == 1


@pytest.mark.fast
def test_a_new_run_replaces_the_previous_one(s):
    m, maps = capture(s, kinds="cross", resolution="latent/4")
    sample(m, s["pos"], s["neg"], s["noise"], s["sigmas"])
    maps.flush()
    first = maps.steps[0].maps[("cross", "L4", 0)].clone()
    sample(m, s["pos"], s["neg"], s["noise"] * 0.5, compat.calculate_sigmas(s["model"], "ddim_uniform", 3))
    maps.flush()
    assert len(maps.steps) == 3 and not torch.equal(maps.steps[0].maps[("cross", "L4", 0)], first)


@pytest.fixture(scope="module")
def inversion(s):
    with torch.inference_mode():
        return ICDDIMInvert().invert(s["model"], s["latent"], s["pos"], STEPS, 1.0, 1)


def test_capture_and_kv_inject_in_one_run_both_take_effect(s, encode, inversion):
    noise, sigmas, inv = inversion
    tgt = encode(s["clip"], "a watercolor painting of a cat")
    run = lambda m: sample(m, tgt, s["neg"], torch.zeros_like(noise["samples"]), sigmas,
                           latent=noise["samples"])
    kv = lambda m, **kw: ICKVInject().patch(m, inv, 0.0, 10, "mutual", negative=s["neg"], **kw)[0]
    stock = run(s["model"])
    kv_only = run(kv(s["model"]))
    kv_recompute_only = run(kv(s["model"], cache="recompute"))
    assert not torch.equal(kv_only, stock)

    results = {}
    for name, build in {"alone": lambda: capture(s, kinds="self", resolution="all"),
                        "kv after capture": lambda: (lambda m, maps: (kv(m), maps))(*capture(s, kinds="self",
                                                                                              resolution="all")),
                        "capture after kv": lambda: capture(s, model=kv(s["model"]), kinds="self", resolution="all"),
                        "kv recompute after capture": lambda: (lambda m, maps: (kv(m, cache="recompute"), maps))(
                            *capture(s, kinds="self", resolution="all"))}.items():
        m, maps = build()
        out = run(m)
        maps.flush()
        assert len(maps.steps) == STEPS, name
        results[name] = maps
        alone_out = {"alone": stock, "kv recompute after capture": kv_recompute_only}.get(name, kv_only)
        assert torch.equal(out, alone_out), name  # capture leaves every output alone
    alone = results["alone"].steps[0].maps
    for name in ("kv after capture", "capture after kv", "kv recompute after capture"):
        step0 = results[name].steps[0].maps
        for layer in range(16):
            key = ("self", f"L{layer}", 0)
            if layer < 10:   # before the first injected layer, step 0 computes exactly what the plain run does
                assert torch.equal(step0[key], alone[key]), (name, layer)
            else:            # injected layers attend to the source image's keys
                assert float((step0[key].float() - alone[key].float()).abs().max()) > 1e-2, (name, layer)
    for step_a, step_b in zip(results["kv after capture"].steps, results["kv recompute after capture"].steps):
        for key, t in step_a.maps.items():
            assert float((t.float() - step_b.maps[key].float()).abs().max()) < 2e-3, key


def _tensors_reachable(obj, seen=None, depth=0):
    """Every tensor reachable from ``obj`` through attributes, dicts, lists and tuples (by storage)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 12:
        return {}
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return {obj.untyped_storage().data_ptr(): obj.untyped_storage().nbytes()}
    found = {}
    if isinstance(obj, dict):
        items = list(obj.keys()) + list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        items = list(obj)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("inversion_chain"):
        items = list(vars(obj).values())
    else:
        return {}
    for item in items:
        found.update(_tensors_reachable(item, seen, depth + 1))
    return found


def test_capture_memory_for_sd15_at_512px_and_50_steps_stays_within_the_layout_bound(s):
    """The real SD1.5 layer list (a full-size UNet built on the meta device), fed calls of SD1.5's shapes at
    512 px (64x64 latent) with cfg (uncond + cond rows), 50 steps, default capture settings."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from tests.harness.models import SD15_UNET
    unet = UNetModel(**SD15_UNET, dtype=torch.float16, device="meta", operations=comfy.ops.disable_weight_init)
    layers = enumerate_layers(unet)
    assert len(layers) == 16
    chosen = capture_layers(layers, "latent/4")
    assert [l.key for l in chosen] == [("input", 7, 0), ("input", 8, 0), ("output", 3, 0), ("output", 4, 0),
                                       ("output", 5, 0)]
    assert all(l.grid(64, 64) == (16, 16) and l.channels == 1280 and l.heads == 8 for l in chosen)

    # the bound, from the data layout: 50 steps x 5 layers x 2 branches x 1 row x (77 tokens + 4x4 query points)
    # maps of 16x16, float16 on the CPU; plus one step's running sums in float32
    stored = 50 * 5 * 2 * 1 * (77 + 16) * 16 * 16 * 2
    pending = 5 * 2 * 1 * (77 + 16) * 16 * 16 * 4
    assert storage_bytes(chosen, (64, 64), 50, 2, 1, ("cross", "self")) == \
        {"stored": stored, "pending": pending, "total": stored + pending}
    assert stored + pending < 25 * 2 ** 20
    per_res = storage_bytes(layers, (64, 64), 50, 2, 1, ('cross', 'self'), detail='per resolution')['total']
    measured(f"SD1.5 512px 50 steps, latent/4 cross+self per layer: {(stored + pending) / 2 ** 20:.1f} MB; "
             f"all layers per layer: "
             f"{storage_bytes(layers, (64, 64), 50, 2, 1, ('cross', 'self'))['total'] / 2**20:.0f} MB, "
             f"per resolution: {per_res / 2**20:.0f} MB")

    maps = AttentionMaps(("cross", "self"), (2,), "per layer", 4)
    editor = AttentionCaptureEditor(maps, chosen)
    controller = Controller(layers, compat.model_sampling(s["model"]), [editor])
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 256, 1280, generator=gen)
    k_cross = torch.randn(2, 77, 1280, generator=gen)
    sigmas = torch.linspace(14.6, 0.03, 50)
    peak = 0
    for i in range(50):
        sig = sigmas[i].repeat(2)
        for layer in chosen:
            for kind, k in (("self", q), ("cross", k_cross)):
                extra = {"block": layer.key[:2], "block_index": layer.key[2], "sigmas": sig, "n_heads": 8,
                         "original_shape": [2, 4, 64, 64], "cond_or_uncond": [1, 0], CONTROLLER_KEY: controller}
                out = controller(kind, q, k, k, extra, lambda q_, k_, v_: q_)
                assert out is q
        reachable = sum(_tensors_reachable(editor, seen={id(controller)}).values())  # not the controller's
        assert reachable == maps.nbytes()
        peak = max(peak, maps.nbytes())
    maps.flush()
    assert len(maps.steps) == 50
    assert maps.nbytes() == maps.stored_bytes() == stored
    assert peak <= stored + pending


@pytest.mark.server
def test_attention_maps_workflow_runs_headless_and_saves_the_grid(comfy_server):
    from PIL import Image
    from tests.harness.server import for_test_model, load_api_workflow, nodes_of
    graph = for_test_model(load_api_workflow("attention_maps"), "small")
    entry = comfy_server.run_once(graph)
    assert entry["status"]["status_str"] == "success"
    viewers = nodes_of(graph, "ICAttentionMapViewer")
    assert len(viewers) == 2
    for nid in nodes_of(graph, "SaveImage"):
        if graph[nid]["inputs"]["images"][0] in viewers:
            viewer = graph[graph[nid]["inputs"]["images"][0]]["inputs"]
            n = 5 if viewer["kind"] == "cross" else 16
            paths = comfy_server.output_images(entry, nid)
            assert len(paths) == 1
            lay = map_view.layout(n, (128, 128))
            assert Image.open(paths[0]).size == (lay.width, lay.height)
