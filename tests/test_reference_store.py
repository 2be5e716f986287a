"""The one reference K/V store shared by KV Inject and RIVAL: exact byte accounting, budget and LRU eviction."""
import pytest
import torch

from inversion_chain.attention.core import patching
from inversion_chain.attention.store import reference
from inversion_chain.attention.editors.rival import RivalAttentionEditor
from inversion_chain.attention.core.schedule import Schedule
from inversion_chain.conditioning import first_row
from inversion_chain.model_info import unet_of
from inversion_chain.nodes.invert import ICDDIMInvert
from inversion_chain.nodes.kv_inject import ICKVInject
from inversion_chain.samplers import rival
from tests.harness.measure import measured

STEPS = 4


@pytest.fixture(scope="module")
def inverted(family, family_model, family_encode, family_latent):
    model, clip, _ = family_model
    with torch.inference_mode():
        src = family_encode(clip, "a cat sitting on a wooden table")
        inv = ICDDIMInvert().invert(model, family_latent, src, STEPS, 1.0, 1)[2]
    return model, clip, src, inv


@pytest.mark.fast
def test_estimate_equals_stored_bytes_for_both_users(store, inverted, family, family_encode):
    model, clip, src, inv = inverted
    ICKVInject().patch(model, inv, 0.25, 0, "masked", mask_words="cat", clip=clip,
                       source_prompt="a cat sitting on a wooden table", target_prompt="a dog sitting on a wooden "
                       "table", target_words="dog", cache="cpu")
    ref_kv = rival.cached_reference(model, inv, family_encode(clip, ""), "cpu")
    entries = list(store.entries.values())
    assert len(entries) == 2 and ref_kv is entries[1]
    for entry in entries:
        assert entry.nbytes() == entry.estimate_bytes() > 0
    # RIVAL keeps both CFG branches of every layer and step; KV Inject one branch, its layers, steps >= start
    kv, rv = entries
    assert rv.branches == 2 and len(rv.steps) == STEPS and kv.branches == 1 and kv.steps == list(range(1, STEPS))
    assert len({key for key in rv.store if key[2] == 1}) == len(rv.layers) * STEPS
    measured(f"{family}: KV Inject entry {kv.nbytes()} B, RIVAL entry {rv.nbytes()} B")


def test_ten_negative_prompts_stay_within_the_budget(store, inverted, family_encode):
    model, clip, src, inv = inverted
    first = rival.cached_reference(model, inv, family_encode(clip, "blurry 0"), "cpu")
    one = first.nbytes()
    store.max_bytes = int(2.5 * one)
    for i in range(10):
        got = rival.cached_reference(model, inv, family_encode(clip, f"blurry {i}"), "cpu")
        assert got is not None and got.nbytes() == got.estimate_bytes() == one
        assert store.held_bytes() <= store.max_bytes
    assert len(store.entries) == 2   # the two most recent; older ones evicted least recently used first
    # the most recent is found again without a new fill
    assert rival.cached_reference(model, inv, family_encode(clip, "blurry 9"), "cpu") is got


def test_over_budget_falls_back_to_recompute_and_says_how_much(store, inverted, family_encode, caplog):
    model, clip, src, inv = inverted
    store.max_bytes = 1000
    with caplog.at_level("WARNING", logger="inversion_chain"):
        assert rival.cached_reference(model, inv, family_encode(clip, ""), "auto") is None
    assert not store.entries
    assert "would need" in caplog.text and "MB" in caplog.text and "budget" in caplog.text


def test_kv_inject_reuses_the_store_entry_across_nodes(store, inverted):
    model, clip, src, inv = inverted
    ICKVInject().patch(model, inv, 0.25, 0, "mutual")
    entry = next(iter(store.entries.values()))
    ICKVInject().patch(model, inv, 0.25, 0, "mutual")
    assert len(store.entries) == 1 and next(iter(store.entries.values())) is entry


def _filled(model, inv, negative, keep, dtype):
    """A ReferenceKV of both CFG branches, every layer and step, filled as RIVAL fills its cache."""
    layers = patching.layers_of(model)
    ref = reference.ReferenceKV(inv, layers, range(STEPS), storage_dtype=dtype, branches=2, keep=keep)
    recorder = patching.install(model, RivalAttentionEditor(1.0, Schedule(inv.sigmas, inv.scheduler), ref))
    with torch.inference_mode():
        ref.fill(recorder, torch.zeros(inv.latent_shape), negative=first_row(negative))
    return ref


