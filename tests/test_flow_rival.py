"""RIVAL Align Sampler on DiTs with joint attention (Flux dev-style, Chroma, Qwen-Image): cross-image attention in every
block through ComfyUI's attn1_patch (on Qwen-Image the kernel's mask through an optimized_attention_override), the
variations' velocity (or latents) normalised to the photo's; SD3.5's MMDiT calls the patch through the pack's
bridge (attention/core/mmdit_bridge.py).

The models are tests/harness/flow_models.py's random-weight layouts (Flux/Chroma: one double and one single block;
Qwen-Image and SD3.5, from flow_models_more.py: joint blocks only) loaded through the stock loaders: the claims here
are about exactness and plumbing (cache == batch, disabled == stock, the photo's row untouched, one block's attention
against a hand computation), not about what RIVAL does to images (random weights cannot show that variations keep
the photo's palette). On trees without a family or without the DiT attention patch every test skips and names the
missing feature."""
import pytest
import torch

from inversion_chain import compat
from inversion_chain.artifacts import InversionChainError
from inversion_chain.nodes.invert import ICDDIMInvert
from inversion_chain.nodes.inverted_noise import ICInvertedNoise
from inversion_chain.nodes.rival import ICRIVALAlignSampler
from inversion_chain.pipelines import rival as pipeline
from tests.harness import flow_models, photos
from tests.harness.measure import measured

SOURCE = "a photo of an astronaut"
GUIDANCE = 3.5
STEPS = 6
PX = 128
FAMILIES = ("flux", "chroma", "qwen_image", "sd3")
WHO = "RIVAL on Flux, Chroma, Qwen-Image and SD3.5"
# as many tokens as SOURCE on Chroma (T5), Qwen-Image (its Qwen2.5-VL tokenizer) and SD3.5 (CLIP padded to 77, then
# T5); Flux pads T5 to 256 anyway
NEGATIVE = "a photo of an animal"
# guidance-distilled Flux samples at cfg 1; Chroma, Qwen-Image and SD3.5 run true CFG (both halves)
CFG = {"flux": 1.0, "chroma": 2.0, "qwen_image": 2.0, "sd3": 2.0}


def missing(family: str = "flux") -> str | None:
    features = {"qwen_image": ("qwen-image-models", "attention-override"),
                "sd3": ("sd3-models", "attention-override")}.get(family, ())
    features = ("flux-models", "dit-attention-patches") + features
    return flow_models.missing_feature(WHO, *features) or flow_models.missing_family(family)


@pytest.fixture(scope="module", params=FAMILIES)
def flow(request):
    reason = missing(request.param)
    if reason:
        pytest.skip(reason)
    return setup_family(request.param)


def setup_family(family):
    import node_helpers
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
        positive = encode(SOURCE)
        negative = encode(NEGATIVE)
        # the batch layout stacks rows of one token count
        assert negative[0][0].shape == positive[0][0].shape
        noise, sigmas, inv = ICDDIMInvert().invert(model, latent, positive, STEPS, 1.0, 6, scheduler="simple")
    return dict(family=family, model=model, latent=latent, positive=positive, negative=negative, sigmas=sigmas,
                inv=inv, cfg=CFG[family], encode=encode)


def rival(f, reference_kv="cache", seed=0, batch_size=2, replace_end=0.34, normalize_end=0.34, init="permute",
          normalize="eps", cfg=None, model=None, steps=None):
    with torch.inference_mode():
        if steps is None and model is None:
            out = ICRIVALAlignSampler().sample(f["model"], f["positive"], f["negative"], f["inv"], seed, batch_size,
                                               f["cfg"] if cfg is None else cfg, replace_end, normalize_end, init,
                                               normalize, reference_kv)
            return out[0]["samples"], out[1]["samples"]
        return pipeline.rival_dit(model or f["model"], f["positive"], f["negative"], f["inv"], seed, batch_size,
                                  f["cfg"] if cfg is None else cfg, replace_end, normalize_end, init, normalize, False,
                                  reference_kv, steps=steps)


