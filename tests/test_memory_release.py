"""Memory given back (issue 24): the pack's caches let go when ComfyUI frees memory (its unload_all_models, which
the /free endpoint runs, and free_memory, which makes room to load a model), the reference store counts every
byte its entries keep alive (the inversion's chain included, shared tensors once), and a node clears the caches."""
import math
import re

import pytest
import torch

import comfy.model_management

from inversion_chain import compat
from inversion_chain.attention.store import store_memory
from inversion_chain.nodes.invert import ICDDIMInvert, ICFreeCaches
from inversion_chain.nodes.kv_inject import ICKVInject
from inversion_chain.optimize import style_diffusion
from tests.test_small_fixes import style_of

PROMPT = "a photo of an astronaut"


@pytest.fixture(scope="module")
def inverted(small_model, encode, astronaut_latent):
    model, clip, _ = small_model
    with torch.inference_mode():
        src = encode(clip, PROMPT)
        inv = ICDDIMInvert().invert(model, astronaut_latent, src, 3, 1.0, 1)[2]
    return model, clip, src, inv


def fill(model, inv, start=0.25):
    with torch.inference_mode():
        ICKVInject().patch(model, inv, start, 0, "mutual", cache="cpu")


@pytest.mark.fast
def test_unload_all_models_empties_the_pack_memory_caches(store, inverted):
    model, clip, src, inv = inverted
    fill(model, inv)
    style_diffusion._remember(style_of("kept"))
    assert store.entries and style_diffusion._memory
    comfy.model_management.unload_all_models()   # what ComfyUI runs for POST /free (unload_models / free_memory)
    assert not store.entries and not style_diffusion._memory
    assert store.held_bytes() == 0


@pytest.mark.fast
def test_free_memory_hook_keeps_comfyui_behaviour_and_reports(monkeypatch):
    seen = []
    compat.on_memory_release(lambda reason, device, need: seen.append((reason, device, need)))
    try:
        out = comfy.model_management.free_memory(0, torch.device("cpu"))
        assert getattr(comfy.model_management.free_memory, compat.HOOK_MARK)
        assert seen == [("free_memory", torch.device("cpu"), 0)]
        assert out is None or isinstance(out, list)   # ComfyUI's own result passes through
    finally:
        compat._release_callbacks.pop()


@pytest.mark.fast
def test_entries_on_a_device_short_of_memory_move_to_the_cpu_or_go(store, inverted, monkeypatch):
    model, clip, src, inv = inverted
    fill(model, inv)
    entry = next(iter(store.entries.values()))
    gpu = torch.device("meta")   # stands for the GPU: the entry is labelled as stored there
    entry.storage_device = gpu
    monkeypatch.setattr(compat, "free_memory", lambda device: 0)   # ComfyUI is short of memory there
    store_memory.release(store, "free_memory", gpu, 2 ** 30)
    assert list(store.entries.values()) == [entry] and entry.storage_device.type == "cpu"
    entry.storage_device = gpu
    store.max_bytes = 1   # the CPU budget cannot take it: dropped instead
    store_memory.release(store, "free_memory", gpu, 2 ** 30)
    assert not store.entries
    # enough free memory on the device: nothing moves
    store.max_bytes = None
    fill(model, inv)
    entry = next(iter(store.entries.values()))
    entry.storage_device = gpu
    monkeypatch.setattr(compat, "free_memory", lambda device: 2 ** 40)
    store_memory.release(store, "free_memory", gpu, 2 ** 30)
    assert entry.storage_device == gpu


@pytest.mark.fast
def test_store_counts_the_inversion_it_holds_once(store, inverted):
    model, clip, src, inv = inverted
    fill(model, inv, 0.25)
    fill(model, inv, 0.5)   # a second entry on the same inversion
    entries = list(store.entries.values())
    assert len(entries) == 2
    shared = {id(t): t for t in store_memory.tensors_in([inv.chain, inv.sigmas, inv.timesteps, inv.residuals,
                                                         inv.step_calls, inv.positive, inv.negative])}
    shared_bytes = sum(t.numel() * t.element_size() for t in shared.values())
    assert inv.chain.numel() * inv.chain.element_size() <= shared_bytes
    assert store.held_bytes() == sum(e.nbytes() for e in entries) + shared_bytes


@pytest.mark.fast
def test_free_caches_node_empties_every_cache(store, inverted, monkeypatch, tmp_path):
    model, clip, src, inv = inverted
    monkeypatch.setattr(style_diffusion, "cache_dir", lambda: str(tmp_path))
    fill(model, inv)
    style_diffusion.store(style_of("on-disk"))
    assert store.entries and style_diffusion._memory and list(tmp_path.glob("*.pt"))
    assert math.isnan(ICFreeCaches.IS_CHANGED())   # runs every time it is queued
    out = ICFreeCaches().free(disk_cache=False)
    assert not store.entries and not style_diffusion._memory and list(tmp_path.glob("*.pt"))
    assert "reference store (1 entries" in out["result"][0]
    ICFreeCaches().free(disk_cache=True)
    assert not list(tmp_path.iterdir())


