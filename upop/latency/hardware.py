"""What a hardware profile changes in the search: aligned sizes, latency costs and the ratio for a target.

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

from ..errors import ConfigError
from .model import ProfileMismatch, predicted_latency_ms, unit_latency_costs
from ..pruning.units import ModuleSpec

__all__ = ["HardwarePlan", "ProfileMismatch", "allowed_sizes", "plan_hardware", "predicted_latency_ms",
           "unit_latency_costs"]


def allowed_sizes(specs: Sequence[ModuleSpec], granularity: str, profile: Any) -> dict[str, list[int]]:
    """Kept unit counts each module may end with under the profile's alignment."""
    al = profile.alignment
    out: dict[str, list[int]] = {}
    for s in specs:
        out[s.name] = sorted(set(s.allowed_sizes(granularity, al)) | {s.num_units(granularity)})
    return out


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
            out["missed_by_ms"] = max(0.0, predicted_ms_after - self.target_ms)
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
