"""Cache keys that cannot collide (issue 24): the reference K/V store and StyleDiffusion's memory and disk caches key
the MODEL by the content of its weights plus every patch and strength on it, the inversion's chain by content, and
lists item by item (length-delimited). A LoRA at another strength, a prompt list split differently and another
model all miss; the same model and LoRA rebuilt from scratch hit."""
import pytest
import torch

import comfy.sd

from inversion_chain import conditioning
from inversion_chain.artifacts import digest, inversion_fingerprint
from inversion_chain.attention.store import reference
from inversion_chain.model_info import model_identity
from inversion_chain.nodes.invert import ICDDIMInvert
from inversion_chain.nodes.kv_inject import ICKVInject
from inversion_chain.optimize import style_diffusion
from tests.harness import models, photos

STEPS = 2
PROMPT = "a photo of an astronaut"


def with_lora(model, strength: float, rank: int = 2):
    """``model`` through ComfyUI's stock LoRA loader (what LoraLoader runs) with a small seeded LoRA on the first
    self-attention's to_q, at ``strength``."""
    key = next(k for k in model.model.state_dict() if k.endswith("attn1.to_q.weight"))
    out_dim, in_dim = model.model.state_dict()[key].shape
    name = "lora_unet_" + key[len("diffusion_model."):-len(".weight")].replace(".", "_")
    gen = torch.Generator().manual_seed(11)
    lora = {f"{name}.lora_up.weight": torch.randn(out_dim, rank, generator=gen) * 0.5,
            f"{name}.lora_down.weight": torch.randn(rank, in_dim, generator=gen) * 0.5,
            f"{name}.alpha": torch.tensor(float(rank))}
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0.0)
    assert patched.patches, "the LoRA patched nothing"
    return patched


def other_model():
    """The small checkpoint loaded again with one middle weight changed: same architecture and the same first and
    last parameters (the inversion's model check passes), different weights."""
    model, _, _ = models.load_checkpoint("small")
    with torch.inference_mode():
        key = next(k for k in model.model.state_dict() if k.endswith("attn2.to_v.weight"))
        model.model.state_dict(keep_vars=True)[key].add_(0.05)
    return model


@pytest.fixture(scope="module")
def inverted(small_model, encode, astronaut_latent):
    model, clip, _ = small_model
    with torch.inference_mode():
        src = encode(clip, PROMPT)
        inv = ICDDIMInvert().invert(model, astronaut_latent, src, STEPS, 1.0, 1)[2]
    return model, clip, src, inv


@pytest.mark.fast
def test_model_identity_sees_lora_strength_and_weights_not_object_identity(small_model):
    model = small_model[0]
    assert model_identity(model) == model_identity(model.clone())
    assert model_identity(with_lora(model, 0.5)) == model_identity(with_lora(model, 0.5))   # rebuilt: same content
    assert model_identity(with_lora(model, 0.5)) != model_identity(with_lora(model, 1.0))
    assert model_identity(with_lora(model, 0.5)) != model_identity(model)
    reloaded = models.load_checkpoint("small")[0]
    assert model_identity(reloaded) == model_identity(model)   # the same weights, another object
    assert model_identity(other_model()) != model_identity(model)


def test_model_identity_is_the_unpatched_weights_while_a_lora_is_applied(small_model):
    model = small_model[0]
    before = model_identity(model)
    lora = with_lora(model, 1.0)
    model.model.__dict__.pop("_inversion_chain_weights", None)   # forget the remembered hash: computed again below
    key = next(k for k in lora.patches)
    original = model.model.state_dict()[key].clone()
    with torch.inference_mode():
        lora.patch_weight_to_device(key)   # the LoRA written into the shared weights, as a full load does
        try:
            assert not torch.equal(model.model.state_dict()[key], original)
            assert model_identity(model) == before
            assert model_identity(lora) != before
        finally:
            lora.unpatch_model()
    assert torch.equal(model.model.state_dict()[key], original)


