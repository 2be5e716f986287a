"""KV Inject on the small model (SD1.5 block layout, 16 self-attention layers), in-process."""
import pytest
import torch


from inversion_chain.artifacts import InversionChainError
from inversion_chain.attention.core import patching
from inversion_chain.attention.core.controller import CONTROLLER_KEY, Editor
from inversion_chain.nodes.invert import ICDDIMInvert
from inversion_chain.nodes.kv_inject import ICKVInject
from tests.harness.sampling import sample
from tests.harness.measure import measured

STEPS = 8



@pytest.fixture(scope="module")
def setup(small_model, encode, astronaut_latent):
    model, clip, vae = small_model
    with torch.inference_mode():
        src = encode(clip, "a photo of an astronaut")
        noise, sigmas, inv = ICDDIMInvert().invert(model, astronaut_latent, src, STEPS, 1.0, 3)
    return dict(model=model, clip=clip, src=src, tgt=encode(clip, "a watercolor painting of a cat"),
                empty=encode(clip, ""), noise=noise["samples"], sigmas=sigmas, inv=inv,
                source=astronaut_latent["samples"])


def test_identity_same_prompt_all_layers_from_step_0_reproduces_the_source(setup):
    s = setup
    patched = ICKVInject().patch(s["model"], s["inv"], 0.0, 0, "mutual")[0]
    out = sample(patched, s["src"], s["src"], s["noise"], s["sigmas"])
    plain = sample(s["model"], s["src"], s["src"], s["noise"], s["sigmas"])
    err_kv = float((out - s["source"]).abs().max())
    err_plain = float((plain - s["source"]).abs().max())
    measured(f"reconstruction max error: plain {err_plain:.2e}, KV-injected {err_kv:.2e}")
    # The generated row differs from the chain only by the inversion's round-trip residual (~1e-4 here), so
    # its own K/V and the chain's agree to that order; 1e-3 is the round-trip bound DDIM Invert guarantees.
    assert err_kv < 1e-3 and float((out - plain).abs().max()) < 1e-3


def test_injection_acts_only_from_start_percent(setup):
    s = setup
    start = 3
    traj = {}

    def recorder(name):
        traj[name] = []
        return lambda step, x0, x, total: traj[name].append(x.clone())

    patched = ICKVInject().patch(s["model"], s["inv"], start / STEPS, 10, "mutual", negative=s["empty"])[0]
    sample(s["model"], s["tgt"], s["empty"], s["noise"], s["sigmas"], 3.0, recorder("stock"))
    sample(patched, s["tgt"], s["empty"], s["noise"], s["sigmas"], 3.0, recorder("kv"))
    # the sampler's callback at step i sees the latent entering step i: step `start` is the first to change
    for i in range(start + 1):
        assert torch.equal(traj["stock"][i], traj["kv"][i]), f"latent entering step {i} changed"
    assert not torch.equal(traj["stock"][start + 1], traj["kv"][start + 1])


def test_injection_outside_layers_and_steps_is_bit_identical(setup):
    s = setup
    with pytest.raises(InversionChainError, match="nothing would be injected"):
        ICKVInject().patch(s["model"], s["inv"], 1.0, 0, "union")  # a silent no-op before
    patched = ICKVInject().patch(s["model"], s["inv"], 0.0, 15, "union", negative=s["empty"])[0]
    out = sample(patched, s["tgt"], s["empty"], s["noise"], s["sigmas"], 3.0)
    stock = sample(s["model"], s["tgt"], s["empty"], s["noise"], s["sigmas"], 3.0)
    assert not torch.equal(out, stock)  # layer 15 alone still acts


def test_cached_and_recomputed_reference_kv_agree(setup):
    s = setup
    outs = {}
    for policy in ("cpu", "recompute"):
        patched = ICKVInject().patch(s["model"], s["inv"], 2 / STEPS, 10, "mutual", negative=s["empty"],
                                     cache=policy)[0]
        outs[policy] = sample(patched, s["tgt"], s["empty"], s["noise"], s["sigmas"], 3.0)
    diff = float((outs["cpu"] - outs["recompute"]).abs().max())
    measured(f"cached vs recomputed: max diff {diff:.2e}")
    # the same batch-1 reference forward; the cache keeps the fp16 attention inputs (projected on use), recompute
    # fp16 K/V: they differ by fp16 rounding only (measured 3.6e-5)
    assert diff < 1e-4


