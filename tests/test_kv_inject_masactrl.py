"""KV Inject as MasaCtrl does it, on SD1.5, SD2-v and SDXL layouts: each CFG half gets the source's K/V of its own
half (checked against an independent forward of the source chain latent), identity reconstructions in both modes,
and mask-auto: the target's mask follows the target's own cross-attention (forced by a test editor to a moved
object), foreground queries attend only to the source's foreground keys."""
import pytest
import torch
import torch.nn.functional as F

import comfy.sample
import comfy.samplers

from inversion_chain.attention.core import patching
from inversion_chain.attention.store import reference as reference_store
from inversion_chain.attention.core.controller import Editor, attention_probs
from inversion_chain.attention.core.layers import MAP_SIZE_LEVELS, decoder_start
from inversion_chain.nodes.invert import ICDDIMInvert
from inversion_chain.nodes.kv_inject import ICKVInject
from tests.harness.sampling import sample
from tests.harness.measure import measured

STEPS = 4
CFG = 3.0
SOURCE = "a photo of an astronaut"
TARGET = "a watercolor painting of an astronaut"   # the word at another token position than in SOURCE
WORD_AT = {"source": 5, "target": 6}              # after the start token: a photo of an astronaut



def one_call(model, x, sigma, cond, latent):
    """One UNet call of ``x`` (sampler space) at ``sigma`` with ``cond`` alone (cfg 1), through ComfyUI's path."""
    def fn(model_k, x_in, sigmas, extra_args=None, callback=None, disable=None):
        model_k(x.to(x_in), x_in.new_ones([1]) * sigma, **(extra_args or {}))
        return x_in
    comfy.sample.sample_custom(model, torch.zeros_like(latent), 1.0, comfy.samplers.KSAMPLER(fn),
                               torch.tensor([sigma, 0.0]), cond, cond, latent, seed=0)


class Probe(Editor):
    """Observer: what the attention at some layers receives after the editors before it (K, V, masks, bias)."""
    order = 90

    def __init__(self, kind, layer_ids, on_qkv=None, needs_probs=None):
        self.kinds, self.ids, self.on_qkv, self._probs, self.seen = (kind,), set(layer_ids), on_qkv, needs_probs, []

    def layers(self, all_layers):
        return [l for l in all_layers if l.index in self.ids]

    def active(self, ctx):
        return ctx.kind == self.kinds[0] and ctx.layer.index in self.ids

    def edit_qkv(self, q, k, v, ctx):
        if self.on_qkv is not None:
            self.seen.append(self.on_qkv(q, k, v, ctx))
        return q, k, v

    def needs_probs(self, ctx):
        return self._probs is not None

    def edit_probs(self, probs, ctx):
        self.seen.append(self._probs(probs, ctx))
        return probs


@pytest.fixture(scope="module")
def s(family, family_model, family_encode, family_latent):
    model, clip, _ = family_model
    with torch.inference_mode():
        src, tgt, empty = (family_encode(clip, t) for t in (SOURCE, TARGET, ""))
        noise, sigmas, inv = ICDDIMInvert().invert(model, family_latent, src, STEPS, 1.0, 6)
    layers = patching.layers_of(model)
    return dict(family=family, model=model, clip=clip, src=src, tgt=tgt, empty=empty, noise=noise["samples"],
                sigmas=sigmas, inv=inv, source=family_latent["samples"], latent=family_latent["samples"],
                layers=layers, start=decoder_start(layers))


def err(a, b):
    return float((a - b).abs().max())


