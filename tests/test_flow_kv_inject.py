"""KV Inject on DiTs with joint attention (Flux dev-style, Chroma, Qwen-Image, SD3.5): the source's image-token K/V,
recorded along its inversion chain through ComfyUI's attn1_patch (on SD3.5's MMDiT through the pack's bridge,
attention/core/mmdit_bridge.py), replace the target's in the chosen blocks.

The models are tests/harness/flow_models.py's random-weight layouts (Flux/Chroma: one double and one single block;
Qwen-Image, from flow_models_more.py: two joint blocks, a real negative) loaded through the stock loaders; claims
here are about exactness and plumbing, not semantics. On trees without a family or without the DiT attention patch
every test skips and names the missing feature."""
import math

import pytest
import torch

from inversion_chain import compat
from inversion_chain.artifacts import InversionChainError
from inversion_chain.attention.core import dit_layers
from inversion_chain.nodes.invert import ICDDIMInvert
from inversion_chain.nodes.inverted_noise import ICInvertedNoise
from inversion_chain.nodes.kv_inject import ICKVInject
from inversion_chain.pipelines import kv_inject as pipeline
from tests.harness.measure import measured
from tests.harness import flow_models, flow_models_more, photos

SOURCE = "a photo of an astronaut"
TARGET = "a watercolor painting of a red fox in the snow"
GUIDANCE = 3.5
STEPS = 8
PX = 256
FAMILIES = ("flux", "chroma", "qwen_image", "sd3")
TRUE_CFG = ("chroma", "qwen_image", "sd3")     # a real unconditional half: cfg > 1 with a negative
WHO = "KV Inject on Flux, Chroma, Qwen-Image and SD3.5"
NEGATIVES = ("a blurry photo of a cat", "a dark photo of an astronaut", "a blurry photo of an astronaut",
             "a photo of an astronaut")
# Identity edit (source prompt, the inversion's noise, every block from step 0) against the plain reconstruction:
# the injected K/V are the source's at the chain latents, which the sampled trajectory misses by the round trip's
# error only (at the chain latents themselves the prediction is bit-identical: the next test). Measured at 256 px,
# 8 steps: flux 9.1e-5 (round trip 3.8e-2), chroma 1.1e-4 (round trip 0.47), qwen_image 5.1e-5 (round trip 5.3e-2):
# below 1% of the round trip and 5e-4.
IDENTITY_TOL = 5e-4
IDENTITY_OF_ROUND_TRIP = 1e-2


def missing(family: str = "flux") -> str | None:
    features = {"qwen_image": ("qwen-image-models",), "sd3": ("attention-override",)}.get(family, ())
    features = ("flux-models", "dit-attention-patches") + features
    return flow_models.missing_feature(WHO, *features) or flow_models.missing_family(family)


@pytest.fixture(scope="module", params=FAMILIES)
def flow(request):
    reason = missing(request.param)
    if reason:
        pytest.skip(reason)
    import node_helpers
    family = request.param
    model, clip, vae = flow_models.load_family(family)

    def encode(text):
        out = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True, return_dict=True)
        cond = out.pop("cond")
        positive = [[cond, out]]
        if family == "flux":   # what the stock FluxGuidance node does
            positive = node_helpers.conditioning_set_values(positive, {"guidance": GUIDANCE})
        return positive

    with torch.inference_mode():
        latent = {"samples": vae.encode(photos.photo("astronaut", PX))}
        positive, target, empty = encode(SOURCE), encode(TARGET), encode("")
        # a negative prompt as long as the source's: ComfyUI batches the two CFG halves in one forward
        same_length = next(n for n in (encode(t) for t in NEGATIVES) if n[0][0].shape == positive[0][0].shape)
        noise, sigmas, inv = ICDDIMInvert().invert(model, latent, positive, STEPS, 1.0, 6, scheduler="simple")
    return dict(family=family, model=model, latent=latent, positive=positive, target=target, empty=empty,
                same_length=same_length, sigmas=sigmas, inv=inv)


