"""Two rules the new inputs and the DiT editors rest on, checked on made-up layouts and tensors (quick): which
cross-attention level a map-size choice reads on a model's layer layout (P2Plus `blend_map_size`, KV Inject
`mask_map_size`), and the attention mask RIVAL widens when it appends the photo's keys on a DiT
(attention/editors/dit_rival.py)."""
import pytest
import torch

from inversion_chain.attention.core.layers import (AttentionLayer, map_level, map_size_name, map_size_problem,
                                                   map_sizes_of)
from inversion_chain.attention.editors.dit_rival import extended_mask

pytestmark = pytest.mark.fast


def layout(*levels):
    return [AttentionLayer(index=i, key=("input", i, 0), part="down", level=lv, channels=8, heads=1)
            for i, lv in enumerate(levels)]


SD15 = layout(0, 0, 1, 1, 2, 2, 3, 2, 2, 2, 1, 1, 1, 0, 0, 0)   # latent/1 .. latent/8 (the middle block)
SDXL = layout(1, 1, 2, 2, 2, 2, 1, 1)                            # no attention at latent/1 or latent/8
SCENES = layout(0, 1, 1, 0)                                      # the 2-level scenes UNet


def test_auto_reads_latent_4_where_the_model_has_it_else_its_coarsest_level():
    assert map_size_name(map_level(SD15, "auto")) == "latent/4"
    assert map_size_name(map_level(SDXL, "auto")) == "latent/4"
    assert map_size_name(map_level(SCENES, "auto")) == "latent/2"   # the coarsest level of a 2-level UNet


def test_an_explicit_size_reads_its_level_only_where_the_model_has_attention_there():
    assert [map_level(SD15, s) for s in ("latent/1", "latent/2", "latent/4", "latent/8")] == [0, 1, 2, 3]
    assert map_level(SDXL, "latent/1") is None and map_level(SDXL, "latent/8") is None
    assert map_level(SCENES, "latent/4") is None and map_level(SCENES, "latent/1") == 0
    assert map_level(SD15, "latent/3") is None   # not a choice at all


def test_the_sizes_a_model_offers_are_its_attention_levels_finest_first():
    assert map_sizes_of(SD15) == ["latent/1", "latent/2", "latent/4", "latent/8"]
    assert map_sizes_of(SDXL) == ["latent/2", "latent/4"]
    assert map_sizes_of(list(reversed(SCENES))) == ["latent/1", "latent/2"]


def test_the_problem_names_the_input_the_size_given_what_the_model_has_and_what_auto_means_there():
    text = map_size_problem(SCENES, "mask_map_size", "latent/8")
    assert "`mask_map_size`" in text and "'latent/8'" in text
    assert "latent/1, latent/2" in text and "(here latent/2)" in text


def test_a_layers_grid_rounds_up_as_a_padded_downsampling_does():
    layer = layout(2)[0]
    assert layer.grid(13, 9) == (4, 3) and layer.grid(16, 16) == (4, 4)


def attend(q, k, mask):
    return torch.softmax(q @ k.transpose(-1, -2) + (0 if mask is None else mask), dim=-1)


def test_the_photos_row_keeps_its_own_attention_when_keys_are_appended():
    torch.manual_seed(0)
    rows, length, extra = 3, 6, 4
    q, k = torch.randn(rows, 1, 5, 8), torch.randn(rows, 1, length + extra, 8)
    mask = extended_mask(None, rows, length, extra, [0], torch.float32, "cpu")
    probs = attend(q, k, mask)
    own = attend(q[:1], k[:1, :, :length], None)
    assert torch.allclose(probs[:1, :, :, :length], own, atol=1e-6)       # row 0 as if nothing were appended
    assert float(probs[0, :, :, length:].abs().max()) == 0.0
    assert float(probs[1:, :, :, length:].min()) > 0.0                     # the other rows see the appended keys
    assert extended_mask(None, rows, length, extra, [], torch.float32, "cpu") is None


def test_a_models_own_boolean_mask_stays_closed_and_the_appended_columns_open():
    rows, length, extra = 2, 5, 3
    given = torch.ones(rows, 1, 1, length, dtype=torch.bool)
    given[:, :, :, 1] = False                                              # the model closes key 1
    mask = extended_mask(given, rows, length, extra, [0], torch.float32, "cpu")
    assert mask.shape == (rows, 1, 1, length + extra)
    assert torch.isinf(mask[:, :, :, 1]).all()
    assert torch.isinf(mask[0, :, :, length:]).all() and float(mask[1, :, :, length:].abs().max()) == 0.0
    assert float(mask[1, :, :, [0, 2, 3, 4]].abs().max()) == 0.0