def stock(f, rows=1, cfg=None):
    """The stock graph from the inversion's noise: Inverted Noise -> SamplerCustomAdvanced (CFGGuider, euler, DDIM
    Invert's sigmas); with ``rows`` > 1 the same latent that many times in one batch, row 0 returned."""
    import comfy_extras.nodes_custom_sampler as ncs
    model = f["model"]
    with torch.inference_mode():
        inverted = ICInvertedNoise().noise(model, f["inv"])["result"][0]

        class Repeated:   # the inverted noise for every row of a larger batch
            seed = inverted.seed

            def generate_noise(self, latent):
                return rows_of(inverted.generate_noise({**latent, "samples": latent["samples"][:1]}), rows)

        guider = ncs.CFGGuider.execute(model, f["positive"], f["negative"], f["cfg"] if cfg is None else cfg).result[0]
        sampler = ncs.KSamplerSelect.execute("euler").result[0]
        empty = {"samples": rows_of(torch.zeros_like(f["latent"]["samples"]), rows)}
        noise = inverted if rows == 1 else Repeated()
        return ncs.SamplerCustomAdvanced.execute(noise, guider, sampler, f["sigmas"], empty).result[0]["samples"][:1]


def rows_of(latent, rows):
    """``latent`` (4-D, or Qwen-Image's 5-D) repeated ``rows`` times along the batch."""
    return latent.repeat(rows, *([1] * (latent.dim() - 1)))


def error(a, b):
    return float((a.float() - b.float()).abs().max())


def test_cache_equals_batch(flow, store):
    """The photo's K/V and velocity recorded once (cache) or its row sampled in the batch: the same variations. Both
    regimes of attention (replacement for the first 2 of 6 steps, then concatenation) and of normalisation occur;
    Chroma runs both CFG halves.

    Not bit for bit: the cache records the photo in a one-row forward, the batch layout runs it in a three-row one,
    and on this CPU the stock model itself is not batch-invariant between one row and more (one-row matrix products
    take another kernel); the yardstick is that stock difference, measured here: the same latent sampled alone, in a
    batch of two (the cache layout's two variations) and of three (the batch layout's photo + two variations), the
    largest of the two gaps (flux 4.1e-6, chroma 1.2e-5; qwen_image 5.7e-6, where one and two rows agree bit for
    bit and three differ). Allowed: 4x it (the masked photo's row of the batch layout adds ~1e-7 per attention
    call, dit_rival.py)."""
    two = stock(flow, rows=2)
    yardstick = max(error(stock(flow, rows=1), two), error(two, stock(flow, rows=3)))
    cached, ref_c = rival(flow, "cache")
    batched, ref_b = rival(flow, "batch")
    err = error(cached, batched)
    measured(f"{flow['family']}: RIVAL cache vs batch, max |diff| {err:.2e}; stock model on one, two, three rows "
             f"(largest gap) {yardstick:.2e} (variation std {float(cached.std()):.2f})")
    assert torch.equal(ref_c, ref_b)
    assert err <= 4 * max(yardstick, 1e-6)
    # the control: another seed is far outside the tolerance
    assert error(rival(flow, "cache", seed=1)[0], cached) > 1e-2


def test_disabled_alignment_is_stock_sampling(flow, store):
    """The attention patch acting at no step, normalisation off, the inversion's own noise: the variation is the
    stock graph's sample (Inverted Noise -> SamplerCustomAdvanced, euler) bit for bit, in both layouts (the batch
    layout's two rows against the stock graph on a two-row batch: see the test above for why rows count)."""
    for layout, rows in (("cache", 1), ("batch", 2)):
        variation, _ = rival(flow, layout, batch_size=1, init="inverted", normalize="off", steps=[])
        plain = stock(flow, rows=rows)
        assert torch.equal(variation, plain), (layout, error(variation, plain))
    # the control: the same run with the patch acting differs
    aligned, _ = rival(flow, "cache", batch_size=1, init="inverted", normalize="off")
    assert error(aligned, plain) > 1e-3


