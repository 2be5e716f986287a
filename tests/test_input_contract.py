"""The input contract in-process: every pack node's declared inputs checked the same way, seed noise exactly as
ComfyUI's samplers make it, and where StyleDiffusion's disk cache lives."""
import math
import os

import pytest
import torch

import folder_paths
import nodes as comfy_nodes

from inversion_chain import compat
from inversion_chain.artifacts import InversionChainError
from inversion_chain.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from inversion_chain.nodes.contract import validate
from inversion_chain.nodes.p2plus import ICP2PlusController
from inversion_chain.optimize import style_diffusion
from tests.harness.measure import measured

pytestmark = pytest.mark.fast
SOURCE, TARGET = "a photo of an astronaut", "a photo of a robot"


def widget_inputs(kinds):
    """(node key, class, input name, opts) for every declared input of the given widget kinds, all pack nodes."""
    out = []
    for key, cls in NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, entry in (spec.get(section) or {}).items():
                kind = entry[0] if isinstance(entry[0], str) else "COMBO"
                if kind in kinds:
                    out.append((key, cls, name, entry[1] if len(entry) > 1 else {}))
    return out


NUMBERS = widget_inputs(("INT", "FLOAT"))


@pytest.mark.parametrize("key,cls,name,opts", NUMBERS, ids=[f"{k}.{n}" for k, _, n, _ in NUMBERS])
def test_numbers_are_finite_in_range_and_converted_as_comfyui_does(key, cls, name, opts):
    bad = [float("nan"), float("inf"), float("-inf"), "abc", "", True, [1], torch.zeros(3)]
    if "max" in opts:
        bad.append(opts["max"] + 1)
    if "min" in opts:
        bad.append(opts["min"] - 1)
    for value in bad:
        with pytest.raises(InversionChainError) as err:
            validate(cls, {name: value})
        text = str(err.value)
        assert text.startswith(NODE_DISPLAY_NAME_MAPPINGS[key] + ":") and f"`{name}`" in text and "accepted" in text
        assert len(text) < 400
    default = opts["default"]
    assert validate(cls, {name: str(default)})[name] == default  # ComfyUI converts "7.5" -> 7.5, "12" -> 12
    assert type(validate(cls, {name: default})[name]) is type(default)


def test_text_and_choices_and_wiring():
    cls = NODE_CLASS_MAPPINGS["ICP2PlusController"]
    long = "x" * 10000
    with pytest.raises(InversionChainError, match=r"P2Plus Controller: input `source_prompt` got 'x+\.\.\. \(10000 "
                                                  r"characters\); accepted: text of at most"):
        validate(cls, {"source_prompt": long})
    with pytest.raises(InversionChainError, match="input `mode` got 'swap'; accepted: one of 'replace'"):
        validate(cls, {"mode": "swap"})
    with pytest.raises(InversionChainError, match=r"input `latent` got tensor of shape \(1, 64, 64, 3\).*a LATENT"):
        validate(cls, {"latent": torch.zeros(1, 64, 64, 3)})
    with pytest.raises(InversionChainError, match="input `null_text` got 5; accepted: a NULL_TEXT"):
        validate(cls, {"null_text": 5})
    assert validate(cls, {"source_prompt": "猫 🐱 naïve", "latent": None, "seed": "7"}) == {
        "source_prompt": "猫 🐱 naïve", "latent": None, "seed": 7}


def stock(model, positive, negative, latent, seed, steps, cfg, scheduler, add_noise):
    return comfy_nodes.KSamplerAdvanced().sample(model, add_noise, seed, steps, cfg, "ddim", scheduler, positive,
                                                 negative, latent, 0, 10000, "disable")[0]["samples"]


@pytest.mark.parametrize("scheduler", ["ddim_uniform", "normal"])
def test_p2plus_generated_row_0_is_the_stock_generation(small_model, encode, scheduler):
    """Prompt-to-Prompt's contract on a generated image: row 0 is exactly what a stock KSamplerAdvanced makes for
    the source prompt with the same seed and schedule (ComfyUI scales the noise by sigma0, by sqrt(1 + sigma0^2)
    only at sigma_max: ddim_uniform starts below it, normal at it)."""
    model, clip, _ = small_model
    steps, seed, cfg = 4, 2 ** 64 - 5, 3.0
    empty = {"samples": torch.zeros(1, 4, 16, 16)}
    sigmas = compat.calculate_sigmas(model, scheduler, steps)
    at_max = math.isclose(float(sigmas[0]), float(compat.model_sampling(model).sigma_max), rel_tol=1e-5)
    assert at_max == (scheduler == "normal")
    reference = stock(model, encode(clip, SOURCE), encode(clip, ""), empty, seed, steps, cfg, scheduler, "enable")
    m, pos, neg, latent, p2p_sigmas = ICP2PlusController().build(
        model, clip, SOURCE, TARGET, "replace", 0.6, 0.6, 0.0, latent=empty, seed=seed, steps=steps,
        scheduler=scheduler)
    assert torch.equal(p2p_sigmas, sigmas)
    out = stock(m, pos, neg, latent, 0, steps, cfg, scheduler, "disable")
    err = float((out[:1] - reference).abs().max())
    measured(f"{scheduler}: |P2Plus row 0 - stock| max {err:.2e} (latent std {float(reference.std()):.2f})")
    assert err < 1e-4
    assert float((out[1] - reference[0]).abs().max()) > 1e-2  # row 1 is the edit


def test_seed_noise_wraps_like_comfyui_seeds(small_model):
    model = small_model[0]
    sigmas = compat.calculate_sigmas(model, "normal", 3)
    latent = torch.zeros(1, 4, 8, 8)
    assert torch.equal(compat.seed_noise(model, latent, 2 ** 64 + 3, sigmas), compat.seed_noise(model, latent, 3,
                                                                                               sigmas))


def test_style_cache_survives_restarts_and_is_capped(tmp_path, monkeypatch):
    folder = os.path.realpath(style_diffusion.cache_dir())
    temp = os.path.realpath(folder_paths.get_temp_directory())
    user = os.path.realpath(getattr(folder_paths, "get_user_directory", lambda: folder_paths.user_directory)())
    assert os.path.commonpath([folder, temp]) != temp       # ComfyUI empties temp at every start
    assert os.path.commonpath([folder, user]) == user
    assert "__inversion_chain" in folder                   # 0.3x serves no "__" user folder over HTTP

    monkeypatch.setattr(style_diffusion, "cache_dir", lambda: str(tmp_path))
    for i in range(5):
        path = tmp_path / f"{i:032x}.pt"
        path.write_bytes(b"\0" * 1000)
        os.utime(path, (1000 + i, 1000 + i))
    os.utime(tmp_path / f"{0:032x}.pt", (2000, 2000))      # used most recently
    style_diffusion._evict(keep=f"{1:032x}", budget=2500)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [f"{0:032x}.pt", f"{1:032x}.pt"]         # the oldest-used went; the file just stored stays
