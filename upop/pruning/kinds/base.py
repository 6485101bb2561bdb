"""What every unit kind provides, and the registry that finds a kind by the name it writes in files.

A unit kind is one structural shape of compressible module (multi-head attention, grouped-query
attention, a plain or a gated MLP). An adapter describes a model as a list of kind instances; the
masks, the search, the slimming, the FLOP and latency models and the reports call only the methods
declared here, so a new shape is one new file in this package and no edit of the core.

``group`` is the paper's sparsity term a kind's masks join: every attention-like kind is in
``ATTENTION`` (λ_attn, z-scored together), every MLP-like kind in ``MLP`` (λ_mlp).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, cast

import torch
from torch import nn

ATTENTION = "attn"
MLP = "mlp"
GROUPS = (ATTENTION, MLP)

#: kind name (as written in manifests, reports and latency tables) -> class
KINDS: dict[str, type["UnitKind"]] = {}


class SizePatcher(Protocol):
    """The family's size patches, called by a kind after it sliced the Linears (``upop.adapters.Adapter``)."""

    def patch_attention(self, model: nn.Module, spec: Any, num_heads: int, head_dim: int) -> None: ...

    def patch_mlp(self, model: nn.Module, spec: Any, width: int) -> None: ...

    def patch_gqa(self, model: nn.Module, spec: Any, kept: Sequence[int], granularity: str) -> None: ...


class UnitKind(ABC):
    """One compressible module of one structural shape (subclasses are frozen dataclasses)."""

    kind: ClassVar[str]
    group: ClassVar[str]
    name: str  # the module the family's size patch finds
    tower: str
    role: str

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if "kind" in cls.__dict__:
            KINDS[cls.kind] = cls

    # ---- units ----------------------------------------------------------------------------------
    @abstractmethod
    def num_units(self, granularity: str) -> int: ...

    @abstractmethod
    def unit_cost(self, model: nn.Module, granularity: str) -> float:
        """Parameters one unit removes, read from the real layers."""

    @abstractmethod
    def linears(self) -> list[str]:
        """Every Linear the module's units slice (their parameters are the compressible ones)."""

    # ---- masks and slimming ------------------------------------------------------------------------
    @abstractmethod
    def attach(self, model: nn.Module, zeta: nn.Parameter, granularity: str) -> list[Any]:
        """Forward hooks that scale the module's units by ``zeta``; returns their handles."""

    @abstractmethod
    def slim(self, model: nn.Module, keep: list[int], granularity: str, fold: torch.Tensor | None,
             patcher: SizePatcher) -> None:
        """Slice the Linears to the ``keep`` units (sorted), fold the kept mask values ``fold`` in, patch sizes."""

    @abstractmethod
    def magnitude(self, model: nn.Module, granularity: str) -> torch.Tensor:
        """Per-unit L1 weight of the rows and columns a unit owns (the uniform baseline's score)."""

    # ---- shapes for reports, manifests, hardware -------------------------------------------------
    @abstractmethod
    def shape(self) -> dict[str, int]:
        """The module's sizes now (manifest and ``upop inspect``)."""

    def kept_fields(self, n_kept: int, granularity: str) -> dict[str, int]:
        """Sizes after keeping ``n_kept`` units, for the report's row (none by default)."""
        return {}

    @classmethod
    def shape_text(cls, row: dict[str, Any]) -> str:
        """The sizes of a report or inspect row as a person reads them."""
        return str(row.get("width", row.get("kept")))

    def paper_cost(self, attn_weight: float, granularity: str) -> float:
        """The reference's cost weighting: an MLP neuron weighs 1 (``upop.pruning.search.paper_unit_costs``)."""
        return 1.0

    @abstractmethod
    def allowed_sizes(self, granularity: str, alignment: Any) -> list[int]:
        """Kept unit counts allowed under a hardware profile's alignment (the full count is added by the caller)."""

    def manifest_row(self) -> dict[str, Any]:
        return {"kind": self.kind, "tower": self.tower, "role": self.role, **self.shape()}

    # ---- latency ---------------------------------------------------------------------------------------
    @abstractmethod
    def signature(self, model: nn.Module, granularity: str) -> dict[str, Any]:
        """What the block's latency depends on besides tokens and its kept width (``kind`` first)."""

    @abstractmethod
    def unit_flops_acts(self, model: nn.Module, granularity: str, tq: int, tkv: int, batch: int) -> tuple[float, float]:
        """(FLOPs, activation elements) one unit accounts for in a forward at these token counts."""

    def block_tokens(self, tq: int, tkv: int) -> tuple[int, int]:
        """(query, key/value) tokens of the block's latency signature: a block reading only its input (an MLP)
        sees its query tokens twice."""
        return tq, tq

    @classmethod
    @abstractmethod
    def block(cls, sig: dict[str, Any], width: int) -> nn.Module:
        """A stand-alone block of this kind at ``sig``'s sizes keeping ``width`` units: ``forward(x, kv)``."""

    @classmethod
    def block_widths(cls, sig: dict[str, Any]) -> tuple[int, int | None]:
        """Feature widths of the block's inputs: queries, and keys/values (None: the block reads only ``x``)."""
        return sig["d_in"], None

    @classmethod
    def log_text(cls, sig: dict[str, Any]) -> str:
        return f"{sig['kind']} {cls.block_widths(sig)[0]}→{sig['d_out']} tokens {sig['tq']}"

    # ---- files -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UnitKind":
        return cls(**{k: v for k, v in data.items() if k != "kind"})  # type: ignore[call-arg]