def chain_predictions(f, model, rows):
    """The model's conditional prediction for row 0 at every chain latent, the batch holding ``rows`` copies of it
    (stock sampling path, the inversion's prompt on every row, the sampler's cfg)."""
    inv, got = f["inv"], []

    def observe(args):
        got.append(args["cond_denoised"][:1].clone())
        return args["denoised"]

    m = model.clone()
    m.set_model_sampler_post_cfg_function(observe)

    def run(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        for i in range(inv.steps):
            x_i = rows_of(inv.latent_at(i, x.device, x.dtype), rows)
            model_k(x_i, x_i.new_ones([rows]) * float(inv.sigmas[i]), **(extra_args or {}))
        return x

    pos = [[f["positive"][0][0].repeat(rows, 1, 1), dict(f["positive"][0][1])]]
    neg = [[f["negative"][0][0].repeat(rows, 1, 1), dict(f["negative"][0][1])]]
    for c in (pos, neg):
        if c[0][1].get("pooled_output") is not None:
            c[0][1]["pooled_output"] = c[0][1]["pooled_output"].repeat(rows, 1)
    with torch.inference_mode():
        compat.sample_with_function(m, run, inv.sigmas, pos, neg, f["cfg"],
                                    rows_of(torch.zeros_like(f["latent"]["samples"]), rows))
    return torch.stack(got)


def test_the_photos_row_keeps_its_own_prediction_in_the_batch_layout(flow, store):
    """In the batch layout the photo's row follows its chain and must stay the photo's: its appended keys are masked
    out, so at every chain latent its prediction is the stock model's (same batch size: three rows) up to the masked
    softmax's rounding (measured: flux bit for bit, chroma 4.3e-6 on predictions of std 0.9, qwen_image 1.2e-6 on
    std 0.56; bound 1e-5, while the unmasked control below misses by > 1e-3); the reference it hands back is the
    photo's own latent, as in the cache layout. On Qwen-Image the mask is set in the kernel call
    (DiTRivalKernelMask)."""
    seen = []

    def observe(args):
        seen.append(args["cond_denoised"][:1].clone())
        return args["denoised"]

    observed = flow["model"].clone()
    observed.set_model_sampler_post_cfg_function(observe)
    # concatenation at every step (replace_end 0): the masked regime throughout
    _, reference = rival(flow, "batch", replace_end=0.0, init="inverted", normalize="off", model=observed)
    stock_pred = chain_predictions(flow, flow["model"], rows=3)
    err = error(torch.stack(seen), stock_pred)
    measured(f"{flow['family']}: photo's row in the batch layout vs stock prediction at its chain: max |diff| "
             f"{err:.2e} (prediction std {float(stock_pred.std()):.2f})")
    assert err < 1e-5
    photo = compat.latent_out(flow["model"], flow["inv"].chain[-1][:1].clone())
    assert torch.equal(reference, photo)
    # the control: without the mask (the photo's row attending to its own image keys twice) it is not its own; the
    # mask is built by extended_mask in the patch (Flux, Chroma) or in the kernel call (Qwen-Image): here it closes
    # nothing
    from inversion_chain.attention.editors import dit_rival
    masking = dit_rival.extended_mask

    def without_hidden_rows(attn_mask, rows, length, extra, hidden_rows, dtype, device):
        return masking(attn_mask, rows, length, extra, [], dtype, device)

    seen.clear()
    dit_rival.extended_mask = without_hidden_rows
    try:
        rival(flow, "batch", replace_end=0.0, init="inverted", normalize="off", model=observed)
    finally:
        dit_rival.extended_mask = masking
    assert error(torch.stack(seen), stock_pred) > 1e-3


def hand_rope(x, pe):
    """RoPE by hand: each pair (x[2d], x[2d+1]) of a token times its 2x2 rotation ``pe[token, d]``."""
    pairs = x.double().reshape(*x.shape[:-1], -1, 2)
    return torch.einsum("btdij,bhtdj->bhtdi", pe[:, 0].double(), pairs).reshape(x.shape)


def hand_attention(q, k, v):
    w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return w @ v.double()


@pytest.mark.fast
def test_one_blocks_cross_image_attention_against_a_hand_computation():
    """One joint-attention call through the patch and ComfyUI's Flux attention (RoPE, kernel) against softmax
    attention written out here: per CFG chunk (two chunks of three rows: the photo's row, two variations), the
    variations attend over [own text ; own image ; photo's image] with the photo's image keys rotated for their own
    positions (concatenation), or over [own text ; photo's image] (replacement); the photo's row over its own
    sequence only."""
    reason = missing("flux")
    if reason:
        pytest.skip(reason)
    from comfy.ldm.flux.layers import EmbedND
    from comfy.ldm.flux.math import attention
    from inversion_chain.attention.core.dit_layers import DiTBlock
    from inversion_chain.attention.editors.dit_rival import DiTRival
    torch.manual_seed(0)
    txt, grid, heads, dim, rows, chunks = 5, 4, 2, 32, 3, 2
    n = grid * grid
    ids = torch.zeros(1, txt + n, 3)
    ids[0, txt:, 1] = torch.arange(grid).repeat_interleave(grid).float()
    ids[0, txt:, 2] = torch.arange(grid).repeat(grid).float()
    pe = EmbedND(dim=dim, theta=10000, axes_dim=[4, 14, 14])(ids).expand(rows * chunks, -1, -1, -1, -1, -1)
    q, k, v = (torch.randn(rows * chunks, heads, txt + n, dim) for _ in range(3))
    sigmas = torch.linspace(1.0, 0.0, 7)
    patch = DiTRival(sigmas, [DiTBlock("double", 0, 0, heads, dim)], 0.34, n)
    for step in (0, 4):   # 0/6 < 0.34: replacement; 4/6: concatenation
        options = {"block_type": "double", "block_index": 0, "img_slice": [txt, txt + n], "cond_or_uncond": [1, 0],
                   "sigmas": sigmas[step:step + 1]}
        out = patch(q, k, v, pe=pe, extra_options=options)
        got = attention(q, out["k"], out["v"], pe=out.get("pe", pe), mask=out.get("attn_mask"))
        got = got.view(rows * chunks, txt + n, heads, dim).transpose(1, 2).double()
        rq, rk = hand_rope(q, pe), hand_rope(k, pe)
        for chunk in range(chunks):
            ref = chunk * rows
            img = slice(txt, txt + n)
            for r in range(ref, ref + rows):
                if r == ref:
                    keys, values = rk[r], v[r]
                elif step == 0:
                    keys = torch.cat([rk[r][:, :txt], rk[ref][:, img]], dim=1)
                    values = torch.cat([v[r][:, :txt], v[ref][:, img]], dim=1)
                else:
                    keys = torch.cat([rk[r], rk[ref][:, img]], dim=1)
                    values = torch.cat([v[r], v[ref][:, img]], dim=1)
                expected = hand_attention(rq[r], keys, values)
                assert float((got[r] - expected).abs().max()) < 1e-5, (step, r)
        if step == 4:   # the control: the same call without the appended keys' RoPE rows is another result
            wrong = attention(q, out["k"], out["v"], pe=torch.cat([pe, pe[:, :, :n]], dim=2),
                              mask=out.get("attn_mask"))
            assert float((wrong.view_as(got.float().transpose(1, 2)).transpose(1, 2) - got).abs().max()) > 1e-3


@pytest.mark.fast
def test_qwen_image_cross_image_attention_against_a_hand_computation():
    """One call of ComfyUI's Qwen-Image joint attention (its Attention module, random weights, its 3-axis RoPE over
    [text ; image] ids laid out as the model does) with RIVAL's patch and kernel mask, against softmax attention
    written out here from the q, k, v the patch received: per CFG chunk (the photo's row, two variations) the
    variations attend over [own text ; own image ; photo's image], the photo's keys rotated for their own image
    positions (concatenation), or over [own text ; photo's image] (replacement); the photo's row over its own
    sequence only (Qwen-Image ignores a patch's attn_mask: the kernel-call mask does this)."""
    reason = missing("qwen_image")
    if reason:
        pytest.skip(reason)
    import comfy.ops
    from comfy.ldm.flux.layers import EmbedND
    from comfy.ldm.qwen_image.model import Attention
    from inversion_chain.attention.core.dit_layers import DiTBlock
    from inversion_chain.attention.editors.dit_rival import DiTRival, DiTRivalKernelMask
    torch.manual_seed(0)
    txt, grid, heads, dim, rows, chunks = 5, 4, 2, 32, 3, 2
    n, width = grid * grid, heads * dim
    attention = Attention(width, dim_head=dim, heads=heads, out_dim=width, operations=comfy.ops.disable_weight_init)
    with torch.no_grad():
        for p in attention.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    ids = torch.zeros(1, txt + n, 3)
    ids[0, :txt] = (torch.arange(txt) + grid // 2).float().unsqueeze(1)   # text ids after the image's, as Qwen's
    ids[0, txt:, 1] = (torch.arange(grid) - grid // 2).repeat_interleave(grid).float()
    ids[0, txt:, 2] = (torch.arange(grid) - grid // 2).repeat(grid).float()
    pe = EmbedND(dim=dim, theta=10000, axes_dim=[4, 14, 14])(ids).expand(rows * chunks, -1, -1, -1, -1, -1)
    img, text = torch.randn(rows * chunks, n, width), torch.randn(rows * chunks, txt, width)
    sigmas = torch.linspace(1.0, 0.0, 7)
    seen, kernel = {}, []

    def before(q, k, v, pe=None, attn_mask=None, extra_options=None):
        seen.update(q=q, k=k, v=v)
        return {}

    def outputs(func, *args, **kwargs):
        kernel.append(func(*args, **kwargs))
        return kernel[-1]

    patch = DiTRival(sigmas, [DiTBlock("double", 0, 0, heads, dim)], 0.34, n, mask_in_kernel=True)
    for step in (0, 4):   # 0/6 < 0.34: replacement; 4/6: concatenation
        for masked in (True, False):
            options = {"block_type": "double", "block_index": 0, "cond_or_uncond": [1, 0],
                       "sigmas": sigmas[step:step + 1], "patches": {"attn1_patch": [before, patch]},
                       "optimized_attention_override": DiTRivalKernelMask(True, outputs) if masked else outputs}
            with torch.no_grad():
                attention(hidden_states=img, encoder_hidden_states=text, image_rotary_emb=pe,
                          transformer_options=options)
            got = kernel[-1].view(rows * chunks, txt + n, heads, dim).transpose(1, 2).double()
            q, k, v = seen["q"], seen["k"], seen["v"]
            rq, rk = hand_rope(q, pe), hand_rope(k, pe)
            for chunk in range(chunks):
                ref = chunk * rows
                image = slice(txt, txt + n)
                for r in range(ref, ref + rows):
                    if r == ref:
                        keys, values = rk[r], v[r]
                    elif step == 0:
                        keys = torch.cat([rk[r][:, :txt], rk[ref][:, image]], dim=1)
                        values = torch.cat([v[r][:, :txt], v[ref][:, image]], dim=1)
                    else:
                        keys = torch.cat([rk[r], rk[ref][:, image]], dim=1)
                        values = torch.cat([v[r], v[ref][:, image]], dim=1)
                    diff = float((got[r] - hand_attention(rq[r], keys, values)).abs().max())
                    if masked or step == 0 or r != ref:
                        assert diff < 1e-4, (step, masked, r, diff)
                    else:   # the control: without the kernel mask the photo's row attends to its image twice
                        assert diff > 1e-3, (step, r, diff)
                    if step == 4 and r == ref + 1 and masked:   # the control: the photo's keys unrotated differ
                        unrotated = torch.cat([rk[r], k[ref][:, image].double()], dim=1)
                        assert float((got[r] - hand_attention(rq[r], unrotated, values)).abs().max()) > 1e-3


def test_the_run_leaves_nothing_on_the_model(flow, store):
    model = flow["model"]
    before_options = repr(model.model_options)
    before = stock(flow)
    rival(flow, "cache")
    rival(flow, "batch", batch_size=1)
    assert repr(model.model_options) == before_options
    assert "attn1_patch" not in model.model_options.get("transformer_options", {}).get("patches", {})
    assert torch.equal(stock(flow), before)


def test_inputs_are_checked(flow, store):
    with pytest.raises(InversionChainError, match="input `batch_size` got 0"):
        rival(flow, batch_size=0)
    longer = flow["encode"]("a blurry photo of an astronaut on the moon")
    tokens = flow["positive"][0][0].shape[1]
    if flow["family"] == "sd3":   # CLIP and T5 both padded to 77 tokens: any short prompt stacks with the source's
        assert longer[0][0].shape == flow["positive"][0][0].shape
    elif flow["family"] != "flux":
        with pytest.raises(InversionChainError, match=rf"reference_kv 'batch' runs the photo's row with the "
                                                      rf"inversion's prompt \({tokens} tokens\).*\(\d+ tokens\)"):
            with torch.inference_mode():
                ICRIVALAlignSampler().sample(flow["model"], longer, flow["negative"], flow["inv"], 0, 1, 2.0, 0.4,
                                             0.4, "permute", "eps", "batch")
    else:
        import node_helpers
        other = node_helpers.conditioning_set_values(flow["positive"], {"guidance": 5.0})
        with pytest.raises(InversionChainError, match="Flux guidance 5.0, but the inversion was made with 3.5"):
            with torch.inference_mode():
                ICRIVALAlignSampler().sample(flow["model"], other, flow["negative"], flow["inv"], 0, 1, 1.0, 0.4,
                                             0.4, "permute", "eps", "batch")


@pytest.mark.fast
def test_skip_reason_names_the_missing_feature():
    """On trees without Flux/Chroma (2024-03) these tests skip with a sentence naming the feature and its floor."""
    reason = missing("flux")
    if compat.has_feature("flux-models") and compat.has_feature("dit-attention-patches"):
        assert reason is None
    else:
        assert reason.startswith(WHO + " needs ") and ("0.3.31" in reason or "0.17.0" in reason)
