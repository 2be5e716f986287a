"""Messages that repeat workflow text are safe to render as HTML (issue 24): ComfyUI's 2024-03 frontend shows an
error's message with innerHTML, so a shared workflow whose words hold markup must come back as text. In-process:
the node raises, and its message holds the markup escaped (``&lt;img ...&gt;``), never a raw tag."""
import pytest
import torch

from inversion_chain.artifacts import InversionChainError, user_text
from inversion_chain.nodes.invert import ICDDIMInvert
from inversion_chain.nodes.kv_inject import ICKVInject
from inversion_chain.nodes.p2plus import ICP2PlusController

MARKUP = "<img src=x onerror=alert(1)>"
ESCAPED = "&lt;img src=x onerror=alert(1)&gt;"
PROMPT = "a photo of an astronaut"


def message_of(call) -> str:
    with pytest.raises(InversionChainError) as info:
        with torch.inference_mode():
            call()
    return str(info.value)


def assert_escaped(message: str):
    assert "<" not in message and ">" not in message, message
    assert ESCAPED in message, message


@pytest.fixture(scope="module")
def inverted(small_model, encode, astronaut_latent):
    model, clip, _ = small_model
    with torch.inference_mode():
        src = encode(clip, PROMPT)
        inv = ICDDIMInvert().invert(model, astronaut_latent, src, 2, 1.0, 1)[2]
    return model, clip, inv


@pytest.mark.fast
def test_user_text_escapes_markup_and_keeps_words():
    assert user_text(MARKUP) == ESCAPED
    assert user_text("a cat & a dog's hat") == "a cat &amp; a dog's hat"


@pytest.mark.fast
def test_kv_inject_mask_words_with_markup_come_back_escaped(inverted):
    model, clip, inv = inverted
    msg = message_of(lambda: ICKVInject().patch(model, inv, 0.25, 0, "masked", mask_words=MARKUP, clip=clip,
                                                source_prompt=PROMPT, target_prompt=PROMPT, target_words="",
                                                cache="cpu"))
    assert_escaped(msg)
    assert "is not in the prompt" in msg


@pytest.mark.fast
def test_kv_inject_prompt_with_markup_is_escaped_where_it_is_repeated(inverted):
    model, clip, inv = inverted
    msg = message_of(lambda: ICKVInject().patch(model, inv, 0.25, 0, "masked", mask_words="dog", clip=clip,
                                                source_prompt=f"{PROMPT} {MARKUP}", target_prompt=PROMPT,
                                                cache="cpu"))
    assert "is not in the prompt" in msg and "<" not in msg and "&lt;img" in msg


@pytest.mark.fast
def test_a_widget_value_with_markup_is_escaped_in_the_input_contract_message(small_model, astronaut_latent, encode):
    model, clip, _ = small_model
    with torch.inference_mode():
        src = encode(clip, PROMPT)
    msg = message_of(lambda: ICDDIMInvert().invert(model, astronaut_latent, src, MARKUP, 1.0, 1))
    assert_escaped(msg)
    assert "input `steps`" in msg


@pytest.mark.fast
def test_p2plus_reweight_and_blend_words_with_markup_come_back_escaped(small_model):
    model, clip, _ = small_model
    node = ICP2PlusController()

    def build(**kw):
        args = dict(latent={"samples": torch.zeros(1, 4, 16, 16)}, steps=2)
        args.update(kw)
        return node.build(model, clip, PROMPT, "a photo of a robot", "refine", 0.8, 0.4, 0.0, **args)

    assert_escaped(message_of(lambda: build(reweight=f"{MARKUP}:9")))   # a value outside [-2, 2]
    assert_escaped(message_of(lambda: build(reweight=f"{MARKUP}:2.0")))   # a word that is not in the prompt
    assert_escaped(message_of(lambda: build(blend_words=MARKUP)))
