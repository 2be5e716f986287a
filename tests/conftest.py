"""Fixtures shared by every test: a real ComfyUI in-process, the pack loaded as ComfyUI loads it, small models
loaded through ComfyUI's own checkpoint loader, real photos, and a headless ComfyUI server.

ComfyUI boots when the first test module outside tests/unit is collected (before it is imported), not when this
file is imported: `pytest tests/unit` (pure tests, tests/unit/conftest.py) never imports ComfyUI."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.harness import comfy_env, measure, models, photos, pure

UNIT_DIR = Path(__file__).resolve().parent / "unit"


def boot_comfy():
    """A real ComfyUI in this process and the pack loaded as ComfyUI loads it (once)."""
    comfy_env.setup_comfy()
    pure.complete_pack()      # the pure tests may have registered the pack without its __init__
    comfy_env.load_pack()


def pytest_collectstart(collector):
    """Boot ComfyUI before the first test module that needs it is imported (every module outside tests/unit)."""
    if isinstance(collector, pytest.Module) and not Path(collector.path).resolve().is_relative_to(UNIT_DIR):
        boot_comfy()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """``measured(...)`` in a test (or a fixture it sets up) records onto this test (tests/harness/measure.py)."""
    measure._running.append(item)
    yield
    measure._running.pop()


@pytest.fixture(autouse=True)
def _inference_mode():
    """ComfyUI runs every node under inference mode; so do the tests."""
    with torch.inference_mode():
        yield


@pytest.fixture(scope="session")
def small_model():
    """(MODEL, CLIP, VAE): SD1.5 layout at width 32, random seeded weights, via the stock loader."""
    with torch.inference_mode():
        return models.load_checkpoint("small")


@pytest.fixture(scope="session")
def encode():
    """encode(clip, text) -> CONDITIONING, with real CLIP tokenization."""
    def _encode(clip, text):
        with torch.inference_mode():
            cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        return [[cond, {"pooled_output": pooled}]]
    return _encode


@pytest.fixture(scope="session")
def astronaut_latent(small_model):
    """{"samples": ...}: VAEEncode of scikit-image's astronaut at 128 px (16x16 latent)."""
    import nodes
    with torch.inference_mode():
        return nodes.VAEEncode().encode(small_model[2], photos.photo("astronaut", 128))[0]


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """A headless ComfyUI (main.py --cpu on 127.0.0.1) with the pack and the test checkpoints."""
    from tests.harness.server import ComfyServer
    server = ComfyServer(tmp_path_factory.mktemp("comfy_server"))
    server.start()
    yield server
    server.stop()


# -- model families: every node's tests that apply run on SD1.5, SD2-v and SDXL layouts ---------------------------
FAMILIES = tuple(models.FAMILIES)


def encode_as_stock(clip, text, family, size=1024):
    """CONDITIONING the way the stock nodes make it: CLIPTextEncode on SD1.x/SD2, CLIPTextEncodeSDXL on SDXL
    (pooled output plus the width/height/crop/target size entries, here the node's defaults)."""
    with torch.inference_mode():
        if family == "sdxl":
            from comfy_extras.nodes_clip_sdxl import CLIPTextEncodeSDXL
            node = CLIPTextEncodeSDXL()
            return getattr(node, CLIPTextEncodeSDXL.FUNCTION)(clip, size, size, 0, 0, size, size, text, text)[0]
        import nodes
        return nodes.CLIPTextEncode().encode(clip, text)[0]


@pytest.fixture(scope="session", params=FAMILIES)
def family(request):
    return request.param


_family_cache = {}


def family_models(family):
    if family not in _family_cache:
        with torch.inference_mode():
            _family_cache[family] = models.load_family(family)
    return _family_cache[family]


@pytest.fixture(scope="session")
def family_model(family):
    """(MODEL, CLIP, VAE) of the current family, via the stock loader (sd15 is the `small` model)."""
    return family_models(family)


@pytest.fixture(scope="session")
def family_encode(family):
    """encode(clip, text) -> CONDITIONING as the stock text-encode node of the current family makes it."""
    return lambda clip, text: encode_as_stock(clip, text, family)


@pytest.fixture(scope="session")
def family_latent(family_model):
    """VAEEncode of the astronaut at 128 px (16x16 latent) with the family's VAE."""
    import nodes
    with torch.inference_mode():
        return nodes.VAEEncode().encode(family_model[2], photos.photo("astronaut", 128))[0]


@pytest.fixture
def store():
    """The pack's reference store, empty, with its byte budget restored afterwards."""
    from inversion_chain.attention.store import reference
    reference.STORE.clear()
    saved = reference.STORE.max_bytes
    yield reference.STORE
    reference.STORE.max_bytes = saved
    reference.STORE.clear()
