"""Attention Capture + Attention Map Viewer on Flux-layout DiTs (Flux dev-style, Chroma): image-to-text maps of the
joint attention per T5 token, image self-attention maps at a query grid.

The models are tests/harness/flow_models.py's random-weight layouts (one double and one single block, one head of
128) loaded through the stock UNETLoader, with the real T5 tokenizer; claims here are about exactness, memory and
plumbing: random weights cannot put a word's map on its object, and nothing here says they do. On trees without
Flux/Chroma every test skips and names the missing family."""
import pytest
import torch

from inversion_chain import compat
from inversion_chain.artifacts import InversionChainError
from inversion_chain.attention.core import tokens as tokens_mod
from inversion_chain.attention.viewer import capture as capture_mod
from inversion_chain.attention.viewer import dit_capture
from inversion_chain.nodes.attention_maps import ICAttentionCapture, ICAttentionMapViewer
from tests.harness.measure import measured
from tests.harness import flow_models

PROMPT = "a watercolor painting of a red fox in the snow"
NEGATIVE = "a blurry photo"
PX = 128              # latent 16x16: an 8x8 token grid
STEPS = 2
FAMILIES = ("flux", "chroma")
WHO = "Attention Capture on Flux and Chroma"
# float16 storage: a stored probability is within half an ulp (2^-11 relative) of the float32 one; plus the
# difference between two float32 summation orders (~1e-6 of the largest value)
REL_TOL, ABS_TOL = 2 ** -10, 1e-6


def missing() -> str | None:
    for feature in ("flux-models", "dit-attention-patches"):
        reason = compat.missing_feature_message(feature, WHO)
        if reason:
            return reason
    return None


@pytest.fixture(scope="module", params=FAMILIES)
def flow(request):
    reason = missing()
    if reason:
        pytest.skip(reason)
    import node_helpers
    family = request.param
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
    latent = {"samples": torch.randn(1, 16, PX // 8, PX // 8, generator=torch.Generator().manual_seed(5))}
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


def record_block_inputs(dm):
    """Forward hooks (torch's, not ComfyUI's patches) on the first double and single block: the qkv projections'
    outputs, pe and the text length of every call."""
    calls = {"double": [], "single": []}
    handles = []
    for kind, block, linears in (("double", dm.double_blocks[0], ("img_attn.qkv", "txt_attn.qkv")),
                                 ("single", dm.single_blocks[0], ("linear1",))):
        def pre(_m, args, kwargs, kind=kind):
            calls[kind].append({"pe": kwargs["pe"].clone(),
                                "txt": kwargs["txt"].shape[1] if "txt" in kwargs else None,
                                "img_slice": kwargs["transformer_options"].get("img_slice")})
        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        for name in linears:
            def post(_m, _inp, out, kind=kind, name=name):
                calls[kind][-1][name] = out.detach().clone()
            handles.append(block.get_submodule(name).register_forward_hook(post))
    return calls, handles


def oracle_maps(dm, kind, call, text_only=False, rope=True):
    """(B, T, N_img) image-to-text probabilities of the joint attention, mean over heads, from the block's weights."""
    if kind == "double":
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
    for position, kind in enumerate(("double", "single")):
        call = calls[kind][0]                          # step 0 (cfg 1: one call per step)
        want = oracle_maps(dm, kind, call)[0]          # (T, N_img)
        got = maps.steps[0].maps[("cross", f"L{position}", 0)][0].float().flatten(1)
        assert got.shape == want.shape
        err = float((got - want).abs().max())
        bound = float((REL_TOL * want.abs() + ABS_TOL).min())
        assert torch.all((got - want).abs() <= REL_TOL * want.abs() + ABS_TOL), (kind, err)
        text_only = float((oracle_maps(dm, kind, call, text_only=True)[0] - got).abs().max())
        no_rope = float((oracle_maps(dm, kind, call, rope=False)[0] - got).abs().max())
        share = float(want.sum(0).mean())
        measured(f"{flow['family']} {kind} block: |captured - by hand| {err:.2e} (max prob {float(want.max()):.3e}); "
                 f"controls: text-only softmax {text_only:.2e}, no RoPE {no_rope:.2e}; mean text share of an image "
                 f"query {share:.3f}")
        assert text_only > 100 * err + 1e-4 and no_rope > 10 * err + 1e-6, (text_only, no_rope, err, bound)