def test_no_leak_into_the_original_model(setup):
    s = setup
    before = sample(s["model"], s["tgt"], s["empty"], s["noise"], s["sigmas"], 3.0)
    options_before = repr(sorted(s["model"].model_options.get("transformer_options", {}).keys()))
    patched = ICKVInject().patch(s["model"], s["inv"], 1 / STEPS, 8, "union", negative=s["empty"])[0]
    sample(patched, s["tgt"], s["empty"], s["noise"], s["sigmas"], 3.0)
    after = sample(s["model"], s["tgt"], s["empty"], s["noise"], s["sigmas"], 3.0)
    assert torch.equal(before, after)
    assert CONTROLLER_KEY not in s["model"].model_options.get("transformer_options", {})
    assert repr(sorted(s["model"].model_options.get("transformer_options", {}).keys())) == options_before
    assert "attn1" not in s["model"].model_options.get("transformer_options", {}).get("patches_replace", {})


class KeyLengthProbe(Editor):
    """An observer editor: records the key length it sees at one layer."""
    order = 90
    kinds = ("self",)

    def __init__(self, layer_index):
        self.layer_index, self.seen = layer_index, []

    def layers(self, all_layers):
        return [l for l in all_layers if l.index == self.layer_index]

    def active(self, ctx):
        return ctx.layer.index == self.layer_index

    def edit_qkv(self, q, k, v, ctx):
        self.seen.append((q.shape[1], k.shape[1]))
        return q, k, v


def test_two_editors_on_one_model_both_take_effect(setup, small_model, encode):
    s = setup
    import nodes
    from tests.harness.photos import photo
    other_latent = nodes.VAEEncode().encode(small_model[2], photo("chelsea", 128))[0]
    inv_b = ICDDIMInvert().invert(s["model"], other_latent, s["src"], STEPS, 1.0, 1)[2]
    m = ICKVInject().patch(s["model"], s["inv"], 0.0, 12, "union")[0]
    m = ICKVInject().patch(m, inv_b, 0.0, 12, "union")[0]
    probe = KeyLengthProbe(13)
    m = patching.install(m, probe)
    out = sample(m, s["tgt"], s["empty"], s["noise"], s["sigmas"], 1.0)
    assert probe.seen and all(nk == 3 * nq for nq, nk in probe.seen)  # reference A + reference B + own
    only_a = sample(ICKVInject().patch(s["model"], s["inv"], 0.0, 12, "union")[0], s["tgt"], s["empty"], s["noise"],
                    s["sigmas"], 1.0)
    assert not torch.equal(out, only_a)


def test_masked_mode_uses_source_cross_attention(setup):
    s = setup
    masked = ICKVInject().patch(s["model"], s["inv"], 1 / STEPS, 10, "masked", negative=s["empty"],
                                mask_words="astronaut", clip=s["clip"], source_prompt="a photo of an astronaut",
                                target_prompt="a watercolor painting of a cat", target_words="cat")[0]
    mutual = ICKVInject().patch(s["model"], s["inv"], 1 / STEPS, 10, "mutual", negative=s["empty"])[0]
    a = sample(masked, s["tgt"], s["empty"], s["noise"], s["sigmas"], 3.0)
    b = sample(mutual, s["tgt"], s["empty"], s["noise"], s["sigmas"], 3.0)
    assert torch.isfinite(a).all() and not torch.equal(a, b)


@pytest.mark.fast
def test_cfg_without_negative_says_what_to_connect(setup):
    s = setup
    patched = ICKVInject().patch(s["model"], s["inv"], 1 / STEPS, 10, "mutual")[0]
    sample(patched, s["tgt"], s["empty"], s["noise"], s["sigmas"], 1.0)   # cfg 1: no unconditional half
    with pytest.raises(InversionChainError, match="`negative` is not connected"):
        sample(patched, s["tgt"], s["empty"], s["noise"], s["sigmas"], 3.0)


