"""The kind registry and what every shipped kind declares."""

import pytest
import torch

from upop.calibrate import time_block
from upop.errors import UpopError
from upop.kinds import ATTENTION, GROUPS, KINDS, MLP, kind_named

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
