"""The latency model: what a unit of a module costs on a hardware profile, and what a model is predicted to take.

Two models, both family-agnostic (``ModuleSpec`` shapes and the token counts the adapter reports):
a roofline at the profile's reference shapes (a unit's cost is the time its FLOPs or its bytes,
weights and activations, take at the profile's derated peaks, whichever is longer), and a table
measured by calibration (a block's time interpolated in its kept width, plus the measured rest of
the model). ``hardware`` (aligned sizes, the plan of a run) and ``calibrate`` (measuring the table)
both build on this module; it imports neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..pruning.units import ModuleSpec
from ..errors import ProfileMismatch  # noqa: F401  (defined with every error, raised and re-exported here)


def signature(model: nn.Module, adapter: Any, spec: ModuleSpec, granularity: str, text_tokens: int) -> dict[str, Any]:
    """What a block's latency depends on, besides its kept width."""
    tq, tkv = adapter.module_tokens(model, spec, text_tokens)
    items = adapter.module_items(model, spec)
    tq, tkv = spec.block_tokens(tq, tkv)
    sig = {**spec.signature(model, granularity), "tq": tq, "tkv": tkv}
    if items != 1:  # only then: profiles calibrated before this key existed still match every other block
        sig["items"] = items
    return sig


def interpolate(widths: Sequence[int], ms: Sequence[float], w: float) -> float:
    """Piecewise-linear in the width, extended linearly below the smallest measured width."""
    if w <= widths[0]:
        if len(widths) == 1:
            return ms[0] * w / widths[0]
        slope = (ms[1] - ms[0]) / (widths[1] - widths[0])
        return max(0.0, ms[0] + slope * (w - widths[0]))
    for (w0, m0), (w1, m1) in zip(zip(widths, ms), zip(widths[1:], ms[1:])):
        if w <= w1:
            return m0 + (m1 - m0) * (w - w0) / (w1 - w0)
    return ms[-1]


def _unit_flops_bytes(model: nn.Module, spec: ModuleSpec, granularity: str, tokens: tuple[int, int], batch: int,
                      bytes_per_param: int) -> tuple[float, float]:
    flops, acts = spec.unit_flops_acts(model, granularity, tokens[0], tokens[1], batch)
    params = spec.unit_cost(model, granularity)
    return flops, (params + acts) * bytes_per_param


def _table_block(model: nn.Module, adapter: Any, spec: ModuleSpec, granularity: str, profile: Any) -> dict[str, Any]:
    sig = signature(model, adapter, spec, granularity, profile.shapes.text_tokens)
    # The dimension being pruned changes with slimming; the block is found by everything else.
    sig.pop("head_dim" if granularity == "dim" else "heads", None)
    for b in profile.table.get("blocks", []):
        if all(b.get(k) == v for k, v in sig.items()):
            return b
    raise ProfileMismatch(f"profile {profile.name} has no measured block for {spec.name} ({sig}); "
                          "calibrate it for this model")



def _block_ms(model: nn.Module, adapter: Any, spec: ModuleSpec, granularity: str, profile: Any, width: int) -> float:
    b = _table_block(model, adapter, spec, granularity, profile)
    return interpolate(b["widths"], b["ms"], width)


def unit_latency_costs(model: nn.Module, adapter: Any, specs: Sequence[ModuleSpec], granularity: str,
                       profile: Any) -> dict[str, float]:
    """Seconds one unit of each module takes: the measured slope of its block under a calibrated
    profile, else the roofline."""
    out = {}
    if profile.latency_model == "table":
        for s in specs:
            b = _table_block(model, adapter, s, granularity, profile)
            out[s.name] = max(1e-12, (b["ms"][-1] - b["ms"][0]) / max(1, b["widths"][-1] - b["widths"][0])) / 1000
        return out
    for s in specs:
        tokens = adapter.module_tokens(model, s, profile.shapes.text_tokens)
        batch = profile.shapes.batch * adapter.module_items(model, s)
        flops, nbytes = _unit_flops_bytes(model, s, granularity, tokens, batch, profile.bytes_per_param)
        out[s.name] = max(flops / profile.peak_flops, nbytes / profile.bandwidth)
    return out


def predicted_latency_ms(model: nn.Module, adapter: Any, profile: Any, granularity: str = "dim") -> float:
    """Predicted latency of the model as it is now. Calibrated profile: measured blocks at their kept
    widths plus the measured rest of the model. Roofline: the compressible modules only."""
    specs = adapter.modules(model)
    if profile.latency_model == "table":
        return float(profile.table.get("rest_ms", 0.0)) + sum(
            _block_ms(model, adapter, s, granularity, profile, s.num_units(granularity)) for s in specs)
    costs = unit_latency_costs(model, adapter, specs, granularity, profile)
    return 1000.0 * sum(costs[s.name] * s.num_units(granularity) for s in specs)