def test_reference_store_misses_on_lora_strength_other_model_and_prompt_split(store, inverted):
    model, clip, src, inv = inverted

    def inject(m, negative=None):
        with torch.inference_mode():
            ICKVInject().patch(m, inv, 0.25, 0, "mutual", negative=negative, cache="cpu")
        return len(store.entries)

    assert inject(model) == 1
    assert inject(model.clone()) == 1                       # a clone computes the same: hit
    assert inject(with_lora(model, 0.5)) == 2               # a LoRA: miss
    assert inject(with_lora(model, 0.5)) == 2               # the same LoRA and strength rebuilt: hit
    assert inject(with_lora(model, 1.0)) == 3               # another strength: miss
    assert inject(other_model()) == 4                       # other weights (same first/last parameters): miss
    # the key's parts are delimited: conditioning fingerprints of a list split differently never meet
    a, b = ["x" * 3, "y"], ["x" * 2, "xy"]
    assert digest(*a) != digest(*b)
    keys = [reference.ReferenceStore.key("kv", model, inv, fp, [], [1]) for fp in ("ab", "a")]
    assert keys[0] != keys[1]
    assert (reference.ReferenceStore.key("kv", model, inv, "c", [], [1], ("a", "b"))
            != reference.ReferenceStore.key("kv", model, inv, "c", [], [1], ("ab",)))


@pytest.mark.fast
def test_conditioning_fingerprint_delimits_items_and_needs_no_object_identity(small_model, encode):
    clip = small_model[1]
    with torch.inference_mode():
        one, two = encode(clip, "a cat"), encode(clip, "a dog")
    both = one + two
    assert conditioning.fingerprint(both) != conditioning.fingerprint(two + one)   # reordered list
    # metadata split differently ("ab" -> "c" vs "a" -> "bc") must not collide
    t = one[0][0]
    assert (conditioning.fingerprint([[t, {"ab": "c"}]]) != conditioning.fingerprint([[t, {"a": "bc"}]]))

    class Hook:   # an object another pack attaches: by class and state, not by id()
        def __init__(self, w):
            self.w = w
    assert conditioning.fingerprint([[t, {"hook": Hook(1.0)}]]) == conditioning.fingerprint([[t, {"hook": Hook(1.0)}]])
    assert conditioning.fingerprint([[t, {"hook": Hook(1.0)}]]) != conditioning.fingerprint([[t, {"hook": Hook(2.0)}]])


def test_inversion_fingerprint_is_the_chain_content(inverted):
    inv = inverted[3]
    import dataclasses
    changed = dataclasses.replace(inv, chain=inv.chain.clone())
    assert inversion_fingerprint(changed) == inversion_fingerprint(inv)
    chain = inv.chain.clone()
    chain[1, 0, 0, 0, 0] += 1e-3   # a middle step: the ends alone would not see it
    assert inversion_fingerprint(dataclasses.replace(inv, chain=chain)) != inversion_fingerprint(inv)


@pytest.fixture(scope="module")
def clip_vision():
    return models.load_clip_vision()


def test_style_cache_misses_on_lora_strength_other_model_and_prompt_split(inverted, encode, clip_vision,
                                                                          monkeypatch, tmp_path):
    model, clip, src, inv = inverted
    monkeypatch.setattr(style_diffusion, "cache_dir", lambda: str(tmp_path))
    style_diffusion.clear_memory_cache()
    image = photos.photo("astronaut", 128)
    with torch.inference_mode():
        empty = encode(clip, "")

    def train(m, positive=src, negative=empty):
        with torch.inference_mode():
            return style_diffusion.train(m, clip_vision, image, inv, positive, negative, 2.0, 1, 0.01, 1.0).from_cache

    assert train(model) == ""
    assert train(model.clone()) == "memory"
    assert train(with_lora(model, 0.5)) == ""                # memory cache: miss
    assert train(with_lora(model, 0.5)) == "memory"
    style_diffusion.clear_memory_cache()
    assert train(with_lora(model, 1.0)) == ""                # disk cache: the 0.5 file is not taken for 1.0
    assert train(with_lora(model, 0.5)) == "disk"
    assert train(other_model()) == ""
    assert len(list(tmp_path.glob("*.pt"))) == 4
    # a prompt list split differently: [a, b] + [c] vs [a] + [b, c] (the old digest joined lists without
    # separators)
    with torch.inference_mode():
        a, b, c = encode(clip, "one"), encode(clip, "two"), encode(clip, "three")
    settings = {"x": 1}
    k1 = style_diffusion.cache_key(image, inv, style_diffusion._conditioning_tensors(a + b),
                                   style_diffusion._conditioning_tensors(c), clip_vision, settings, model)
    k2 = style_diffusion.cache_key(image, inv, style_diffusion._conditioning_tensors(a),
                                   style_diffusion._conditioning_tensors(b + c), clip_vision, settings, model)
    assert k1 != k2
    style_diffusion.clear_memory_cache()
