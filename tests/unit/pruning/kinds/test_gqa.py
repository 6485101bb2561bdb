"""Grouped-query attention with rotary embeddings: masked model == slim model, at both granularities."""

from dataclasses import dataclass

import pytest
import torch

from upop.pruning.kinds import GQASpec, from_dict
from upop.pruning.masks import MaskSet
from upop.pruning.slim import slim_model

from .decoders import DECODERS, Patcher, decoder_specs, ids, tiny_decoder


def _mask_and_slim(model, specs, gran, kept, values=None):
    """(masked output, slim output): ζ zero outside ``kept``, ``values`` (or 1) on it."""
    x = ids()
    masks = MaskSet(model, specs, gran)
    with torch.no_grad():
        for spec, z in masks.items():
            z.zero_()
            keep = kept[spec.name]
            z[keep] = 1.0 if values is None else values[spec.name]
        masked = model(input_ids=x).last_hidden_state
    zeta = masks.values()
    masks.remove()
    slim_model(model, specs, kept, gran, Patcher(), zeta=zeta)
    with torch.no_grad():
        return masked, model(input_ids=x).last_hidden_state


def _kept(specs, gran, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, s in enumerate(specs):
        n = s.num_units(gran)
        k = 1 if i == 0 else int(torch.randint(1, n + 1, (1,), generator=g))
        out[s.name] = sorted(torch.randperm(n, generator=g)[:k].tolist())
    return out


@pytest.mark.parametrize("gran", ["head", "dim"])
@pytest.mark.parametrize("model_type", DECODERS)
def test_gqa_and_gated_mlp_slim_to_the_masked_model(model_type, gran):
    model = tiny_decoder(model_type)
    specs = decoder_specs(model)
    kept = _kept(specs, gran)
    values = {s.name: 0.5 + torch.rand(len(kept[s.name]), generator=torch.Generator().manual_seed(2)) for s in specs}
    masked, slim = _mask_and_slim(model, specs, gran, kept, values)
    assert (masked - slim).abs().max() <= 1e-5
    # the slim model's layers have the kept sizes, and describe themselves that way
    for spec, now in zip(specs, decoder_specs(model)):
        assert now.num_units(gran) == len(kept[spec.name])


def test_a_dim_unit_is_a_rotary_pair_of_every_q_k_and_v_head():
    s = GQASpec(name="a", tower="t", q_proj="q", k_proj="k", v_proj="v", o_proj="o", num_heads=4, num_kv_heads=2,
                head_dim=8)
    assert s.num_units("dim") == 4 and s.num_units("head") == 2
    q, kv = s.feature_index([1, 3], "dim")
    assert kv.tolist() == [1, 3, 5, 7, 9, 11, 13, 15]  # kept first halves, then their partners d + 4
    assert q.numel() == 4 * 4
    q, kv = s.feature_index([1], "head")  # KV head 1 and the query heads 2, 3 that read it
    assert kv.tolist() == list(range(8, 16)) and q.tolist() == list(range(16, 32))


@dataclass(frozen=True)
class _SplitPairs(GQASpec):
    """Single head dimensions as units, ignoring the rotary pairing: what the pair rule prevents."""

    kind = "test-split-pairs"

    def num_units(self, granularity):
        return self.head_dim if granularity == "dim" else super().num_units(granularity)

    def dims(self, kept):
        return torch.tensor(sorted(int(k) for k in kept), dtype=torch.long)

    def expand_mask(self, zeta, granularity):
        return zeta.repeat(self.num_heads), zeta.repeat(self.num_kv_heads)


def test_splitting_a_rotary_pair_breaks_the_slim_model():
    """The same masked model slimmed with pairs split apart (dim 0 kept, its partner 4 dropped, ...)
    computes something else: the pair rule is what makes the slim model exact."""
    model = tiny_decoder("llama")
    specs = [(_SplitPairs(**{k: v for k, v in s.to_dict().items() if k != "kind"}) if isinstance(s, GQASpec) else s)
             for s in decoder_specs(model)]
    kept = {s.name: ([0, 1, 2, 7] if isinstance(s, GQASpec) else list(range(s.width))) for s in specs}
    masked, slim = _mask_and_slim(model, specs, "dim", kept)
    assert (masked - slim).abs().max() > 1e-3


def test_gqa_unit_cost_is_the_parameters_a_unit_removes():
    for gran in ("head", "dim"):
        model = tiny_decoder("qwen2")
        specs = [s for s in decoder_specs(model) if isinstance(s, GQASpec)]
        before = sum(p.numel() for p in model.parameters())
        kept = {s.name: [0] for s in specs}
        costs = sum(s.unit_cost(model, gran) * (s.num_units(gran) - 1) for s in specs)
        slim_model(model, specs, kept, gran, Patcher())
        assert before - sum(p.numel() for p in model.parameters()) == costs


def test_gqa_round_trips_through_its_manifest_dict():
    s = decoder_specs(tiny_decoder("llama"))[0]
    assert from_dict(s.to_dict()) == s
    assert s.manifest_row() == {"kind": "gqa", "tower": "text", "role": "self", "num_heads": 4, "num_kv_heads": 2,
                                "head_dim": 8}


@pytest.mark.parametrize("gran", ["head", "dim"])
def test_magnitude_scores_one_value_per_unit(gran):
    model = tiny_decoder("llama")
    s = decoder_specs(model)[0]
    assert s.magnitude(model, gran).shape == (s.num_units(gran),)