def test_identity_reconstructs_the_source_in_both_modes(s):
    """Target = source prompt from the inversion noise; the negative is the source prompt too, so CFG at 3 is the
    conditional prediction (both halves read the same source K/V) and the source must come back."""
    mutual = ICKVInject().patch(s["model"], s["inv"], 0.0, 0, "mutual", negative=s["src"])[0]
    masked = ICKVInject().patch(s["model"], s["inv"], 0.0, s["start"], "masked", negative=s["src"],
                                mask_words="astronaut", clip=s["clip"], source_prompt=SOURCE,
                                target_prompt=SOURCE)[0]
    probe = Probe("self", [s["start"]], lambda q, k, v, ctx: ctx.scratch.get("kv_masks"))
    masked = patching.install(masked, probe)
    errs = {"mutual": err(sample(mutual, s["src"], s["src"], s["noise"], s["sigmas"], CFG), s["source"]),
            "masked": err(out_masked := sample(masked, s["src"], s["src"], s["noise"], s["sigmas"], CFG), s["source"])}
    masks = probe.seen
    moved = sample(s["model"], s["tgt"], s["src"], s["noise"], s["sigmas"], CFG)   # scale: an unrelated edit
    means = {k: float((v - s["source"]).abs().mean()) for k, v in (("masked", out_masked), ("target prompt", moved))}
    differ = [float((m["target"][0] != m["source"]).float().mean()) for m in masks]
    measured(f"{s['family']}: identity max |x0 - source|: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
             + f"; mean: {means}; target vs source mask: {max(differ):.3f} of the pixels differ (over {len(masks)} "
             f"calls)")
    assert errs["mutual"] < 1e-3   # the DDIM round trip's bound
    # the target is the source: its own maps give the source's mask (the masked attention itself still changes
    # the result a little: each query sees only its region's keys, where the source saw all)
    assert masks and all(m is not None for m in masks) and max(differ) == 0.0
    assert means["masked"] < 0.25 * means["target prompt"]


def test_each_cfg_half_gets_the_source_kv_of_its_own_half(s):
    """Oracle: the K/V a plain forward of the source's chain latent produces with the source prompt (conditional
    half) and with the negative prompt alone (unconditional half); cached and recomputed reference alike."""
    layer, oracle = s["start"], {}
    for step in range(1, STEPS):
        for branch, cond in ((0, s["src"]), (1, s["empty"])):
            o = Probe("self", [layer], lambda q, k, v, ctx: (k.clone(), v.clone()))
            one_call(patching.install(s["model"], o), s["inv"].chain[step], float(s["sigmas"][step]),
                     cond, s["latent"])
            oracle[step, branch] = o.seen[0]
    gap = min(err(oracle[i, 0][0], oracle[i, 1][0]) / float(oracle[i, 0][0].abs().max()) for i in range(1, STEPS))
    for cache in ("cpu", "recompute"):
        reference_store.STORE.clear()
        kv = ICKVInject().patch(s["model"], s["inv"], 1 / STEPS, layer, "mutual", negative=s["empty"],
                                cache=cache)[0]
        probe = Probe("self", [layer], lambda q, k, v, ctx: (ctx.step.index, list(ctx.cond_or_uncond), k.clone(),
                                                             v.clone()))
        sample(patching.install(kv, probe), s["tgt"], s["empty"], s["noise"], s["sigmas"], CFG)
        seen = [x for x in probe.seen if x[0] >= 1]   # injecting from step 1 of 4
        worst = 0.0
        for step, order, k, v in seen:
            got = dict(zip(order, zip(k.chunk(len(order)), v.chunk(len(order)))))
            for branch in (0, 1):
                for got_t, want in zip(got[branch], oracle[step, branch]):
                    worst = max(worst, err(got_t, want.expand_as(got_t)) / float(want.abs().max()))
        measured(f"{s['family']} ({cache}): each half vs its oracle: max relative error {worst:.2e} over {len(seen)} "
                 f"calls; cond vs uncond source K differ by {gap:.2e}")
        assert len(seen) == STEPS - 1 and all(sorted(o) == [0, 1] for _, o, _, _ in seen)
        assert worst < 2e-3 < 10 * 2e-3 < gap   # fp16 storage, and the two halves' K/V really differ


class ForceWordMap(Editor):
    """Test editor: the target's (conditional half's) cross-attention of one token, at the mask resolution, forced
    to a chosen region: the object 'moved' there."""
    order = 50
    kinds = ("cross",)

    def __init__(self, level, token, region):
        self.level, self.token, self.region = level, token, region.float()

    def layers(self, all_layers):
        return [l for l in all_layers if l.level == self.level]

    def active(self, ctx):
        return ctx.kind == "cross" and ctx.layer.level == self.level and 0 in ctx.cond_or_uncond

    def needs_probs(self, ctx):
        return True

    def edit_probs(self, probs, ctx):
        probs = probs.clone()
        rows = ctx.chunk_rows(0)
        probs[rows, :, :, self.token] = self.region.flatten().to(probs)
        return probs


