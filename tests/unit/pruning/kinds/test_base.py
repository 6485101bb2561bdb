"""The kind registry and what every shipped kind declares."""

import pytest
import torch

from upop.latency.calibrate import time_block
from upop.errors import UpopError
from upop.pruning.kinds import ATTENTION, GROUPS, KINDS, MLP, kind_named

from .decoders import decoder_specs, tiny_decoder


def test_every_shipped_kind_is_registered_with_a_sparsity_group():
    assert {"attn", "mlp", "gqa", "gated_mlp"} <= set(KINDS)
    assert {KINDS["attn"].group, KINDS["gqa"].group} == {ATTENTION}
    assert {KINDS["mlp"].group, KINDS["gated_mlp"].group} == {MLP}
    assert all(k.group in GROUPS for k in KINDS.values())


def test_an_unknown_kind_name_is_one_clear_error():
    with pytest.raises(UpopError, match="unit kind 'conv' is not known"):
        kind_named("conv")


@pytest.mark.parametrize("gran", ["head", "dim"])
def test_gqa_and_gated_mlp_calibration_blocks_run_at_every_width(gran):
    model = tiny_decoder("llama")
    for s in decoder_specs(model)[:2]:
        sig = {**s.signature(model, gran), "tq": 5, "tkv": 5}
        for w in (1, s.num_units(gran)):
            assert time_block(sig, w, 2, torch.device("cpu"), warmup=0, runs=1) > 0
            d_x, _ = kind_named(sig["kind"]).block_widths(sig)
            out = kind_named(sig["kind"]).block(sig, w)(torch.randn(2, 5, d_x), torch.randn(2, 5, d_x))
            assert out.shape == (2, 5, sig["d_out"])


def test_report_rows_and_shape_text_come_from_the_kind():
    from upop.run.report import module_rows

    model = tiny_decoder("llama")
    specs = decoder_specs(model)[:2]
    rows = module_rows(specs, {specs[0].name: [0], specs[1].name: [0, 1, 2]}, "head")
    assert rows[0] | {} == rows[0] and rows[0]["num_heads"] == 2 and rows[0]["num_kv_heads"] == 1
    assert kind_named(rows[0]["kind"]).shape_text(rows[0]) == "2 q / 1 kv × 8"
    assert kind_named(rows[1]["kind"]).shape_text(rows[1]) == "3"


def test_hardware_alignment_counts_rotary_pairs_as_two_dimensions():
    from types import SimpleNamespace

    model = tiny_decoder("llama")
    gqa = decoder_specs(model)[0]
    al = SimpleNamespace(head_dim_multiple=4, head_dim_min=4, head_dim_max=8, mlp_multiple=16)
    assert gqa.allowed_sizes("dim", al) == [2, 4]  # head_dim 4 and 8
    assert gqa.allowed_sizes("head", al) == [1, 2]
    assert decoder_specs(model)[1].allowed_sizes("dim", al) == [16, 32, 48]


@pytest.mark.parametrize("gran", ["head", "dim"])
def test_the_roofline_counts_every_unit_of_a_gqa_and_gated_mlp_stack(gran):
    model = tiny_decoder("qwen2")
    for s in decoder_specs(model):
        flops, acts = s.unit_flops_acts(model, gran, 5, 5, 2)
        assert flops > 0 and acts > 0
