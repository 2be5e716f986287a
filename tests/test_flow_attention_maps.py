"""Attention Capture + Attention Map Viewer on Flux-layout DiTs (Flux dev-style, Chroma) and Qwen-Image: image-to-text
maps of the joint attention per text token (T5 / Qwen2.5), image self-attention maps at a query grid.

The models are tests/harness/flow_models.py's random-weight layouts (Flux/Chroma: one double and one single block,
one head of 128; Qwen-Image: two joint blocks) loaded through the stock UNETLoader, with the real tokenizers; claims
here are about exactness, memory and plumbing: random weights cannot put a word's map on its object, and nothing
here says they do. On trees without these families every test that needs one skips and names the missing family."""
import pytest
import torch

from inversion_chain.artifacts import InversionChainError
from inversion_chain.attention.core import tokens as tokens_mod
from inversion_chain.attention.viewer import capture as capture_mod
from inversion_chain.attention.viewer import dit_capture
from inversion_chain.nodes.attention_maps import ICAttentionCapture, ICAttentionMapViewer
from tests.harness.measure import measured
from tests.harness import flow_models

PROMPT = "a watercolor painting of a red fox in the snow"
NEGATIVE = "a blurry dark photo"
PX = 128              # latent 16x16: an 8x8 token grid
STEPS = 2
FAMILIES = ("flux", "chroma", "qwen_image")
WHO = "Attention Capture on Flux, Chroma, Qwen-Image and SD3.5"
# float16 storage: a stored probability is within half an ulp (2^-11 relative) of the float32 one; plus the
# difference between two float32 summation orders (~1e-6 of the largest value)
REL_TOL, ABS_TOL = 2 ** -10, 1e-6


def missing(family) -> str | None:
    return flow_models.missing_feature(WHO, "qwen-image-models" if family == "qwen_image" else "flux-models",
                                       "dit-attention-patches")


