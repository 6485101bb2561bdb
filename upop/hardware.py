"""What a hardware profile changes in the search: aligned sizes and latency costs (SPEC §3).

Family-agnostic: works from ``ModuleSpec`` shapes and the token counts the adapter reports.
The latency model is a roofline at the profile's reference shapes: a unit's cost is the time
its FLOPs or its bytes (weights and activations) take at the profile's (derated) peaks,
whichever is longer. Predicted latencies come from the same model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import ConfigError, UpopError
from .units import AttentionSpec, ModuleSpec


def allowed_sizes(specs: Sequence[ModuleSpec], granularity: str, profile: Any) -> dict[str, list[int]]:
    """Kept unit counts each module may end with under the profile's alignment."""
    al = profile.alignment
    out: dict[str, list[int]] = {}
    for s in specs:
        n = s.num_units(granularity)
        if isinstance(s, AttentionSpec) and granularity == "dim":
            sizes = [k for k in range(1, n + 1)
                     if k % al.head_dim_multiple == 0 and al.head_dim_min <= k <= al.head_dim_max]
        elif isinstance(s, AttentionSpec):
            sizes = list(range(1, n + 1))  # whole heads keep head_dim as it was
        else:
            sizes = [k for k in range(al.mlp_multiple, n + 1, al.mlp_multiple)]
        out[s.name] = sorted(set(sizes) | {n})
    return out


def _unit_flops_bytes(model: nn.Module, spec: ModuleSpec, granularity: str, tokens: tuple[int, int], batch: int,
                      bytes_per_param: int) -> tuple[float, float]:
    tq, tkv = tokens
    if isinstance(spec, AttentionSpec):
        width = spec.num_heads if granularity == "dim" else spec.head_dim
        flops = 0.0
        for i, proj in enumerate(spec.in_projs):
            lin = model.get_submodule(proj.name)
            if proj.segments == 3:  # fused qkv on the query tokens
                flops += 3 * 2 * batch * tq * lin.in_features
            else:
                flops += 2 * batch * (tq if i == 0 else tkv) * lin.in_features
        flops += 2 * batch * tq * model.get_submodule(spec.out_proj).out_features
        flops += 2 * 2 * batch * tq * tkv  # q·kᵀ and p·v, per head dimension
        acts = batch * (2 * tq + 2 * tkv)
        flops, acts = flops * width, acts * width
    else:
        fc1, fc2 = model.get_submodule(spec.fc1), model.get_submodule(spec.fc2)
        flops = 2 * batch * tq * (fc1.in_features + fc2.out_features)
        acts = 2 * batch * tq
    params = spec.unit_cost(model, granularity)
    return flops, (params + acts) * bytes_per_param


def _table_block(model: nn.Module, adapter: Any, spec: ModuleSpec, granularity: str, profile: Any) -> dict[str, Any]:
    from .calibrate import signature

    sig = signature(model, adapter, spec, granularity, profile.shapes.text_tokens)
    # The dimension being pruned changes with slimming; the block is found by everything else.
    sig.pop("head_dim" if granularity == "dim" else "heads", None)
    for b in profile.table.get("blocks", []):
        if all(b.get(k) == v for k, v in sig.items()):
            return b
    raise ProfileMismatch(f"profile {profile.name} has no measured block for {spec.name} ({sig}); "
                          "calibrate it for this model")


class ProfileMismatch(UpopError):
    """A calibrated profile measured other blocks than this model has."""


def _block_ms(model: nn.Module, adapter: Any, spec: ModuleSpec, granularity: str, profile: Any, width: int) -> float:
    from .calibrate import interpolate

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
        flops, nbytes = _unit_flops_bytes(model, s, granularity, tokens, profile.shapes.batch, profile.bytes_per_param)
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


@dataclass
class HardwarePlan:
    """What a profile makes of one run: aligned sizes, latency costs, and the ratio (chosen to meet a
    latency target when one is given)."""

    profile: Any
    unit_costs: dict[str, float]
    allowed: dict[str, list[int]]
    ratio: float
    predicted_ms_before: float
    target_ms: float | None = None

    def applied(self, config: Any) -> Any:
        """A copy of ``config`` with the plan's ratio (the caller's config is left as it was)."""
        out = dataclasses.replace(config, search=dataclasses.replace(config.search),
                                  retrain=dataclasses.replace(config.retrain))
        out.ratio = out.search.ratio = self.ratio
        return out

    def report(self, predicted_ms_after: float | None = None) -> dict[str, Any]:
        out = {"profile": self.profile.name, "latency_model": self.profile.latency_model,
               "predicted_ms_before": self.predicted_ms_before, "target_ms": self.target_ms,
               "predicted_ms_after": predicted_ms_after}
        if self.target_ms is not None and predicted_ms_after is not None:
            out["target_met"] = predicted_ms_after <= self.target_ms * 1.0001
        return out


def plan_hardware(model: nn.Module, adapter: Any, specs: Sequence[ModuleSpec], granularity: str, ratio: float,
                  profile: Any, target_ms: float | None = None) -> HardwarePlan:
    """Aligned sizes and latency costs from the profile; with a latency target, the ratio that meets it:
    the share of the *compressible* latency (what the units' costs add up to) the target removes, so a
    calibrated profile's fixed rest of the model is not counted as removable."""
    if profile.alignment.whole_heads and granularity != "head":
        raise ConfigError(f"profile {profile.name} keeps whole heads only: use --granularity head")
    costs = unit_latency_costs(model, adapter, specs, granularity, profile)
    before = predicted_latency_ms(model, adapter, profile, granularity)
    if target_ms is not None:
        compressible = 1000.0 * sum(costs[s.name] * s.num_units(granularity) for s in specs)
        ratio = (before - target_ms) / compressible
        if ratio <= 0:
            raise ConfigError(f"the model already meets {target_ms} ms on {profile.name} (predicted {before:.3f} ms)")
        if ratio >= 0.95:
            raise ConfigError(f"{target_ms} ms on {profile.name} would remove {ratio:.0%} of the compressible "
                              f"latency (predicted {before:.3f} ms); choose a looser target")
    return HardwarePlan(profile=profile, unit_costs=costs, allowed=allowed_sizes(specs, granularity, profile),
                        ratio=ratio, predicted_ms_before=before, target_ms=target_ms)
