"""UPop's mask vectors ζ, multiplied into the model through forward hooks.

The masks live outside the model's parameters, so an optimizer built on
``model.parameters()`` never steps them; the search reads their gradients instead.
Attention masks scale q, k and v right after the projections (broadcast over heads for
``dim`` units, over head_dim for ``head`` units); MLP masks scale fc1's output, before
the activation (docs/method.md).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .units import AttentionSpec, MLPSpec, ModuleSpec


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
            zeta = self.zeta[_key(spec.name)]
            if isinstance(spec, AttentionSpec):
                for proj in spec.in_projs:
                    hook = _attention_hook(spec, zeta, proj.segments, self.granularity)
                    self._handles.append(model.get_submodule(proj.name).register_forward_hook(hook))
            elif isinstance(spec, MLPSpec):
                self._handles.append(model.get_submodule(spec.fc1).register_forward_hook(_mlp_hook(zeta)))

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

    def parameters_by_kind(self, kind: str) -> list[nn.Parameter]:
        return [z for s, z in self.items() if s.kind == kind]

    def sparsity(self, kind: str) -> torch.Tensor:
        return sum((z.abs().sum() for z in self.parameters_by_kind(kind)), torch.zeros((), device=self._device()))

    def _device(self) -> torch.device:
        return next(iter(self.zeta.values())).device

    def values(self) -> dict[str, list[float]]:
        return {s.name: z.detach().cpu().tolist() for s, z in self.items()}


class _Masked(torch.autograd.Function):
    """``x * m`` over the last axis, with the mask's gradient computed and summed in fp32.

    Under fp16 autocast, ``grad · x`` can overflow fp16 (its range ends at 65504, and the grad scaler
    multiplies the gradients by up to 2^16) while the weights' gradients do not: that importance would
    be lost. The product is formed in fp32 for fp16 inputs, and every sum accumulates in fp32.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, m)
        return x * m.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        x, m = ctx.saved_tensors
        wide = torch.float32 if grad.dtype == torch.float16 else grad.dtype
        prod = grad.to(wide) * x.to(wide)
        grad_m = prod.reshape(-1, prod.shape[-1]).sum(0, dtype=torch.float32).to(m.dtype)
        return grad * m.to(grad.dtype), grad_m


def mask_last_axis(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``x`` scaled by ``m`` along its last axis (the mask's gradient in fp32 whatever x's dtype)."""
    return _Masked.apply(x, m)


def _attention_hook(spec: AttentionSpec, zeta: nn.Parameter, segments: int, granularity: str):
    def hook(_module: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor:
        m = spec.expand_mask(zeta, granularity)
        if segments > 1:
            m = m.repeat(segments)
        return mask_last_axis(output, m)

    return hook


def _mlp_hook(zeta: nn.Parameter):
    def hook(_module: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor:
        return mask_last_axis(output, zeta)

    return hook
