"""The parts of a family's contract, each a typed capability.

``Adapter`` (``base.py``) implements all of them for one family; each caller is typed by the part it uses:

- ``PruningContract``: the compressible modules as unit kinds (``upop.pruning.kinds``), the size patches a kind calls
  after slicing, towers, token counts for the latency model, the layers feature distillation compares.
- ``ModelBuilding``: the model classes of the family, building one from a config, synthetic inputs and the
  outputs that define its function (tests, FLOP counting, parity checks).
- ``TaskHooks``: what the tasks (``upop.tasks``) and the demo trainer call.
- Export graphs: registered per model class beside the family (``graphs.py``'s ``graphs_for``).
- Models built from scratch (demos, test fixtures): ``factories.ModelFactory``, mixed into the adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from ..pruning.kinds import UnitKind


@runtime_checkable
class PruningContract(Protocol):
    family: str

    def modules(self, model: nn.Module) -> list[UnitKind]: ...

    def tower_of(self, path: str) -> str: ...

    def patch_attention(self, model: nn.Module, spec: Any, num_heads: int, head_dim: int) -> None: ...

    def patch_mlp(self, model: nn.Module, spec: Any, width: int) -> None: ...

    def patch_gqa(self, model: nn.Module, spec: Any, kept: Sequence[int], granularity: str) -> None: ...

    def module_tokens(self, model: nn.Module, spec: UnitKind, text_tokens: int) -> tuple[int, int]: ...

    def drop_path_branches(self, model: nn.Module) -> list[list[nn.Module]]: ...

    def module_items(self, model: nn.Module, spec: UnitKind) -> int: ...

    def feature_layers(self, model: nn.Module) -> list[str]: ...


@runtime_checkable
class ModelBuilding(Protocol):
    family: str
    classes: dict[str, str]

    def model_class(self, name: str) -> type[nn.Module]: ...

    def check_class(self, model: nn.Module) -> None: ...

    def class_for_task(self, task: str) -> str: ...

    def task_of(self, model: nn.Module) -> str: ...

    def build(self, class_name: str, config: Any) -> nn.Module: ...

    def config_from_dict(self, data: dict[str, Any]) -> Any: ...

    def example_inputs(self, model: nn.Module, batch_size: int = 2, seq_len: int = 8,
                       generator: torch.Generator | None = None) -> dict[str, torch.Tensor]: ...

    def forward_outputs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class RetrievalHooks(Protocol):
    """What retrieval and zero-shot tasks call to embed images and texts, score pairs and re-rank with ITM."""

    family: ClassVar[str]

    def encode_image(self, model: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]: ...

    def encode_text(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...

    def itm_logits(self, model: nn.Module, image_seq: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor: ...

    def pair_logits(self, model: nn.Module, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor: ...

    def pair_loss(self, i2t: torch.Tensor, t2i: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def itc_temperature(self, model: nn.Module, value: float = ...) -> nn.Parameter: ...


@runtime_checkable
class TaskHooks(RetrievalHooks, Protocol):
    """Everything a task (``upop.tasks``) or the demo trainer may call on its family's adapter.

    ``Adapter`` declares each one; a family without the capability raises a one-line error naming it.
    """

    tasks: ClassVar[dict[str, str]]
    classes: ClassVar[dict[str, str]]
    augment_policy: ClassVar[str | None]

    def preprocessor_options(self, model: nn.Module) -> dict[str, Any]: ...

    def native_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def init_from(self, source: nn.Module) -> nn.Module: ...