def sample(f, model=None, positive=None, negative=None, cfg=1.0):
    """The stock graph: Inverted Noise -> SamplerCustomAdvanced (CFGGuider, euler, DDIM Invert's sigmas)."""
    import comfy_extras.nodes_custom_sampler as ncs
    model = model or f["model"]
    with torch.inference_mode():
        noise = ICInvertedNoise().noise(model, f["inv"])["result"][0]
        guider = ncs.CFGGuider.execute(model, positive or f["positive"], negative or f["positive"], cfg).result[0]
        sampler = ncs.KSamplerSelect.execute("euler").result[0]
        empty = {"samples": torch.zeros_like(f["latent"]["samples"])}
        return ncs.SamplerCustomAdvanced.execute(noise, guider, sampler, f["sigmas"], empty).result[0]["samples"]


def error(a, b):
    return float((a.float() - b.float()).abs().max())


def inject(f, start_percent=0.0, start_layer=0, **kw):
    with torch.inference_mode():
        return ICKVInject().patch(f["model"], f["inv"], start_percent, start_layer, "mutual", **kw)[0]


def test_identity_edit_reproduces_the_reconstruction(flow, store):
    """Source prompt, the inversion's noise, every block from step 0: the reconstruction again."""
    plain = sample(flow)
    injected = sample(flow, inject(flow))
    err, round_trip = error(injected, plain), error(plain, flow["latent"]["samples"])
    measured(f"{flow['family']}: identity edit vs reconstruction {err:.3e} (round trip {round_trip:.3e})")
    assert err < IDENTITY_TOL and err < IDENTITY_OF_ROUND_TRIP * round_trip


def test_at_the_chain_latents_the_patched_model_predicts_bit_identically(flow, store):
    """Exactness without the sampler's drift: on the chain latent of each step the injected K/V are the very
    values the block computes, so the prediction is the stock one bit for bit (recorded and injected at the same
    hook, before RoPE, the injected keys are rotated once, as the block's own: a record taken after the rotation
    would be rotated twice and show here)."""
    assert torch.equal(chain_predictions(flow, flow["model"]), chain_predictions(flow, inject(flow)))


