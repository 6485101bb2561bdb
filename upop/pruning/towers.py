"""Restricting the search to some towers (``--towers vision,language``).

The search ranks only the named towers' units; every other module keeps all its units, so its weights come out of
slimming as they went in. The ratio is then a share of the named towers' compressible cost.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..errors import ConfigError
from .units import ModuleSpec

__all__ = ["in_towers", "keep_the_rest", "tower_names"]


def tower_names(towers: str) -> list[str]:
    """``"vision,language"`` -> ``["vision", "language"]`` (blanks around the commas ignored)."""
    return [t.strip() for t in towers.split(",") if t.strip()]


def in_towers(specs: Sequence[ModuleSpec], towers: str | None) -> list[ModuleSpec]:
    """The modules of the named towers (all of them when ``towers`` is None); a tower the model lacks is one line."""
    if towers is None:
        return list(specs)
    have = list(dict.fromkeys(s.tower for s in specs))
    unknown = [t for t in tower_names(towers) if t not in have]
    if unknown:
        raise ConfigError(f"--towers: this model has no tower {', '.join(unknown)}; its towers: {', '.join(have)}")
    wanted = set(tower_names(towers))
    return [s for s in specs if s.tower in wanted]


def keep_the_rest(kept: Mapping[str, Sequence[int]], specs: Sequence[ModuleSpec],
                  granularity: str) -> dict[str, list[int]]:
    """``kept`` with every module it does not name keeping all its units (the towers the search left alone)."""
    return {s.name: list(kept[s.name]) if s.name in kept else list(range(s.num_units(granularity))) for s in specs}
