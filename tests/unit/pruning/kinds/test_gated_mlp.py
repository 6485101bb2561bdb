"""The gated MLP (SwiGLU): ζ on up_proj folds exactly; a unit's cost is the parameters it removes."""

import torch

from upop.pruning.kinds import GatedMLPSpec, from_dict
from upop.pruning.masks import MaskSet
from upop.pruning.slim import slim_model

from .decoders import Patcher, decoder_specs, ids, tiny_decoder


def test_gated_mlp_alone_slims_to_the_masked_model_with_values_folded():
    model = tiny_decoder("qwen2")
    specs = [s for s in decoder_specs(model) if isinstance(s, GatedMLPSpec)]
    masks = MaskSet(model, specs, "dim")
    kept = {s.name: list(range(0, s.width, 3)) for s in specs}
    with torch.no_grad():
        for spec, z in masks.items():
            z.zero_()
            z[kept[spec.name]] = torch.linspace(0.2, 1.7, len(kept[spec.name]))
        masked = model(input_ids=ids()).last_hidden_state
    zeta = masks.values()
    masks.remove()
    slim_model(model, specs, kept, "dim", Patcher(), zeta=zeta)
    with torch.no_grad():
        slim = model(input_ids=ids()).last_hidden_state
    assert (masked - slim).abs().max() <= 1e-5
    assert model.layers[0].mlp.gate_proj.out_features == model.layers[0].mlp.up_proj.out_features == 16


def test_gated_mlp_unit_cost_and_manifest():
    model = tiny_decoder("llama")
    specs = [s for s in decoder_specs(model) if isinstance(s, GatedMLPSpec)]
    before = sum(p.numel() for p in model.parameters())
    cost = sum(s.unit_cost(model, "dim") * (s.width - 2) for s in specs)
    slim_model(model, specs, {s.name: [0, 1] for s in specs}, "dim", Patcher())
    assert before - sum(p.numel() for p in model.parameters()) == cost
    assert from_dict(specs[0].to_dict()) == specs[0]
    assert specs[0].manifest_row()["kind"] == "gated_mlp"