@pytest.fixture(scope="module", params=FAMILIES)
def flow(request):
    family = request.param
    reason = missing(family) or flow_models.missing_family(family)
    if reason:
        pytest.skip(reason)
    import node_helpers
    model, clip, _vae = flow_models.load_family(family)

    def encode(text):
        out = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True, return_dict=True)
        cond = out.pop("cond")
        cond_list = [[cond, out]]
        if family == "flux":   # what the stock FluxGuidance node does
            cond_list = node_helpers.conditioning_set_values(cond_list, {"guidance": 3.5})
        return cond_list

    with torch.inference_mode():
        positive, negative = encode(PROMPT), encode(NEGATIVE)
    frames = (1,) if family == "qwen_image" else ()   # Qwen-Image's latent has one frame: [B, 16, 1, H, W]
    latent = {"samples": torch.randn(1, 16, *frames, PX // 8, PX // 8, generator=torch.Generator().manual_seed(5))}
    return dict(family=family, model=model, clip=clip, positive=positive, negative=negative, latent=latent)


def sample(f, model=None, cfg=1.0, steps=STEPS, seed=3):
    """The stock KSampler (euler, simple), noise from ``seed``."""
    import nodes
    with torch.inference_mode():
        return nodes.common_ksampler(model or f["model"], seed, steps, cfg, "euler", "simple", f["positive"],
                                     f["negative"], f["latent"])[0]["samples"]


def capture(f, kinds="cross + self", max_mb=64, detail="per layer", query_grid=2, **kw):
    with torch.inference_mode():
        return ICAttentionCapture().capture(f["model"], kinds, "all", detail, query_grid, clip=f["clip"],
                                            prompt=PROMPT, negative_prompt=NEGATIVE, max_mb=max_mb, **kw)


# -- the oracle: the block's joint attention by hand -----------------------------------------------------------------
def rms_norm(x, scale, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale


def rotate(x, pe):
    """RoPE as Flux defines it: pe (B, 1, N, D/2, 2, 2) rotation matrices applied to pairs of x's channels."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    return (pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]).reshape(*x.shape)


def blocks_of(dm):
    """(unit kind, block, the projections to hook) of the blocks the oracle recomputes."""
    if hasattr(dm, "transformer_blocks"):   # Qwen-Image: two joint blocks
        return [("qwen", b, ("attn.to_q", "attn.to_k", "attn.add_q_proj", "attn.add_k_proj"))
                for b in dm.transformer_blocks[:2]]
    return [("double", dm.double_blocks[0], ("img_attn.qkv", "txt_attn.qkv")),
            ("single", dm.single_blocks[0], ("linear1",))]


def record_block_inputs(dm):
    """Forward hooks (torch's, not ComfyUI's patches) on the first blocks: the q/k projections' outputs, pe and the
    text length of every call, per block position."""
    calls = {i: [] for i in range(2)}
    handles = []
    for position, (_kind, block, linears) in enumerate(blocks_of(dm)):
        def pre(_m, args, kwargs, position=position):
            pe = kwargs.get("pe", kwargs.get("image_rotary_emb"))
            txt = kwargs.get("txt", kwargs.get("encoder_hidden_states"))
            calls[position].append({"pe": pe.clone(), "txt": txt.shape[1] if txt is not None else None,
                                    "img_slice": kwargs["transformer_options"].get("img_slice")})
        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        for name in linears:
            def post(_m, _inp, out, position=position, name=name):
                calls[position][-1][name] = out.detach().clone()
            handles.append(block.get_submodule(name).register_forward_hook(post))
    return calls, handles


def oracle_maps(dm, position, call, text_only=False, rope=True):
    """(B, T, N_img) image-to-text probabilities of the joint attention, mean over heads, from the block's weights."""
    kind, block, _ = blocks_of(dm)[position]
    if kind == "qwen":
        attn = block.attn
        heads = attn.heads

        def split(name, norm):
            x = call[name]
            return rms_norm(x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2), norm.weight, 1e-5)
        q = torch.cat([split("attn.add_q_proj", attn.norm_added_q), split("attn.to_q", attn.norm_q)], 2)
        k = torch.cat([split("attn.add_k_proj", attn.norm_added_k), split("attn.to_k", attn.norm_k)], 2)
        t = call["txt"]
    elif kind == "double":
        block = dm.double_blocks[0]
        heads = block.num_heads
        parts = []
        for name, attn in (("txt_attn.qkv", block.txt_attn), ("img_attn.qkv", block.img_attn)):
            qkv = call[name]
            b, n, _ = qkv.shape
            q, k, _v = qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
            parts.append((rms_norm(q, attn.norm.query_norm.weight), rms_norm(k, attn.norm.key_norm.weight)))
        q = torch.cat([parts[0][0], parts[1][0]], 2)
        k = torch.cat([parts[0][1], parts[1][1]], 2)
        t = call["txt"]
    else:
        block = dm.single_blocks[0]
        heads = block.num_heads
        qkv = call["linear1"][..., :3 * block.hidden_size]
        b, n, _ = qkv.shape
        q, k, _v = qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k = rms_norm(q, block.norm.query_norm.weight), rms_norm(k, block.norm.key_norm.weight)
        t = call["img_slice"][0]
    if rope:
        q, k = rotate(q, call["pe"]), rotate(k, call["pe"])
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5   # the full joint matrix
    img = scores[:, :, t:]
    probs = img[..., :t].softmax(-1) if text_only else img.softmax(-1)[..., :t]
    return probs.mean(1).transpose(1, 2)


def test_captured_image_to_text_maps_equal_the_blocks_joint_attention_by_hand(flow):
    """Both blocks, first step: the stored map equals softmax over all keys of (RoPE'd, RMS-normed) q k^T / sqrt(d)
    computed here from the block's own projections (torch hooks, not the capture's patch), to float16 rounding.
    Controls: the same oracle with a text-only softmax, or without RoPE, misses by far more than the tolerance."""
    dm = flow["model"].model.diffusion_model
    patched, maps = capture(flow, kinds="cross")
    calls, handles = record_block_inputs(dm)
    try:
        sample(flow, patched)
    finally:
        for h in handles:
            h.remove()
    for position in range(2):
        kind = blocks_of(dm)[position][0]
        call = calls[position][0]                      # step 0 (cfg 1: one call per step)
        want = oracle_maps(dm, position, call)[0]      # (T, N_img)
        got = maps.steps[0].maps[("cross", f"L{position}", 0)][0].float().flatten(1)
        assert got.shape == want.shape
        err = float((got - want).abs().max())
        bound = float((REL_TOL * want.abs() + ABS_TOL).min())
        assert torch.all((got - want).abs() <= REL_TOL * want.abs() + ABS_TOL), (kind, err)
        text_only = float((oracle_maps(dm, position, call, text_only=True)[0] - got).abs().max())
        no_rope = float((oracle_maps(dm, position, call, rope=False)[0] - got).abs().max())
        share = float(want.sum(0).mean())
        measured(f"{flow['family']} {kind} block (position {position}): |captured - by hand| {err:.2e} (max prob "
                 f"{float(want.max()):.3e}); "
                 f"controls: text-only softmax {text_only:.2e}, no RoPE {no_rope:.2e}; mean text share of an image "
                 f"query {share:.3f}")
        assert text_only > 100 * err + 1e-4 and no_rope > 10 * err + 1e-6, (text_only, no_rope, err, bound)


@pytest.mark.fast
def test_joint_maps_chunked_multi_head_and_masked_equal_the_full_matrix():
    """The map code on more than the test models' one head (every tree: no model needed): 3 heads, a boolean key
    mask, and one image query per chunk (a 1-byte chunk budget) or one chunk, give the full-matrix joint softmax,
    mean over heads, to float32 rounding; a text-only normaliser (the control) does not."""
    g = torch.Generator().manual_seed(11)
    b, heads, t, n_img, d = 2, 3, 7, 24, 16
    q, k = (torch.randn(b, heads, t + n_img, d, generator=g) for _ in range(2))
    mask = torch.ones(t + n_img, t + n_img, dtype=torch.bool)
    mask[:, 2] = False                                  # a text key no query may see
    pe = None                                           # RoPE is the oracle test's; here the softmax and the chunks
    points = torch.tensor([0, 5, 23])
    full = (torch.matmul(q, k.transpose(-1, -2)) * d ** -0.5).masked_fill(~mask, float("-inf")).softmax(-1)
    want_cross = full[:, :, t:, :t].mean(1).transpose(1, 2)
    want_self = full[:, :, t + points, t:].mean(1)
    for chunk_bytes in (1, 2 ** 30):
        cross, own = dit_capture.joint_maps(q, k, pe, mask, t, n_img, points, True, chunk_bytes=chunk_bytes)
        assert torch.allclose(cross, want_cross, rtol=1e-5, atol=1e-7)
        assert torch.allclose(own, want_self, rtol=1e-5, atol=1e-7)
        assert float(cross[:, 2].abs().max()) == 0.0
    # a text batched with a longer one (ComfyUI repeats a context to a common multiple): the copies summed
    doubled = torch.cat([want_cross, want_cross], 1) / 2
    assert torch.allclose(dit_capture.fold_repeats(doubled, t), want_cross)
    assert dit_capture.fold_repeats(want_cross, t) is want_cross and dit_capture.fold_repeats(doubled, 5) is doubled
    # the control: a text-only normaliser is not this
    text_only = full.new_tensor(0) + (torch.matmul(q, k.transpose(-1, -2))[:, :, t:, :t] * d ** -0.5).masked_fill(
        ~mask[t:, :t], float("-inf")).softmax(-1).mean(1).transpose(1, 2)
    assert float((text_only - want_cross).abs().max()) > 1e-2


def hf_word_positions(clip, prompt, word):
    """Oracle: the T5 pieces of ``word`` (with the word-start piece before it) by the HF tokenizer's character
    offsets on the whole prompt, independent of ComfyUI's per-word tokenization."""
    hf = tokens_mod.t5_tokenizer(clip).tokenizer
    offsets = hf(prompt, return_offsets_mapping=True)["offset_mapping"]
    start = prompt.index(word)
    lo, hi = max(0, start - 1), start + len(word)
    return [i for i, (s, e) in enumerate(offsets) if e > s and lo <= s and e <= hi]


def bpe_word_positions(clip, prompt, word):
    """Oracle for Qwen's byte-level BPE (the space belongs to the next word): the tokens the prompt gains from the
    text before the word's space to the word's end, by the HF tokenizer on prefixes of the prompt."""
    hf = tokens_mod.qwen_tokenizer(clip).tokenizer
    start = prompt.index(word)
    lo = len(hf.encode(prompt[:max(0, start - 1)], add_special_tokens=False))
    return list(range(lo, len(hf.encode(prompt[:start + len(word)], add_special_tokens=False))))


def test_word_lookup_maps_the_words_tokens(flow):
    """A word's positions in the text stream the model reads (T5: Flux pads it to 256, Chroma does not; Qwen-Image:
    Qwen2.5 BPE after the chat template's dropped head): position p of the captured map is ids[p]. Control: a
    neighbouring word gives other positions; a word that is not in the prompt is a clear error listing the tokens."""
    clip = flow["clip"]
    qwen = flow["family"] == "qwen_image"
    prompt = dit_capture.prompt_tokens_for(clip, PROMPT)
    ids = prompt.ids
    found = {w: prompt.locate(w, "test") for w in ("fox", "red", "watercolor", "snow")}
    for word, positions in found.items():
        oracle = bpe_word_positions if qwen else hf_word_positions
        assert positions == oracle(clip, PROMPT, word), word
    assert found["fox"] != found["red"] and not set(found["fox"]) & set(found["red"])
    with torch.inference_mode():
        cond = flow["positive"][0][0]
    assert cond.shape[1] == len(ids)   # one text token per T5 id: the map's positions are the ids' positions
    measured(f"{flow['family']}: text stream {len(ids)} tokens; fox -> {found['fox']}, red -> {found['red']}, "
             f"watercolor -> {found['watercolor']}")
    with pytest.raises(InversionChainError, match=r"^test: the word 'wolf' is not in the prompt .* Its (T5|Qwen) "
                                                  r"tokens are: .*water"):
        prompt.locate("wolf", "test")


def test_capture_changes_nothing_and_its_memory_is_bounded(flow):
    """Sampling through the capture equals stock sampling bit for bit (Chroma also with true CFG: both branches
    captured); the maps take exactly the bytes capture.storage_bytes counts, under max_mb; a second run replaces the
    first (no growth); a budget below the run's need stops it before anything is stored, naming settings that fit."""
    cfg = 2.0 if flow["family"] == "chroma" else 1.0
    stock = sample(flow, cfg=cfg)
    patched, maps = capture(flow, max_mb=1)
    assert torch.equal(sample(flow, patched, cfg=cfg), stock)
    maps.flush()
    branches = 2 if cfg > 1 else 1
    assert sorted(maps.branches("cross")) == list(range(branches))
    # per branch, the prompt's own T5 length (Chroma does not pad: 14 and 7 tokens)
    lengths = [maps.steps[0].maps[("cross", "L0", b)].shape[1] for b in range(branches)]
    assert lengths == [len(dit_capture.prompt_tokens_for(flow["clip"], p).ids) for p in (PROMPT, NEGATIVE)[:branches]]
    layers = dit_capture.dit_layers(flow["model"])
    need = {key: sum(capture_mod.storage_bytes(layers, (PX // 8, PX // 8), STEPS, 1, 1, ("cross", "self"), t, 2)[key]
                     for t in lengths) for key in ("stored", "total")}
    tokens = lengths[0]
    first = maps.nbytes()
    assert first == need["stored"] <= 2 ** 20
    assert torch.equal(sample(flow, patched, cfg=cfg), stock)
    maps.flush()
    assert maps.nbytes() == first and len(maps.steps) == STEPS
    measured(f"{flow['family']}: {tokens} text tokens, {len(layers)} blocks, {STEPS} steps x {branches} branch(es): "
             f"{first} bytes stored (storage_bytes total with one step's float32 sums: {need['total']})")
    patched, maps = capture(flow, max_mb=1)
    maps.max_bytes = need["total"] // 4   # below one branch's need: refused at the run's first call
    with pytest.raises(InversionChainError, match=r"^Attention Capture: the maps of this run .* over max_mb .*"
                                                  r"Settings that fit: .*max_mb \d+ or more"):
        sample(flow, patched, cfg=cfg)
    assert maps.nbytes() == 0


def test_viewer_renders_flow_maps_through_the_nodes(flow):
    """Attention Map Viewer (the real node) on a flow capture: a word's tile is the sum of its T5 positions' maps
    (no start token dropped, no renormalisation: joint probabilities), every prompt token gets a tile when `tokens`
    is empty, self-attention tiles per query point; a word absent from the prompt is an error naming T5's tokens."""
    patched, maps = capture(flow)
    out = sample(flow, patched)
    viewer = ICAttentionMapViewer()
    with torch.inference_mode():
        grid, masks = viewer.view(maps, {"samples": out}, "cross", "fox, red", 0.0, 1.0, "all", "all captured",
                                  "cond", 0, "per tile", 0)
    assert grid.shape[0] == 1 and grid.shape[-1] == 3 and masks.shape == (2, PX, PX)
    assert bool(torch.isfinite(grid).all()) and float(grid.std()) > 0
    fox = dit_capture.prompt_tokens_for(flow["clip"], PROMPT).locate("fox", "test")
    mean = sum(maps.steps[i].maps[("cross", f"L{j}", 0)][0].float() for i in range(STEPS) for j in (0, 1)) / (2 * STEPS)
    want = torch.nn.functional.interpolate(mean[fox].sum(0)[None, None], size=(PX, PX), mode="bilinear",
                                           align_corners=False)[0, 0]
    assert torch.allclose(masks[0], want, atol=1e-6), float((masks[0] - want).abs().max())
    with torch.inference_mode():
        _, every = viewer.view(maps, {"samples": out}, "cross", "", 0.0, 1.0, "all", "all captured", "cond", 0,
                               "per tile", 0)
        _, points = viewer.view(maps, {"samples": out}, "self", "", 0.0, 1.0, "1", "all captured", "cond", 0,
                                "shared", 0)
    assert every.shape[0] == dit_capture.prompt_tokens_for(flow["clip"], PROMPT).end
    assert points.shape[0] == 4
    with pytest.raises(InversionChainError, match=r"^Attention Map Viewer: `tokens`: the word 'wolf' is not in the "
                                                  r"prompt .*(T5|Qwen) tokens"):
        viewer.view(maps, {"samples": out}, "cross", "wolf", 0.0, 1.0, "all", "all captured", "cond", 0,
                    "per tile", 0)


def test_flow_capture_refusals_name_the_fix(flow):
    """A UNet resolution on a DiT names the one grid."""
    with pytest.raises(InversionChainError, match=r"^Attention Capture: every block of this .* model attends on "
                                                  r"one token grid, latent/2 \(2 blocks.*Set resolution to latent/2 "
                                                  r"or all"):
        ICAttentionCapture().capture(flow["model"], "cross", "latent/4", "per layer", 2)


def test_capture_sees_kv_inject_whichever_node_comes_first(flow):
    """Capture -> KV Inject and KV Inject -> Capture record the same maps (the observer stays after KV Inject's
    patch), and they differ from a capture without KV Inject (the control: the injection does change the maps)."""
    if flow["family"] == "qwen_image":
        pytest.skip("KV Inject is not built on Qwen-Image (it refuses the family): nothing to order")
    from inversion_chain.nodes.invert import ICDDIMInvert
    from inversion_chain.nodes.kv_inject import ICKVInject
    with torch.inference_mode():
        _noise, _sigmas, inv = ICDDIMInvert().invert(flow["model"], flow["latent"], flow["negative"], STEPS, 1.0, 1,
                                                     scheduler="simple")

    def kv(model):
        with torch.inference_mode():
            return ICKVInject().patch(model, inv, 0.0, 0, "mutual")[0]

    def cross(maps):
        maps.flush()
        return torch.stack([s.maps[("cross", "L1", 0)].float() for s in maps.steps])

    captured, first = capture(flow, kinds="cross")
    sample(flow, kv(captured))
    with torch.inference_mode():
        after, second = ICAttentionCapture().capture(kv(flow["model"]), "cross", "all", "per layer", 2,
                                                     clip=flow["clip"], prompt=PROMPT, max_mb=64)
    sample(flow, after)
    plain_model, plain = capture(flow, kinds="cross")
    sample(flow, plain_model)
    assert torch.equal(cross(first), cross(second))
    assert float((cross(first) - cross(plain)).abs().max()) > 1e-4


# -- SD3.5 (ComfyUI's MMDiT, reached through the pack's bridge: attention/core/mmdit_bridge.py) ---------------------
@pytest.fixture(scope="module")
def sd3():
    reason = flow_models.missing_feature(WHO, "attention-override") or flow_models.missing_family("sd3")
    if reason:
        pytest.skip(reason)
    model, clip, _vae = flow_models.load_family("sd3")

    def encode(text):
        out = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True, return_dict=True)
        return [[out.pop("cond"), out]]

    with torch.inference_mode():
        positive, negative = encode(PROMPT), encode(NEGATIVE)
    latent = {"samples": torch.randn(1, 16, PX // 8, PX // 8, generator=torch.Generator().manual_seed(5))}
    return dict(family="sd3", model=model, clip=clip, positive=positive, negative=negative, latent=latent)


def sd3_oracle_maps(block, call, text_only=False):
    """(B, T, N_img) image-to-text probabilities of an MMDiT joint block, mean over heads, from its own q/k
    projections (torch hooks) and q/k RMSNorm: softmax over [text ; image] keys (SD3 has no RoPE)."""
    parts = []
    for name, attn in (("context", block.context_block.attn), ("x", block.x_block.attn)):
        qkv = call[name]
        b, n, _ = qkv.shape
        q, k, _v = qkv.view(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        parts.append((rms_norm(q, attn.ln_q.weight), rms_norm(k, attn.ln_k.weight)))
    q = torch.cat([parts[0][0], parts[1][0]], 2)
    k = torch.cat([parts[0][1], parts[1][1]], 2)
    t = call["context"].shape[1]
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    img = scores[:, :, t:]
    probs = img[..., :t].softmax(-1) if text_only else img.softmax(-1)[..., :t]
    return probs.mean(1).transpose(1, 2)


def test_sd3_captured_maps_equal_the_joint_attention_by_hand(sd3):
    """SD3.5: every joint block's stored image-to-text map equals softmax over all keys of (RMS-normed) q k^T /
    sqrt(d) from the block's own projections, to float16 rounding. Control: a text-only softmax misses by far more."""
    dm = sd3["model"].model.diffusion_model
    patched, maps = capture(sd3, kinds="cross")
    calls, handles = {}, []
    for i, block in enumerate(dm.joint_blocks):
        calls[i] = {}
        for name, attn in (("context", block.context_block.attn), ("x", block.x_block.attn)):
            def keep(_m, _inp, out, i=i, name=name):
                calls[i].setdefault(name, out.detach().clone())   # the first call: step 0 (cfg 1)
            handles.append(attn.qkv.register_forward_hook(keep))
    try:
        sample(sd3, patched)
    finally:
        for h in handles:
            h.remove()
    for i, block in enumerate(dm.joint_blocks):
        want = sd3_oracle_maps(block, calls[i])[0]
        got = maps.steps[0].maps[("cross", f"L{i}", 0)][0].float().flatten(1)
        assert got.shape == want.shape
        err = float((got - want).abs().max())
        assert torch.all((got - want).abs() <= REL_TOL * want.abs() + ABS_TOL), (i, err)
        text_only = float((sd3_oracle_maps(block, calls[i], text_only=True)[0] - got).abs().max())
        measured(f"sd3 joint block {i}: |captured - by hand| {err:.2e}; control text-only softmax {text_only:.2e}")
        assert text_only > 100 * err + 1e-4


def test_sd3_words_are_found_in_the_clip_and_the_t5_parts(sd3):
    """SD3.5's context is the CLIP window (77 tokens, start token first) then the T5 stream: a word's positions are
    its CLIP tokens and its T5 pieces offset by 77, by independent oracles (the HF tokenizers' offsets); the
    captured map of a word is read at exactly those columns; a missing word is a clear error."""
    clip = sd3["clip"]
    prompt = dit_capture.prompt_tokens_for(clip, PROMPT, sd3=True)
    with torch.inference_mode():
        assert sd3["positive"][0][0].shape[1] == len(prompt.ids)   # one text token per position
    hf_clip = tokens_mod._hf_tokenizer(clip)

    def count(text):   # CLIP BPE tokens of a prefix, without start/end tokens
        return len(hf_clip(text, add_special_tokens=False)["input_ids"])
    for word in ("fox", "watercolor"):
        start = PROMPT.index(word)
        before, through = count(PROMPT[:start]), count(PROMPT[:start + len(word)])
        clip_part = list(range(1 + before, 1 + through))      # position 0 is the start token
        t5_part = [len(prompt.clip_ids) + p for p in hf_word_positions(clip, PROMPT, word)]
        found = prompt.locate(word, "test")
        assert found == clip_part + t5_part and clip_part and t5_part, (word, found, clip_part, t5_part)
        labels = prompt.labels()
        assert labels[clip_part[0]].endswith("(CLIP)") and labels[t5_part[0]].endswith("(T5)")
    measured(f"sd3: context {len(prompt.ids)} tokens (CLIP {len(prompt.clip_ids)} + T5 {len(prompt.t5.ids)}); "
             f"fox -> {prompt.locate('fox', 'test')}")
    with pytest.raises(InversionChainError, match=r"^test: the word 'wolf' is not in the prompt"):
        prompt.locate("wolf", "test")