@pytest.mark.fast
def test_attention_capture_refuses_a_run_over_its_byte_budget_before_storing(small_model, encode, astronaut_latent):
    import comfy.sample
    import comfy.samplers
    from inversion_chain.artifacts import InversionChainError
    from inversion_chain.attention.core import patching
    from inversion_chain.attention.viewer.capture import capture_layers, storage_bytes
    from inversion_chain.nodes.attention_maps import DEFAULT_MAX_MB, ICAttentionCapture
    model, clip, _ = small_model
    steps, hw, kinds = 4, tuple(astronaut_latent["samples"].shape[-2:]), ("cross", "self")
    layers = capture_layers(patching.layers_of(model), "all")
    levels = sorted({l.level for l in layers})
    need = storage_bytes(layers, hw, steps, 1, 1, kinds)["total"]
    smallest = min(storage_bytes([l for l in layers if l.level == lv], hw, steps, 1, 1, kinds)["total"]
                   for lv in levels)
    assert len(levels) > 1 and smallest < need
    with torch.inference_mode():
        pos, neg = encode(clip, PROMPT), encode(clip, "")
        sigmas = compat.calculate_sigmas(model, "ddim_uniform", steps)
        noise = torch.randn(astronaut_latent["samples"].shape, generator=torch.Generator().manual_seed(1))
        m, maps = ICAttentionCapture().capture(model, "cross + self", "all", "per layer", 4)
        assert maps.max_bytes == DEFAULT_MAX_MB * 2 ** 20
        maps.max_bytes = smallest   # (the node takes whole MB; the small model's maps are a few hundred kB)

        def run():
            sampler = comfy.samplers.sampler_object("ddim")
            return comfy.sample.sample_custom(m, noise, 1.0, sampler, sigmas, pos, neg,
                                              torch.zeros_like(noise), seed=0)

        with pytest.raises(InversionChainError) as info:
            run()
        msg = str(info.value)
        assert "over max_mb" in msg and "Settings that fit" in msg and "resolution 'latent/" in msg
        assert re.search(r"max_mb \d+ or more \(0 = no limit\)", msg)
        assert maps.empty() and maps.nbytes() == 0   # refused before storing
        maps.max_bytes = need   # exactly what the run needs: it runs and stores that
        run()
        maps.flush()
        assert len(maps.steps) == steps and maps.stored_bytes() <= need


@pytest.mark.fast
def test_invert_chain_hands_each_latent_to_keep_as_soon_as_it_is_made():
    from inversion_chain.samplers import ddim
    kept, seen_at_call = [], []

    def keep(x):
        kept.append(x.clone())
        return kept[-1]

    def eps_fn(x, sigma):
        seen_at_call.append(len(kept))
        return torch.zeros_like(x) + 0.1

    x0 = torch.ones(1, 4, 2, 2)
    chain, _, calls = ddim.invert_chain(eps_fn, x0, [0.0, 0.5, 1.0, 2.0], 1, keep=keep)
    assert len(chain) == 4 and all(c is k for c, k in zip(chain, kept))
    # the step from sigma k runs after latents 0..k were handed over (nothing waits for the end of the run)
    step_of_call = [k for k, n in enumerate(calls) for _ in range(n)]
    assert all(n == k + 1 for n, k in zip(seen_at_call, step_of_call))


def test_ddim_invert_keeps_the_chain_on_the_offload_device_step_by_step(small_model, encode, astronaut_latent,
                                                                         monkeypatch):
    from inversion_chain.samplers import ddim
    model, clip, _ = small_model
    seen = {}
    original = ddim.invert_chain

    def spy(*args, **kwargs):
        seen["keep"] = kwargs.get("keep")
        out = original(*args, **kwargs)
        seen["chain"] = out[0]
        return out

    monkeypatch.setattr(ddim, "invert_chain", spy)
    with torch.inference_mode():
        inv = ICDDIMInvert().invert(model, astronaut_latent, encode(clip, PROMPT), 3, 1.0, 1)[2]
    assert seen["keep"] is not None
    # every latent the loop made lives in the INVERSION's own chain tensor (no copy of the whole chain at the end)
    base = inv.chain.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == base for t in seen["chain"])
    assert inv.chain.device == compat.offload_device(model) and inv.chain.dtype == torch.float32
    assert torch.equal(inv.chain[-1], seen["chain"][0]) and torch.equal(inv.chain[0], seen["chain"][-1])


@pytest.mark.fast
def test_masked_kv_bias_is_made_per_query_chunk_and_gives_the_whole_bias_result():
    from inversion_chain.attention.core.controller import apply_probs, attention_probs, explicit_attention
    from inversion_chain.attention.editors.kv_inject import RegionBias
    gen = torch.Generator().manual_seed(3)
    b, nq, nk, heads = 2, 64, 64, 4
    q, k, v = (torch.randn(b, n, 32, generator=gen) for n in (nq, nk, nk))
    target = torch.rand(b, nq, generator=gen) > 0.5
    target[1] = True                                     # row 1: every query in the foreground
    source = torch.rand(nk, generator=gen) > 0.7
    # the whole bias, as masked mode built it before
    same = target[:, :, None] == source[None, None, :]
    same |= ~same.any(dim=-1, keepdim=True)
    whole = torch.zeros(same.shape).masked_fill_(~same, float("-inf"))[:, None]
    expected = apply_probs(attention_probs(q, k, heads, whole), v, heads)
    asked = []
    bias = RegionBias(target, source)
    made = bias.rows
    bias.rows = lambda index: asked.append(len(index)) or made(index)
    per_query = b * heads * nk * 4 * 3
    out = explicit_attention(q, k, v, heads, bias, max_score_bytes=16 * per_query)
    assert torch.equal(out, expected)
    assert asked == [16] * 4     # never more than one chunk of query rows at once
    assert torch.equal(made(torch.arange(nq)), whole)
