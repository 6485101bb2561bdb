"""UPop's mask vectors ζ, multiplied into the model through forward hooks.

The masks live outside the model's parameters, so an optimizer built on
``model.parameters()`` never steps them; the search reads their gradients instead.
Where a mask multiplies in is its unit kind's business (``upop.pruning.kinds``): attention masks scale q, k and v
right after the projections, MLP masks the hidden layer before the activation (docs/method.md).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .kinds import mask_last_axis
from .units import ModuleSpec

__all__ = ["MaskSet", "mask_last_axis", "masks_of"]


#: the MaskSet whose hooks are on a model, while they are (a companion model, such as a momentum copy, is
#: masked with the same ζ through ``attach``)
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, MaskSet]" = weakref.WeakKeyDictionary()


def masks_of(model: nn.Module) -> "MaskSet | None":
    """The MaskSet attached to ``model``, or None."""
    return _ACTIVE.get(model)


def _key(name: str) -> str:
    # ParameterDict keys cannot contain dots.
    return name.replace(".", "__")


class MaskSet(nn.Module):
    """One ζ vector per compressible module, attached to ``model`` while active."""

    def __init__(self, model: nn.Module, specs: Sequence[ModuleSpec], granularity: str):
        super().__init__()
        self.specs = list(specs)
        self.granularity = granularity
        ref = next(model.parameters())
        self.zeta = nn.ParameterDict(
            {
                _key(s.name): nn.Parameter(torch.ones(s.num_units(granularity), device=ref.device, dtype=torch.float32))
                for s in self.specs
            }
        )
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._attach(model)
        self._models = [weakref.ref(model)]
        _ACTIVE[model] = self

    def __getitem__(self, name: str) -> nn.Parameter:
        return self.zeta[_key(name)]

    def items(self) -> Iterator[tuple[ModuleSpec, nn.Parameter]]:
        for s in self.specs:
            yield s, self.zeta[_key(s.name)]

    def _attach(self, model: nn.Module) -> None:
        for spec in self.specs:
            self._handles += spec.attach(model, self.zeta[_key(spec.name)], self.granularity)

    def attach(self, other: nn.Module) -> None:
        """Masks ``other`` (a model of the same structure, e.g. a momentum copy) with these same ζ tensors,
        until ``remove``."""
        self._attach(other)
        self._models.append(weakref.ref(other))
        _ACTIVE[other] = self

    def remove(self) -> None:
        """Detach every hook: the model computes its unmasked function again."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for ref in getattr(self, "_models", ()):
            m = ref()
            if m is not None and _ACTIVE.get(m) is self:
                del _ACTIVE[m]

    def parameters_by_group(self, group: str) -> list[nn.Parameter]:
        """The masks of every kind in sparsity ``group`` (``upop.pruning.kinds.ATTENTION`` or ``MLP``)."""
        return [z for s, z in self.items() if s.group == group]

    def sparsity(self, group: str) -> torch.Tensor:
        """‖ζ‖₁ over the masks of one sparsity group (the term its λ multiplies)."""
        return sum((z.abs().sum() for z in self.parameters_by_group(group)), torch.zeros((), device=self._device()))

    def _device(self) -> torch.device:
        return next(iter(self.zeta.values())).device

    def values(self) -> dict[str, list[float]]:
        return {s.name: z.detach().cpu().tolist() for s, z in self.items()}