def chain_predictions(flow, model):
    """The model's predictions (cfg 1, the source prompt) at the inversion's chain latents, one per step."""
    inv, calls = flow["inv"], []
    model.model.current_patcher = model

    def run(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        for i in range(inv.steps):
            x_i = inv.latent_at(i, x.device, x.dtype)
            calls.append(model_k(x_i, x_i.new_ones([1]) * float(inv.sigmas[i]), **(extra_args or {})))
        return x

    with torch.inference_mode():
        compat.sample_with_function(model, run, inv.sigmas, flow["positive"], flow["positive"], 1.0,
                                    torch.zeros_like(flow["latent"]["samples"]))
    return torch.stack(calls)


def own_image_keys_appended(block):
    """Qwen-Image's oracle (its attention takes no mask back from a patch): in ``block`` the block's own image K/V
    and their rotary rows appended, what union appends at the chain latents."""
    def patch(q, k, v, pe=None, attn_mask=None, extra_options=None):
        if (extra_options["block_type"], extra_options["block_index"]) != block.key:
            return {}
        s0, s1 = extra_options["img_slice"]
        return {"k": torch.cat([k, k[:, :, s0:s1]], 2), "v": torch.cat([v, v[:, :, s0:s1]], 2),
                "pe": torch.cat([pe, pe[:, :, s0:s1]], 2)}
    return patch


def doubled_image_keys(block):
    """The oracle of union in ``block`` at the chain latents: there every image key's logit raised by log 2 (two
    equal copies of a key weigh as one with twice its exponent), as an additive mask; nothing appended."""
    def patch(q, k, v, pe=None, attn_mask=None, extra_options=None):
        if (extra_options["block_type"], extra_options["block_index"]) != block.key:
            return {}
        s0, s1 = extra_options["img_slice"]
        bias = torch.zeros(k.shape[0], 1, 1, k.shape[2], dtype=q.dtype, device=q.device)
        bias[..., s0:s1] = math.log(2.0)
        base = dit_layers.additive_mask(attn_mask, q.device, q.dtype)
        return {"attn_mask": bias if base is None else base + bias}
    return patch


def test_union_at_the_chain_latents_equals_attention_with_doubled_image_keys(flow, store):
    """union appends the source's image K/V (with their own rotary rows) to the joint sequence. In the last block,
    at the chain latents, they equal the target's own (every earlier block is stock, as in the source's pass), so
    each image key appears twice: the attention of an independent patch that raises every image key's logit by
    log 2 there instead. (In later blocks union's own changes to the hidden state make the two differ, as intended.)
    Qwen-Image's attention takes no mask back from a patch: there the oracle appends the block's own image K/V, which
    checks the recorded source but not the append itself. Control: the stock prediction differs far more."""
    from inversion_chain.attention.core import patching
    last = dit_layers.enumerate_blocks(flow["model"])[-1]
    with torch.inference_mode():
        union = ICKVInject().patch(flow["model"], flow["inv"], 0.0, last.position, "union")[0]
    got = chain_predictions(flow, union)
    oracle = own_image_keys_appended if flow["family"] == "qwen_image" else doubled_image_keys
    want = chain_predictions(flow, patching.add_attn1_patch(flow["model"].clone(), oracle(last)))
    stock = chain_predictions(flow, flow["model"])
    err, moved = error(got, want), error(stock, want)
    measured(f"{flow['family']}: union in {last.describe()} vs doubled image keys at the chain latents {err:.2e}; "
             f"stock vs them {moved:.2e}")
    assert err < 1e-4 and moved > 100 * err


def test_no_blocks_or_no_steps_is_bit_identical_to_stock_sampling(flow, store):
    """The patch installed but acting nowhere (no blocks, or no steps) changes nothing, bit for bit; the node
    refuses a start_percent that leaves no step, naming the range."""
    stock = sample(flow, positive=flow["target"])
    blocks = dit_layers.enumerate_blocks(flow["model"])
    for chosen, steps in (([], list(range(STEPS))), (blocks, [])):
        with torch.inference_mode():
            patched = pipeline.patch_dit(flow["model"], flow["inv"], chosen, steps)
        assert torch.equal(sample(flow, patched, positive=flow["target"]), stock)
    with pytest.raises(InversionChainError, match=r"^KV Inject \(Mutual Self-Attention\): start_percent 1 leaves none "
                                                  r"of the inversion's 8 steps.*below 0\.875"):
        inject(flow, start_percent=1.0)


def test_image_token_positions_do_not_depend_on_the_prompt(flow, store):
    """Why source K/V land at the right rotary positions: the rotary table ComfyUI hands attn1_patch (``pe``) has the
    same rows for the image tokens whatever the prompt's length (Flux/Chroma: text ids are zeros; Qwen-Image: text
    ids start after the grid's half-size), so a source key recorded before RoPE is rotated as in its own pass. SD3.5
    has no rotary table (its positions are added to the image tokens before the first block): ``pe`` is None."""
    from inversion_chain.attention.core import patching
    seen = {}

    def spy(q, k, v, pe=None, attn_mask=None, extra_options=None):
        s0, s1 = extra_options["img_slice"]
        seen.setdefault(k.shape[2] - (s1 - s0), None if pe is None else pe[:, :, s0:s1].clone())
        return {}

    import nodes
    spied = patching.add_attn1_patch(flow["model"].clone(), spy)
    longer = nodes.ConditioningConcat().concat(flow["target"], flow["positive"])[0]   # the stock node: more tokens
    for text in (flow["positive"], longer):
        sample(flow, spied, positive=text)
    assert len(seen) == 2                      # two text lengths seen (the control: the prompts differ in length)
    first, second = seen.values()
    if flow["family"] == "sd3":   # no rotary table: SD3 adds its positions to the image tokens at the input
        assert first is None and second is None
        return
    assert torch.equal(first, second)


def test_reference_latents_are_refused(flow, store):
    """Kontext / Qwen-Image-Edit style reference latents add image tokens to the joint sequence: refused by name."""
    if flow["family"] in ("chroma", "sd3"):
        pytest.skip("ComfyUI's Chroma and MMDiT networks read no reference latents (comfy/ldm/chroma/model.py, "
                    "comfy/ldm/modules/diffusionmodules/mmdit.py): nothing to refuse")
    import node_helpers
    with_ref = node_helpers.conditioning_set_values(flow["target"], {"reference_latents": [flow["latent"]["samples"]]},
                                                    append=True)
    with pytest.raises(InversionChainError, match=r"^KV Inject \(Mutual Self-Attention\): the sampler's conditioning "
                                                  r"carries reference latents"):
        sample(flow, inject(flow), positive=with_ref)


def rms(a, b):
    return float((a.float() - b.float()).pow(2).mean().sqrt())


def test_injection_moves_the_edit_toward_the_source(flow, store, request):
    """Target prompt from the inversion's noise: with injection (every block from step 0, and the default: Stable
    Flow's vital layers) the result is closer (RMS over the LATENT) to the source's reconstruction than plain
    sampling with the target prompt, the control (the prompt alone moves it away)."""
    if flow["family"] == "flux":
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "on the Flux dev layout at 256 px the edit is not closer (RMS to the reconstruction: plain 1.87, "
            "injected 1.92): ComfyUI pads Flux's T5 to 256 tokens, as many as the image's, and the pooled CLIP vector "
            "modulates every block, which K/V injection leaves alone (as Stable Flow's); at 512 px (1024 image "
            "tokens) it is closer, 1.69 -> 1.60, too slow for this suite")))
    if flow["family"] == "qwen_image":
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "on the tiny Qwen-Image layout (two blocks, one head, a random 32-wide text encoder) the target prompt "
            "barely moves the result (RMS to the reconstruction 0.028, the control needs > 0.5; at true cfg 4 with "
            "'' negative 0.109) and injection from step 0 in both blocks takes off about 1% of it (0.0280 -> 0.0275, "
            "cfg 4: 0.1090 -> 0.1088): nothing to show on random weights")))
    if flow["family"] == "sd3":
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "on the tiny SD3.5 layout (two joint blocks, random text encoders) the target prompt moves the result "
            "little (RMS to the reconstruction 0.289, the control needs > 0.5) and injection in every block from "
            "step 0 takes off 4% of it (0.289 -> 0.278): nothing to show on random weights")))
    reconstruction = sample(flow)
    plain = rms(sample(flow, positive=flow["target"]), reconstruction)
    every = rms(sample(flow, inject(flow), positive=flow["target"]), reconstruction)
    vital = rms(sample(flow, inject(flow, start_layer=-1), positive=flow["target"]), reconstruction)
    measured(f"{flow['family']}: RMS to the reconstruction: target plain {plain:.3f}, injected (every block) "
          f"{every:.3f}, injected (family default blocks) {vital:.3f}")
    assert plain > 0.5                       # the control: the target prompt does change the result
    # Chroma at 256 px: 1.82 -> 1.20 (both selections are every block on this two-block layout)
    assert every < 0.8 * plain and vital < 0.8 * plain


