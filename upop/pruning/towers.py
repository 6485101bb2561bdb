"""Restricting the search to some towers (``--towers vision,language``).

The search ranks only the named towers' units; every other module keeps all its units, so its weights come out of
slimming as they went in. The ratio is then a share of the named towers' compressible cost. The towers left out
are not trained either (``freeze_others``): they come out of the run bit-identical, as a one-tower pruner leaves
the others.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import nn

from ..errors import ConfigError
from .units import ModuleSpec

__all__ = ["freeze_others", "in_towers", "keep_the_rest", "thaw", "tower_names"]


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


def freeze_others(model: nn.Module, tower_of: Callable[[str], str], specs: Sequence[ModuleSpec],
                  towers: str | None) -> list[str]:
    """Stop training the towers left out of the search (their units' towers not named); returns the parameters
    frozen, for ``thaw``. Modules of no unit tower (a projector, a head) train as before."""
    if towers is None:
        return []
    left = {s.tower for s in specs} - set(tower_names(towers))
    names = [n for n, p in model.named_parameters() if p.requires_grad and tower_of(n) in left]
    for n, p in model.named_parameters():
        if n in names:
            p.requires_grad_(False)
    return names


def thaw(model: nn.Module, names: Sequence[str]) -> None:
    """Train the parameters ``freeze_others`` froze again (the model returned is trainable as it came)."""
    wanted = set(names)
    for n, p in model.named_parameters():
        if n in wanted:
            p.requires_grad_(True)
