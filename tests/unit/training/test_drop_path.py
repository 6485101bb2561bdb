"""Stochastic depth on the residual branches of ViT/DeiT blocks (``--drop-path``, DeiT's recipe)."""

from __future__ import annotations

import pytest
import torch

from upop.adapters import all_adapters, get_adapter
from upop.errors import ConfigError
from upop.training.drop_path import drop_path, layer_rates

from ...conftest import build_tiny

OFFERING = [a.family for a in all_adapters() if a.family in ("vit", "deit")]


def test_rates_grow_linearly_from_zero_at_the_first_block_to_the_rate_at_the_last():
    assert layer_rates(0.1, 12)[0] == 0.0 and layer_rates(0.1, 12)[-1] == pytest.approx(0.1)
    assert layer_rates(0.1, 12)[6] == pytest.approx(0.1 * 6 / 11)
    assert layer_rates(0.3, 1) == [0.3]


@pytest.mark.parametrize("family", OFFERING)
def test_each_sample_keeps_or_drops_a_whole_branch_scaled_to_keep_the_expectation(family):
    cls = {"vit": "ViTForImageClassification", "deit": "DeiTForImageClassification"}[family]
    model = build_tiny(family, cls).train()
    adapter = get_adapter(model)
    branches = adapter.drop_path_branches(model)
    assert len(branches) == model.config.num_hidden_layers and all(len(b) == 2 for b in branches)
    mlp = branches[-1][1]
    x = torch.randn(400, 5, model.config.hidden_size)
    plain = mlp(x)
    torch.manual_seed(0)
    with drop_path(model, adapter, 0.5):  # the last block's rate is the rate itself
        dropped = mlp(x)
        model.eval()
        assert torch.equal(mlp(x), plain)  # evaluation never drops
        model.train()
    per_sample = dropped.flatten(1)
    zero = (per_sample == 0).all(dim=1)
    assert torch.allclose(per_sample[~zero], 2 * plain.flatten(1)[~zero], atol=1e-6)  # survivors: × 1 / keep
    assert 0.4 < zero.float().mean() < 0.6
    assert torch.equal(mlp(x), plain)  # the hooks are gone after the run
    first = branches[0][0]
    with drop_path(model, adapter, 0.5):  # the first block's rate is 0
        out = first(x)[0]
    assert torch.equal(out, first(x)[0])


def test_a_family_without_branches_is_refused_in_one_line_naming_those_with_them():
    model = build_tiny("blip", "BlipForImageTextRetrieval")
    with pytest.raises(ConfigError, match=r"--drop-path: blip models do not offer it \(those that do: deit, vit\)"):
        with drop_path(model, get_adapter(model), 0.1):
            pass


def test_the_deit_recipe_trains_with_drop_path_as_deit_does():
    from upop.run.recipe import load_recipe

    recipe = load_recipe("deit-imagenet")
    assert recipe.options["drop_path"] == 0.1