def test_stored_inputs_project_to_the_recorded_keys_and_values(store, inverted, family, family_encode):
    """keep="inputs" (the attention's input hidden states, projected with the layer's own to_k / to_v on use) gives
    the K and V that keep="kv" recorded: to float32 rounding with float32 storage, and to the same order of error
    as storing K and V themselves in float16."""
    model, clip, src, inv = inverted
    negative = family_encode(clip, "blurry")
    refs = {(keep, str(dtype)): _filled(model, inv, negative, keep, dtype)
            for keep in ("kv", "inputs") for dtype in (torch.float32, torch.float16)}
    exact = refs[("kv", "torch.float32")]
    layers = {l.index: l for l in exact.layers}
    worst = {name: 0.0 for name in refs}
    with torch.inference_mode():
        for step, index, branch in exact.store:
            truth = exact.get(step, layers[index], "cpu", torch.float32, branch)
            scale = max(float(t.abs().max()) for t in truth)
            for name, ref in refs.items():
                got = ref.get(step, layers[index], "cpu", torch.float32, branch)
                err = max(float((g - t).abs().max()) for g, t in zip(got, truth)) / scale
                worst[name] = max(worst[name], err)
    measured(f"{family}: worst relative K/V error vs float32 K/V storage: {worst}")
    assert worst[("inputs", "torch.float32")] < 1e-5
    assert 0 < worst[("kv", "torch.float16")] < 2e-3
    assert worst[("inputs", "torch.float16")] < 4 * worst[("kv", "torch.float16")]
    # half the attention bytes; the eps per step is the same in both; the estimate is what is held
    eps = sum(t.numel() * 4 for t in exact.eps.values())
    for dtype in ("torch.float32", "torch.float16"):
        kv, inputs = refs[("kv", dtype)], refs[("inputs", dtype)]
        assert kv.nbytes() == kv.estimate_bytes() and inputs.nbytes() == inputs.estimate_bytes()
        assert kv.nbytes() - eps == 2 * (inputs.nbytes() - eps) > 0