def test_cache_equals_recompute(flow, store):
    """Cached K/V, K/V recomputed next to each sampling call, and a partial cache (the first steps that fit the
    budget cached, the others recomputed) give the same edit, bit for bit; on Chroma (true CFG) also at cfg 2 with a
    negative prompt (both CFG halves recorded), batched with the positive by ComfyUI or not."""
    cases = [dict(cfg=1.0)]
    if flow["family"] in TRUE_CFG:   # the halves in two forwards ("" is too short to batch), and in one
        cases += [dict(cfg=2.0, negative=flow["empty"]), dict(cfg=2.0, negative=flow["same_length"])]
    for case in cases:
        neg = case.get("negative")
        cached = inject(flow, start_percent=0.25, negative=neg)
        recomputed = inject(flow, start_percent=0.25, negative=neg, cache="recompute")
        a = sample(flow, cached, positive=flow["target"], negative=neg, cfg=case["cfg"])
        b = sample(flow, recomputed, positive=flow["target"], negative=neg, cfg=case["cfg"])
        assert torch.equal(a, b), (case["cfg"], error(a, b))
        # a budget that holds two of the six steps: those cached, the other four recomputed (partial)
        (entry,) = store.entries.values()
        store.clear()
        store.max_bytes = int(entry.estimate_bytes() / len(entry.steps) * 2.5)
        partial = inject(flow, start_percent=0.25, negative=neg)
        (held,) = store.entries.values()
        assert len(held.steps) == 2 and held.nbytes() == held.estimate_bytes() == entry.estimate_bytes() // 3
        c = sample(flow, partial, positive=flow["target"], negative=neg, cfg=case["cfg"])
        assert torch.equal(a, c), (case["cfg"], error(a, c))
        store.max_bytes = None
        store.clear()
        if neg is not None:
            plain = sample(flow, positive=flow["target"], negative=neg, cfg=case["cfg"])
            assert error(a, plain) > 1e-4