class BiasProbe(Editor):
    """Observer at self-attention layers: q, k, the masks KV Inject used and the attention bias it left."""
    order = 90
    kinds = ("self",)

    def __init__(self, layer_ids):
        self.ids, self.seen = set(layer_ids), []

    def layers(self, all_layers):
        return [l for l in all_layers if l.index in self.ids]

    def active(self, ctx):
        return ctx.kind == "self" and ctx.layer.index in self.ids

    def edit_qkv(self, q, k, v, ctx):
        ctx.scratch["probe_qk"] = (q.clone(), k.clone())
        return q, k, v

    def edit_out(self, out, ctx):
        q, k = ctx.scratch["probe_qk"]
        self.seen.append((ctx.step.index, tuple(ctx.grid), ctx.heads, q, k, ctx.scratch.get("kv_masks"),
                          ctx.scratch.get("attention_bias")))
        return out


def grid_mask(region, grid):
    return F.interpolate(region.float()[None, None], size=grid, mode="nearest")[0, 0].flatten().bool()


@pytest.mark.parametrize("map_size", ["auto", "latent/2"])
def test_masked_target_mask_follows_the_targets_own_map_and_regions_stay_apart(s, map_size):
    """At `mask_map_size` auto (latent/4, or the coarsest level below it: MasaCtrl's 16x16 maps at 512 px) and at
    latent/2, which every SD layout has: the masks come from that level's maps (the oracle reads them itself)."""
    reference_store.STORE.clear()
    level = min(2, max(l.level for l in s["layers"])) if map_size == "auto" else 1
    h, w = s["latent"].shape[-2:]
    gh, gw = (h + 2 ** level - 1) // 2 ** level, (w + 2 ** level - 1) // 2 ** level
    # independent oracle of the source's mask at step 1: its word map at the mask level (mean over heads and layers)
    step = 1
    o = Probe("cross", [l.index for l in s["layers"] if l.level == level], None,
              lambda probs, ctx: probs[0, :, :, WORD_AT["source"]].float().mean(0))
    one_call(patching.install(s["model"], o), s["inv"].chain[step], float(s["sigmas"][step]), s["src"],
             s["latent"])
    m = torch.stack(o.seen).mean(0).reshape(gh, gw)
    source_region = (m - m.min()) / (m.max() - m.min()) >= 0.1
    # the object "moves" to the half of the picture where the source has less of it
    left = torch.zeros(gh, gw, dtype=torch.bool)
    left[:, :gw // 2] = True
    moved = left if source_region[left].sum() <= source_region[~left].sum() else ~left

    kv = ICKVInject().patch(s["model"], s["inv"], step / STEPS, s["start"], "masked", negative=s["empty"],
                            mask_words="astronaut", clip=s["clip"], source_prompt=SOURCE, target_prompt=TARGET,
                            mask_map_size=map_size)[0]
    kv = patching.install(kv, ForceWordMap(level, WORD_AT["target"], moved))
    probe = BiasProbe([l.index for l in s["layers"] if l.index >= s["start"]])
    kv = patching.install(kv, probe)
    out = sample(kv, s["tgt"], s["empty"], s["noise"], s["sigmas"], CFG)
    assert torch.isfinite(out).all()
    checked, worst_leak, src_disagree = 0, 0.0, 0.0
    for i, grid, heads, q, k, masks, bias in probe.seen:
        if i < step:   # before start_percent: no injection
            assert masks is None and bias is None
            continue
        assert masks is not None, "no target map before the injected layers of this step"
        target_want, source_want = grid_mask(moved, grid), grid_mask(source_region, grid)
        assert all(torch.equal(t.cpu(), target_want) for t in masks["target"])   # every row: the forced map
        assert not torch.equal(target_want, source_want)                         # ... which is not the source's
        if i == step:   # the source's mask against the oracle's (computed at step 1)
            src_disagree = max(src_disagree, float((masks["source"].cpu() != source_want).float().mean()))
        # the attention the editor computed (its bias, seen by observers): no mass across regions
        allowed = target_want[:, None] == masks["source"].cpu()[None, :]
        bias = bias.rows(torch.arange(q.shape[1], device=q.device))   # made per query rows: every row here
        assert bias.shape[0] == q.shape[0] and torch.equal(torch.isfinite(bias[:, 0]).cpu(),
                                                            allowed[None].expand(q.shape[0], -1, -1))
        probs = attention_probs(q, k, heads, bias)
        across = probs.masked_select(~allowed[None, None].expand_as(probs))
        worst_leak = max(worst_leak, float(across.abs().max()) if across.numel() else 0.0)
        checked += 1
    measured(f"{s['family']} {map_size}: {checked} masked calls; source fg "
             f"{int(source_region.sum())}/{source_region.numel()} "
             f"cells, forced target fg {int(moved.sum())}; source mask vs oracle: {src_disagree:.3f} of cells differ; "
             f"attention mass across regions {worst_leak:.1e}")
    assert checked >= (STEPS - step) and src_disagree == 0.0 and worst_leak == 0.0


@pytest.mark.fast
def test_mask_map_size_the_model_lacks_is_refused_naming_the_sizes_it_has(s):
    """SDXL has no cross-attention at latent/1 or latent/8 (SD1.x/SD2.x have all four sizes)."""
    from inversion_chain.artifacts import InversionChainError
    have = {l.level for l in s["layers"]}
    assert have == ({1, 2} if s["family"] == "sdxl" else {0, 1, 2, 3}), have
    for size, level in MAP_SIZE_LEVELS.items():
        if level in have:
            continue
        with pytest.raises(InversionChainError, match=rf"`mask_map_size` is '{size}', but this model has no "
                                                      rf"cross-attention layers at that size\. It has maps at "
                                                      rf"latent/2, latent/4 .*auto \(here latent/4\)"):
            ICKVInject().patch(s["model"], s["inv"], 0.25, s["start"], "masked", negative=s["empty"],
                               mask_words="astronaut", clip=s["clip"], source_prompt=SOURCE, target_prompt=TARGET,
                               mask_map_size=size)


@pytest.mark.fast
def test_masked_attention_in_query_chunks_equals_the_single_call():
    """Masked mode computes its attention explicitly (float32 scores + the region bias); it runs over chunks of
    queries so that SD1.5 at 512 px (2 x 8 heads x 4096 x 4096 scores, 1 GiB) holds at most SCORE_CHUNK_BYTES."""
    from inversion_chain.attention.core.controller import apply_probs, attention_probs, explicit_attention
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 96, 64, generator=gen) for _ in range(3))
    region = torch.rand(2, 1, 96, 96, generator=gen) < 0.3
    bias = torch.zeros(region.shape).masked_fill_(region, float("-inf"))
    bias[..., 0] = 0.0   # every query keeps one key
    whole = apply_probs(attention_probs(q, k, 4, bias), v, 4)
    for max_bytes in (1, 2 * 4 * 96 * 4 * 2 * 7, 2 ** 30):   # one query at a time, 7 at a time, all at once
        assert torch.allclose(explicit_attention(q, k, v, 4, bias, max_bytes), whole, atol=1e-6)
    assert torch.allclose(explicit_attention(q, k, v, 4, None, 1), apply_probs(attention_probs(q, k, 4), v, 4),
                          atol=1e-6)


def test_a_sampler_negative_other_than_kv_injects_is_reported_once(s, family_encode, caplog):
    """MasaCtrl pairs the halves with one negative prompt: a sampler negative that differs from the one the source's
    unconditional K/V were recorded with gets a warning (once per patched model), the same one does not."""
    blurry = family_encode(s["clip"], "blurry, low quality")
    for negative, warned in ((s["empty"], False), (blurry, True)):
        patched = ICKVInject().patch(s["model"], s["inv"], 0.25, 0, "mutual", negative=s["empty"], cache="cpu")[0]
        caplog.clear()
        with caplog.at_level("WARNING", logger="inversion_chain"), torch.inference_mode():
            sample(patched, s["src"], negative, s["noise"], s["sigmas"], 3.0)
        assert caplog.text.count("not the `negative` connected") == int(warned), caplog.text
