"""The smaller items of issue 24, each with its own check: Latent Difference's UI output is valid JSON whatever the
latents hold; StyleDiffusion's disk cache writes a unique temp file per write, survives a failed save and sweeps
stale temp files; its memory cache is bounded by bytes; a token position like "#²" gets the pack's clear error."""
import json
import os
import time
import types

import pytest
import torch

from inversion_chain.artifacts import InversionChainError, Style
from inversion_chain.attention.viewer import map_query
from inversion_chain.nodes.invert import ICLatentDifference
from inversion_chain.optimize import style_diffusion

pytestmark = pytest.mark.fast


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_latent_difference_ui_is_valid_json_with_non_finite_latents(bad):
    a = torch.zeros(1, 4, 8, 8)
    b = torch.zeros(1, 4, 8, 8)
    a[0, 0, 0, 0] = bad
    out = ICLatentDifference().compare({"samples": a}, {"samples": b})
    json.dumps(out["ui"], allow_nan=False)   # what a browser's JSON.parse accepts
    assert out["ui"]["max_abs"] == [None] and "NaN/inf" in out["ui"]["text"][0]
    finite = ICLatentDifference().compare({"samples": b + 1}, {"samples": b})
    assert finite["ui"]["max_abs"] == [1.0] and finite["ui"]["mean_abs"] == [1.0]


def style_of(key: str, nbytes: int = 4096) -> Style:
    values = torch.zeros(nbytes // 4, dtype=torch.float32)
    return Style(values=values, positive=[], negative=[], cfg=1.0, sigmas=torch.zeros(0), scheduler="ddim_uniform",
                 inversion_fingerprint=(), model_key=None, settings={}, losses=[], latent_losses=[],
                 inner_iters=torch.zeros(0, dtype=torch.int64), final_error=0.0, cache_key=key)


@pytest.fixture
def cache_dir(monkeypatch, tmp_path):
    monkeypatch.setattr(style_diffusion, "cache_dir", lambda: str(tmp_path))
    style_diffusion.clear_memory_cache()
    yield tmp_path
    style_diffusion.clear_memory_cache()


def test_style_cache_writes_a_unique_temp_file_per_write(cache_dir, monkeypatch):
    targets = []
    save = torch.save

    def recording_save(obj, f, *a, **k):
        targets.append(f if isinstance(f, str) else getattr(f, "name", f))
        return save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", recording_save)
    style_diffusion.store(style_of("k1"))
    style_diffusion.store(style_of("k1"))   # a second server writing the same entry
    assert len(targets) == 2 and targets[0] != targets[1]
    assert all(os.path.dirname(str(t)) == str(cache_dir) for t in targets)
    assert sorted(p.name for p in cache_dir.iterdir()) == ["k1.pt"]   # no temp file left behind


def test_style_cache_save_error_is_logged_and_the_result_kept(cache_dir, monkeypatch, caplog):
    def full_disk(*a, **k):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    style = style_of("k2")
    with caplog.at_level("WARNING", logger="inversion_chain"):
        style_diffusion.store(style)   # no exception: the trained result is not lost
    assert "could not write the disk cache" in caplog.text
    assert style_diffusion.load_cached("k2", {}).from_cache == "memory"
    assert list(cache_dir.iterdir()) == []   # the failed write's temp file is gone


def test_style_cache_sweeps_stale_temp_files(cache_dir, monkeypatch):
    monkeypatch.setattr(style_diffusion, "_swept", set(), raising=False)
    stale, fresh = cache_dir / "old.pt.tmp", cache_dir / "abc.123.tmp"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    old = time.time() - 2 * style_diffusion.STALE_TMP_SECONDS
    os.utime(stale, (old, old))
    style_diffusion.store(style_of("k3"))
    assert not stale.exists() and fresh.exists()   # a write in progress (young) is left alone
    assert (cache_dir / "k3.pt").exists()


def test_style_memory_cache_is_bounded_by_bytes(cache_dir, monkeypatch):
    one = style_diffusion.style_bytes(style_of("a", 4096))
    assert one >= 4096
    monkeypatch.setattr(style_diffusion, "MEMORY_BYTES", int(2.5 * one))
    for key in "abcd":
        style_diffusion._remember(style_of(key, 4096))
        assert style_diffusion.memory_bytes() <= style_diffusion.MEMORY_BYTES
    assert list(style_diffusion._memory) == ["c", "d"]   # least recently used went first
    style_diffusion._remember(style_of("huge", 16 * 4096))   # over the whole budget: not kept in memory
    assert "huge" not in style_diffusion._memory and style_diffusion.memory_bytes() <= style_diffusion.MEMORY_BYTES


@pytest.mark.parametrize("spec", ["#²", "#٣", "# ¹2"])
def test_token_position_with_non_ascii_digits_gets_the_pack_error(spec):
    maps = types.SimpleNamespace(query_grid=4, prompts={}, start_token=True)   # as a CLIP capture's AttentionMaps
    with pytest.raises(InversionChainError, match="query points as #0..#15"):
        map_query._tiles(maps, "self", spec, torch.zeros(16, 4, 4), 0)
    with pytest.raises(InversionChainError, match="give Attention Capture `clip`"):
        map_query._tiles(maps, "cross", spec, torch.zeros(77, 4, 4), 0)