@pytest.mark.fast
def test_real_layouts_bytes_from_layer_shapes():
    """scripts/reference_bytes.py on the real SD1.5 / SDXL UNets (ComfyUI's classes on the meta device) against the
    layouts written out by hand: SD1.5 512 px has 16 layers (5 at 64x64 x 320 ch, 5 at 32x32 x 640, 5 at 16x16 x 1280,
    the middle at 8x8 x 1280); SDXL 1024 px 70 (10 at 64x64 x 640, 60 at 32x32 x 1280)."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "reference_bytes", Path(__file__).resolve().parents[1] / "scripts" / "reference_bytes.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    by_hand = {"sd15": (5 * 4096 * 320 + 5 * 1024 * 640 + 5 * 256 * 1280 + 64 * 1280, 16, 10),
               "sdxl": (10 * 4096 * 640 + 60 * 1024 * 1280, 70, 34)}
    for family, (values, layers, start) in by_hand.items():
        inputs, kv = script.reference_bytes(family, "inputs"), script.reference_bytes(family, "kv")
        assert inputs["layers"] == layers and inputs["kv_inject_default"]["start_layer"] == start
        assert inputs["per_step_per_branch_all_layers"] == 2 * values       # fp16, one tensor per token
        assert kv["per_step_per_branch_all_layers"] == 2 * 2 * values
        eps = 50 * 4 * 4 * (inputs["image_px"] // 8) ** 2
        assert inputs["rival"]["bytes"] == 50 * 2 * 2 * values + eps


def test_partial_cache_holds_the_first_steps_that_fit_and_recomputes_the_rest(store, inverted, family,
                                                                                family_encode):
    """When every step's reference would not fit the budget but some would (SDXL at 1024 px on a 24 GB GPU:
    19.5 GiB for 50 steps against ~7.5 GiB), RIVAL caches the first steps that fit and recomputes the others next
    to their sampling calls: same result as the full cache, bytes within the budget, one reference forward per
    recomputed step and CFG branch."""
    from inversion_chain.nodes.rival import ICRIVALAlignSampler
    model, clip, src, inv = inverted
    empty = family_encode(clip, "")

    def variations():
        # K/V replaced in steps 0-1, concatenated in 2-3; eps normalisation in every step, so the recomputed steps'
        # reference eps is used too
        return ICRIVALAlignSampler().sample(model, src, empty, inv, 3, 2, 5.0, 0.5, 1.0, "permute", "eps",
                                            "cache")[0]["samples"]

    full_entry = rival.cached_reference(model, inv, empty, "cpu")
    per_step = full_entry.nbytes() // STEPS
    full = variations()
    store.clear()
    store.max_bytes = int(2.5 * per_step)    # two of the four steps fit
    rows = []   # batch rows of every UNet forward
    hook = unet_of(model).register_forward_hook(lambda module, args, out: rows.append(int(out.shape[0])))
    try:
        with torch.inference_mode():
            partial = variations()
    finally:
        hook.remove()
    (entry,) = store.entries.values()
    assert entry.steps == [0, 1] and entry.nbytes() == entry.estimate_bytes() <= store.max_bytes
    # the fill: steps 0 and 1, both CFG branches of the reference; sampling: 2 variations x 2 branches per step,
    # each of steps 2 and 3 preceded by one reference forward of both branches (2 rows); capturing the recompute
    # forwards' conditioning runs no UNet forward
    assert sum(rows) == 2 * 2 + STEPS * 4 + 2 * 2, rows
    assert rows[-4:] == [2, 4, 2, 4], rows
    diff = float((partial - full).abs().max())
    measured(f"{family}: RIVAL partial cache (2 of {STEPS} steps, {entry.nbytes()} B) vs full cache: {diff:.2e}")
    assert diff < 1e-3
    # a second run finds the partial entry: no refill
    with torch.inference_mode():
        again = variations()
    assert list(store.entries.values()) == [entry] and torch.equal(again, partial)
    # the sampling calls and the reference forwards only
    rows.clear()
    hook = unet_of(model).register_forward_hook(lambda module, args, out: rows.append(int(out.shape[0])))
    try:
        with torch.inference_mode():
            variations()
    finally:
        hook.remove()
    assert sum(rows) == STEPS * 4 + 2 * 2, rows


def test_kv_inject_partial_cache_equals_the_full_cache(store, inverted, family, family_encode):
    """KV Inject with a negative prompt at cfg > 1 (SDXL 1024 px: 9.5 GiB for both branches against a ~7.5 GiB
    budget) caches the first steps that fit and recomputes the rest: same result as the full cache, masked mode
    included (its source word maps come from whichever holds the step)."""
    import comfy.sample
    import comfy.samplers
    model, clip, src, inv = inverted
    empty, target = family_encode(clip, ""), family_encode(clip, "a dog sitting on a wooden table")
    noise = inv.chain[0][:1]

    def run(mode):
        kwargs = dict(mask_words="cat", clip=clip, source_prompt="a cat sitting on a wooden table",
                      target_prompt="a dog sitting on a wooden table", target_words="dog") if mode == "masked" else {}
        patched = ICKVInject().patch(model, inv, 0.25, 0, mode, negative=empty, cache="cpu", **kwargs)[0]
        with torch.inference_mode():
            return comfy.sample.sample_custom(patched, torch.zeros_like(noise), 3.0,
                                              comfy.samplers.sampler_object("ddim"), inv.sigmas, target, empty,
                                              noise, seed=0)

    for mode in ("mutual", "masked"):
        store.clear()
        store.max_bytes = None
        full = run(mode)
        (full_entry,) = store.entries.values()
        assert full_entry.steps == [1, 2, 3]
        store.clear()
        store.max_bytes = int(full_entry.nbytes() / 3 * 2.5)   # two of the three injected steps fit
        partial = run(mode)
        (entry,) = store.entries.values()
        assert entry.steps == [1, 2] and entry.nbytes() == entry.estimate_bytes() <= store.max_bytes
        diff = float((partial - full).abs().max())
        measured(f"{family}: KV Inject {mode}, partial cache (2 of 3 steps) vs full cache: {diff:.2e}")
        assert diff < 1e-3


def test_an_inputs_cache_whose_model_is_gone_is_dropped_before_a_new_entry(store, inverted, family_encode):
    """An inputs cache needs its model's to_k / to_v to serve; once those modules are gone it can only be refilled,
    so the store drops it when the next entry comes in (it held its bytes until ComfyUI next freed memory)."""
    import weakref
    model, clip, src, inv = inverted
    negative = family_encode(clip, "blurry")
    alive = _filled(model, inv, negative, "kv", torch.float16)
    orphan = _filled(model, inv, negative, "inputs", torch.float16)
    store.put(("kv", "alive"), alive)
    store.put(("inputs", "orphan"), orphan)
    assert orphan.usable() and len(store.entries) == 2
    gone = torch.nn.Linear(1, 1)
    orphan._attn = {index: weakref.ref(gone) for index in orphan._attn}   # the model's modules, collected
    del gone
    assert not orphan.usable() and alive.usable()
    store.put(("kv", "newer"), _filled(model, inv, negative, "kv", torch.float16))
    assert set(store.entries) == {("kv", "alive"), ("kv", "newer")}