@pytest.mark.fast
def test_bad_input_gets_clear_errors(setup, small_model, astronaut_latent):
    s = setup
    with pytest.raises(InversionChainError, match="beyond this model's 16 self-attention layers"):
        ICKVInject().patch(s["model"], s["inv"], 4 / STEPS, 16, "mutual")
    with pytest.raises(InversionChainError, match="is not in the prompt.*Its tokens are: a, photo, of, an, astronaut"):
        ICKVInject().patch(s["model"], s["inv"], 4 / STEPS, 10, "masked", mask_words="dog", clip=s["clip"],
                           source_prompt="a photo of an astronaut", target_prompt="a photo of a dog")
    with pytest.raises(InversionChainError, match="masked mode needs .*`target_prompt`"):
        ICKVInject().patch(s["model"], s["inv"], 4 / STEPS, 10, "masked", mask_words="astronaut", clip=s["clip"],
                           source_prompt="a photo of an astronaut")
    with pytest.raises(InversionChainError, match="`mask_words` \\(in `target_prompt`.*'astronaut' is not in the "
                                                  "prompt 'a photo of a dog'"):
        ICKVInject().patch(s["model"], s["inv"], 4 / STEPS, 10, "masked", mask_words="astronaut", clip=s["clip"],
                           source_prompt="a photo of an astronaut", target_prompt="a photo of a dog")
    with pytest.raises(InversionChainError, match="`target_words`: the word 'cat' is not in the prompt"):
        ICKVInject().patch(s["model"], s["inv"], 4 / STEPS, 10, "masked", mask_words="astronaut", clip=s["clip"],
                           source_prompt="a photo of an astronaut", target_prompt="a photo of a dog",
                           target_words="cat")
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
    other_model = ModelSamplingDiscrete().patch(s["model"], "v_prediction", False)[0]
    with pytest.raises(InversionChainError, match="made with a different model"):
        ICKVInject().patch(other_model, s["inv"], 4 / STEPS, 10, "mutual")
    patched = ICKVInject().patch(s["model"], s["inv"], 0.0, 10, "mutual")[0]
    small = torch.zeros(1, 4, 8, 8)
    with pytest.raises(InversionChainError, match="inversion was made at"):
        sample(patched, s["tgt"], s["empty"], small, s["sigmas"], 1.0)
    other_sigmas = ICDDIMInvert().invert(s["model"], astronaut_latent, s["src"], STEPS + 2, 1.0, 0)[1]
    with pytest.raises(InversionChainError, match=f"Sample with {STEPS} steps and scheduler 'ddim_uniform'"):
        sample(patched, s["tgt"], s["empty"], s["noise"], other_sigmas, 1.0)


def test_per_branch_cache_entry_is_keyed_by_the_negative_and_sized_exactly(setup, encode):
    from inversion_chain.attention.store import reference
    s = setup
    reference.STORE.clear()
    blurry = encode(s["clip"], "blurry")
    for negative in (s["empty"], blurry, s["empty"]):
        ICKVInject().patch(s["model"], s["inv"], 2 / STEPS, 10, "mutual", negative=negative, cache="cpu")
    entries = list(reference.STORE.entries.values())
    assert len(entries) == 2    # a new negative prompt is a new entry; the first one is found again
    for entry in entries:
        assert entry.branches == 2 and entry.nbytes() == entry.estimate_bytes() > 0
        assert {key[2] for key in entry.store} == {0, 1}
        assert len(entry.store) == 2 * len(entry.layers) * len(entry.steps)
    cond_only = ICKVInject().patch(s["model"], s["inv"], 2 / STEPS, 10, "mutual", cache="cpu")
    assert cond_only and len(reference.STORE.entries) == 3
    one = list(reference.STORE.entries.values())[-1]
    kv_bytes = lambda e: sum(t.numel() * t.element_size() for kv in e.store.values() for t in kv)
    assert one.branches == 1 and 2 * kv_bytes(one) == kv_bytes(entries[0])
    reference.STORE.clear()