def test_cfg_without_negative_is_a_clear_error(flow, store):
    if flow["family"] not in TRUE_CFG:
        pytest.skip("guidance-distilled Flux samples at cfg 1")
    # raised inside the stock sampler: the editor names the node that made it (its display name)
    with pytest.raises(InversionChainError, match=r"^KV Inject \(Mutual Self-Attention\): the sampler runs "
                                                  r"classifier-free guidance"):
        sample(flow, inject(flow), positive=flow["target"], negative=flow["empty"], cfg=2.0)


def test_store_holds_exactly_the_image_token_kv(flow, store):
    """One store entry; its bytes are 2 (K, V) x hidden x image tokens x blocks x steps x CFG halves x itemsize,
    the estimate made before filling, and what the store counts for it (besides the inversion it keeps)."""
    from inversion_chain.attention.store import store_memory
    from inversion_chain.attention.store.dit_reference import DiTReferenceKV
    inject(flow, start_percent=0.25, start_layer=-1)
    (entry,) = store.entries.values()
    assert isinstance(entry, DiTReferenceKV)
    c, h, w = flow["inv"].latent_shape[-3:]
    tokens = (h // 2) * (w // 2)
    hidden = flow_models.HIDDEN if flow["family"] != "qwen_image" else (
        flow_models_more.QWEN_DIT["num_attention_heads"] * flow_models_more.QWEN_DIT["attention_head_dim"])
    steps = len([i for i in range(STEPS) if i / STEPS >= 0.25])
    blocks = len(dit_layers.vital_blocks(dit_layers.enumerate_blocks(flow["model"])))
    expected = 2 * hidden * tokens * blocks * steps * 1 * 4   # float32 layouts: 4 bytes
    assert entry.nbytes() == entry.estimate_bytes() == expected
    assert len(entry.store) == blocks * steps
    assert sum(t.numel() * t.element_size() for t in store_memory.recorded_tensors(entry)) == expected
    # the same inputs reuse the entry; another start step is another key
    inject(flow, start_percent=0.25, start_layer=-1)
    assert len(store.entries) == 1
    inject(flow, start_percent=0.5, start_layer=-1)
    assert len(store.entries) == 2


def test_patch_leaves_the_original_model_untouched(flow, store):
    model = flow["model"]
    before_options = repr(model.model_options)
    before = sample(flow, positive=flow["target"])
    patched = inject(flow)
    assert patched is not model and repr(model.model_options) == before_options
    assert "attn1_patch" not in model.model_options.get("transformer_options", {}).get("patches", {})
    sample(flow, patched, positive=flow["target"])
    assert torch.equal(sample(flow, positive=flow["target"]), before)


def test_inputs_are_checked_with_the_family_range(flow, store):
    blocks = dit_layers.enumerate_blocks(flow["model"])
    if flow["family"] in ("qwen_image", "sd3"):
        depth = (flow_models_more.QWEN_DIT["num_layers"] if flow["family"] == "qwen_image"
                 else flow_models_more.SD3_DEPTH)
        assert [b.kind for b in blocks] == ["double"] * depth
        where = r"0\.\.1 its joint \(double-stream\) blocks \(valid: 0\.\.1\), or -1 for the middle band"
    else:
        assert [b.kind for b in blocks] == ["double", "single"]
        where = r"0\.\.0 the double blocks, 1\.\.1 the single blocks \(valid: 0\.\.1\), or -1 for Stable Flow"
    with pytest.raises(InversionChainError, match=r"start_layer 2 is outside this .*2 blocks.*" + where):
        inject(flow, start_layer=2)
    with pytest.raises(InversionChainError, match="mode 'masked' is not available on .*use mutual .* or union"):
        with torch.inference_mode():   # refused by name, not silently run as mutual
            ICKVInject().patch(flow["model"], flow["inv"], 0.0, 0, "masked")


@pytest.mark.fast
def test_vital_layers_are_stable_flows_on_the_full_layout():
    """Stable Flow's vital layers of FLUX.1-dev (positions 0, 1, 2, 17, 18, 25, 28, 53, 54, 56 of 57) on a 19 + 38
    block list; the same relative depths on smaller layouts; start_layer n = every block from position n."""
    blocks = [dit_layers.DiTBlock("double", i, i, 24, 128) for i in range(19)]
    blocks += [dit_layers.DiTBlock("single", i, 19 + i, 24, 128) for i in range(38)]
    assert [b.position for b in dit_layers.vital_blocks(blocks)] == [0, 1, 2, 17, 18, 25, 28, 53, 54, 56]
    assert [b.position for b in dit_layers.select_blocks(blocks, 50)] == list(range(50, 57))
    tiny = [dit_layers.DiTBlock("double", 0, 0, 1, 128), dit_layers.DiTBlock("single", 0, 1, 1, 128)]
    assert dit_layers.vital_blocks(tiny) == tiny


@pytest.mark.fast
def test_qwen_image_default_is_the_middle_band():
    """Qwen-Image (60 joint blocks, no single stream): -1 = blocks 15..44 (AttnRouter's effective band, docs/nodes.md),
    the same relative band on smaller stacks, never empty; the Flux rule does not apply to a stack without singles."""
    qwen = [dit_layers.DiTBlock("double", i, i, 24, 128) for i in range(60)]
    assert [b.position for b in dit_layers.select_blocks(qwen, -1)] == list(range(15, 45))
    assert [b.position for b in dit_layers.select_blocks(qwen[:20], -1)] == list(range(5, 15))
    assert [b.position for b in dit_layers.select_blocks(qwen[:2], -1)] == [0, 1]
    assert [b.position for b in dit_layers.select_blocks(qwen[:1], -1)] == [0]


@pytest.mark.fast
def test_skip_reason_names_the_missing_feature():
    """On trees without Flux/Chroma (2024-03) or without the DiT attn1_patch (< 0.17.0) these tests skip with a
    sentence naming the feature and its floor; on the current tree nothing is missing."""
    reason = missing()
    if compat.has_feature("flux-models") and compat.has_feature("dit-attention-patches"):
        assert reason is None and missing("qwen_image") == flow_models.missing_family("qwen_image")
    else:
        assert reason.startswith(WHO + " needs ") and ("0.3.31" in reason or "0.17.0" in reason)


def test_sd3_bridge_reaches_the_joint_attention_and_keeps_other_packs_patches(flow, store):
    """SD3.5 only (the bridge is its hook, attention/core/mmdit_bridge.py): the patches see each joint block once per
    forward, named, with q, k, v of the joint sequence [text ; image]; what a patch returns is what the attention
    uses (zeroing the image values changes the result: the control that the hook acts); a block replace patch
    another pack set in the same slot still runs."""
    if flow["family"] != "sd3":
        pytest.skip("the bridge is for ComfyUI's MMDiT (SD3 / SD3.5); the other families call attn1_patch themselves")
    from inversion_chain.attention.core import patching
    seen, theirs = [], []

    def spy(q, k, v, pe=None, attn_mask=None, extra_options=None):
        s0, s1 = extra_options["img_slice"]
        seen.append((extra_options["block_type"], extra_options["block_index"], q.shape[2], s1 - s0, pe))
        return {}

    def zero_image_values(q, k, v, pe=None, attn_mask=None, extra_options=None):
        s0, s1 = extra_options["img_slice"]
        v = v.clone()
        v[:, :, s0:s1] = 0
        return {"v": v}

    def their_block(args, extra):   # another pack's replace patch, set before this pack's
        theirs.append(args["transformer_options"].get("block_index"))
        return extra["original_block"](args)

    other = flow["model"].clone()
    other.set_model_patch_replace(their_block, "dit", "double_block", 0)
    stock = sample(flow)
    spied = patching.add_attn1_patch(other.clone(), spy)
    assert torch.equal(sample(flow, spied), stock)
    tokens = pipeline.image_tokens(flow["model"], flow["latent"]["samples"].shape)
    depth = flow_models_more.SD3_DEPTH
    assert [(t, i) for t, i, *_ in seen[:depth]] == [("double", i) for i in range(depth)]
    assert all(n_img == tokens and n > tokens and pe is None for *_, n, n_img, pe in seen)
    assert len(seen) == depth * STEPS and theirs == [0] * STEPS   # theirs saw the block named by the bridge
    zeroed = sample(flow, patching.add_attn1_patch(flow["model"].clone(), zero_image_values))
    measured(f"sd3 bridge: zeroing the image values moves the result by {error(zeroed, stock):.3f}")
    assert error(zeroed, stock) > 1e-2