def kind_named(name: str) -> type[UnitKind]:
    from ...errors import ConfigError

    if name not in KINDS:
        raise ConfigError(f"unit kind {name!r} is not known; known kinds: {', '.join(sorted(KINDS))}")
    return KINDS[name]


def from_dict(data: dict[str, Any]) -> UnitKind:
    """A unit kind instance back from ``to_dict``'s output."""
    return kind_named(str(data.get("kind"))).from_dict(data)


# ---- Linear surgery and masking shared by the kinds -----------------------------------------------------
def linear(model: nn.Module, name: str) -> nn.Linear:
    """The Linear at ``name`` (a kind's projections are Linears by contract)."""
    return cast(nn.Linear, model.get_submodule(name))


def keep_rows(lin: nn.Linear, idx: torch.Tensor, scale: torch.Tensor | None) -> None:
    """Keep output rows ``idx`` of ``lin``, each multiplied by ``scale`` (ζ·(Wx + b) = (ζW)x + ζb)."""
    idx = idx.to(lin.weight.device)
    w = lin.weight.detach()[idx].clone()
    b = lin.bias.detach()[idx].clone() if lin.bias is not None else None
    if scale is not None:
        scale = scale.to(w.device, w.dtype)
        w *= scale[:, None]
        if b is not None:
            b *= scale
    lin.weight = nn.Parameter(w, requires_grad=lin.weight.requires_grad)
    if b is not None:
        lin.bias = nn.Parameter(b, requires_grad=lin.bias.requires_grad)  # type: ignore[union-attr]
    lin.out_features = int(idx.numel())


def keep_cols(lin: nn.Linear, idx: torch.Tensor) -> None:
    idx = idx.to(lin.weight.device)
    lin.weight = nn.Parameter(lin.weight.detach()[:, idx].clone(), requires_grad=lin.weight.requires_grad)
    lin.in_features = int(idx.numel())


def row_cost(lin: nn.Linear) -> int:
    """Parameters of one output row (its weights and bias)."""
    return lin.in_features + (1 if lin.bias is not None else 0)


def row_l1(model: nn.Module, name: str) -> torch.Tensor:
    return linear(model, name).weight.detach().abs().sum(1).double().cpu()


def col_l1(model: nn.Module, name: str) -> torch.Tensor:
    return linear(model, name).weight.detach().abs().sum(0).double().cpu()


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


def output_mask_hook(expand: Any):
    """A forward hook scaling a Linear's output by ``expand()`` (a per-feature mask built at each call,
    so it follows ζ as the search changes it)."""
    def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return mask_last_axis(output, expand())

    return hook
