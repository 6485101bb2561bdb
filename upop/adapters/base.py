"""What every family adapter provides, and the registry that picks one by ``model_type``.

An adapter is the pruning contract of one family (its classes, compressible modules, size
patching, example inputs and native loss) plus the task hooks its tasks call (``TaskHooks``).
Two capabilities live beside it, each in its own registry or mixin: the deployment graphs per model
class, which a family registers in its own file (``graphs.py``'s ``graphs_for``; the exporters look them
up), and the configs and processors for models built from scratch (the demo models, test fixtures) in
``factories.py``. ``capabilities.py`` names each part of the contract as a Protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..pruning.kinds import AttentionSpec, InProj, MLPSpec, patch_rotary_attention
from ..pruning.units import ModuleSpec
from .capabilities import RetrievalHooks, TaskHooks

__all__ = ["Adapter", "RetrievalHooks", "TaskHooks", "all_adapters", "get_adapter", "register"]

_REGISTRY: dict[str, "Adapter"] = {}


def register(cls: type["Adapter"]) -> type["Adapter"]:
    inst = cls()
    for mt in cls.model_types:
        _REGISTRY[mt] = inst
    return cls


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def all_adapters() -> list["Adapter"]:
    seen: dict[str, Adapter] = {}
    for a in _REGISTRY.values():
        seen[a.family] = a
    return [seen[k] for k in sorted(seen)]


def all_aliases() -> dict[str, str]:
    """Every registered family's short names for well-known public checkpoints (alias -> hub id)."""
    return {k: v for a in all_adapters() for k, v in a.aliases.items()}


def get_adapter(model_or_config: Any) -> "Adapter":
    """The adapter for a model, a config, or a ``model_type`` string."""
    if isinstance(model_or_config, str):
        model_type = model_or_config
    else:
        config = getattr(model_or_config, "config", model_or_config)
        model_type = getattr(config, "model_type", None)
    adapter = _REGISTRY.get(model_type or "")
    if adapter is None:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; supported model types: {', '.join(supported_model_types())}"
        )
    if isinstance(model_or_config, nn.Module):
        adapter.check_class(model_or_config)
    return adapter


class Adapter:
    """One model family: how to find its compressible modules and how to patch them after slimming.

    Subclasses name the model classes they handle (with the task each defaults to) and map
    top-level submodules to towers. The core calls only the methods defined here; the tasks call
    the ``TaskHooks`` among them.
    """

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    #: class name -> default task
    classes: ClassVar[dict[str, str]]
    #: first attribute of a module path -> tower name
    towers: ClassVar[dict[str, str]]
    #: task name -> task implementation key (``upop.tasks``); a task not tied to a class is evaluation-only
    tasks: ClassVar[dict[str, str]]
    #: short names for well-known public checkpoints of the family (alias -> hub id)
    aliases: ClassVar[dict[str, str]] = {}
    #: the training augmentation under ``--augment default`` (a ``upop.training.augment.POLICIES`` name; None: none)
    augment_policy: ClassVar[str | None] = None
    #: ``--cost-weights paper``: an attention dimension weighs this many MLP neurons (None: the reference has none)
    paper_attn_weight: ClassVar[float | None] = None

    # ---- model classes -------------------------------------------------------------------
    def model_class(self, name: str) -> type[nn.Module]:
        if name not in self.classes:
            raise UnsupportedModelError(
                f"{self.family}: class {name!r} is not supported; supported: {', '.join(sorted(self.classes))}"
            )
        return self._resolve_class(name)

    def _resolve_class(self, name: str) -> type[nn.Module]:
        import transformers

        return getattr(transformers, name)

    def check_class(self, model: nn.Module) -> None:
        name = type(model).__name__
        if name not in self.classes:
            raise UnsupportedModelError(
                f"{self.family}: {name} is not supported; supported classes: {', '.join(sorted(self.classes))}"
            )

    def class_for_task(self, task: str) -> str:
        for name, t in self.classes.items():
            if t == task:
                return name
        tasks = sorted(set(self.classes.values()))
        raise UnsupportedModelError(f"{self.family} models cannot do task {task!r}; they do: {', '.join(tasks)}")

    def task_of(self, model: nn.Module) -> str:
        return self.classes[type(model).__name__]

    def build(self, class_name: str, config: Any) -> nn.Module:
        cls = self.model_class(class_name)
        return cls(config)  # type: ignore[call-arg]

    def config_from_dict(self, data: dict[str, Any]) -> Any:
        import transformers

        data = dict(data)
        return transformers.AutoConfig.for_model(data.pop("model_type"), **data)

    #: the layer stacks (ModuleLists) of every tower whose layers output the residual stream: feature
    #: distillation compares each of their layers' outputs with the teacher's (stacks a class lacks are skipped)
    feature_stacks: ClassVar[tuple[str, ...]] = ()

    # ---- towers and modules ----------------------------------------------------------------
    def feature_layers(self, model: nn.Module) -> list[str]:
        """Every layer of the model's ``feature_stacks``, by module path."""
        have = dict(model.named_modules())
        names = [f"{stack}.{i}" for stack in self.feature_stacks if stack in have for i in range(len(have[stack]))]
        if not names:
            raise UnsupportedModelError(f"{self.family}: {type(model).__name__} declares no layers for feature "
                                        "distillation; use --distill logits")
        return names

    def tower_of(self, path: str) -> str:
        head = path.split(".", 1)[0]
        return self.towers.get(head, head)

    def modules(self, model: nn.Module) -> list[ModuleSpec]:
        raise NotImplementedError

    def patch_attention(self, model: nn.Module, spec: AttentionSpec, num_heads: int, head_dim: int) -> None:
        raise NotImplementedError

    def patch_mlp(self, model: nn.Module, spec: MLPSpec, width: int) -> None:
        """MLPs read their width from the Linear shapes; nothing to patch by default."""

    def patch_gqa(self, model: nn.Module, spec: Any, kept: Sequence[int], granularity: str) -> None:
        """Grouped-query attention as transformers' rotary decoders build it (Llama, Qwen2, Mistral)."""
        patch_rotary_attention(model, spec, kept, granularity)

    def module_tokens(self, model: nn.Module, spec: ModuleSpec, text_tokens: int) -> tuple[int, int]:
        """(query tokens, key/value tokens) a module sees at the reference shapes."""
        if spec.tower == "vision":
            t = self.image_tokens(model)
            return t, t
        if spec.role == "cross":
            return text_tokens, self.image_tokens(model)
        return text_tokens, text_tokens

    def image_tokens(self, model: nn.Module) -> int:
        cfg = getattr(model.config, "vision_config", model.config)
        return (image_size_of(cfg) // int(cfg.patch_size)) ** 2 + 1

    def drop_path_branches(self, model: nn.Module) -> list[list[nn.Module]]:
        """Per block, the modules whose output is a residual branch (``--drop-path`` scales it per sample);
        empty: the family does not offer drop path (its blocks add the residual inside the modules)."""
        return []

    def module_items(self, model: nn.Module, spec: ModuleSpec) -> int:
        """How many sequences a module runs on per example (a model that encodes two images runs its
        vision tower on two): the latency model multiplies the batch by it, not the tokens."""
        return 1

    # ---- task hooks (``TaskHooks``): what the tasks in ``upop.tasks`` call ------------------------
    def preprocessor_options(self, model: nn.Module) -> dict[str, Any]:
        return {}

    def encode_image(self, model: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(token sequence or None, L2-normalised image embedding) for retrieval."""
        raise NotImplementedError(f"{self.family} has no image-text embedding")

    def encode_text(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{self.family} has no image-text embedding")

    def itm_logits(self, model: nn.Module, image_seq: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """Image-text matching logits (no match, match) of each text against its image's token sequence."""
        raise UnsupportedModelError(f"{self.family} has no image-text matching head")

    def pair_logits(self, model: nn.Module, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Image-text logits of every row feature against every column feature (dual-encoder retrieval)."""
        raise UnsupportedModelError(f"{self.family} has no image-text pair logits")

    def pair_loss(self, i2t: torch.Tensor, t2i: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The contrastive loss of both directions' logits; row i's positive is column ``targets[i]``."""
        raise UnsupportedModelError(f"{self.family} has no image-text contrastive loss")

    def itc_temperature(self, model: nn.Module, value: float) -> nn.Parameter:
        """The model's learnable image-text temperature, set to ``value`` (added if the model lacks it)."""
        raise UnsupportedModelError(f"{self.family} has no image-text temperature")

    def init_from(self, source: nn.Module) -> nn.Module:
        """A model of this family initialised from a model of another class (a demo that starts from another)."""
        raise UnsupportedModelError(f"{self.family} models cannot be initialised from a {type(source).__name__}")

    # ---- synthetic inputs (tests, benchmarks, FLOP counting, parity checks) ----------------------
    def example_inputs(self, model: nn.Module, batch_size: int = 2, seq_len: int = 8,
                       generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def native_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A training loss computed with the model's own heads on a batch from ``example_inputs``."""
        raise NotImplementedError

    def forward_outputs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors that define the model's function on ``batch`` (for parity checks)."""
        raise NotImplementedError


def image_size_of(vision_config: Any) -> int:
    size = vision_config.image_size
    return size if isinstance(size, int) else int(size[0])


def rand_pixels(batch: int, size: int, gen: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=gen).to(device)


def rand_ids(batch: int, seq: int, vocab: int, gen: torch.Generator | None, device: torch.device,
             low: int = 1) -> torch.Tensor:
    return torch.randint(low, vocab, (batch, seq), generator=gen).to(device)


NORM_HALF = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


class QKVOAdapter(Adapter):
    """Families whose attention has separate q/k/v/out Linears and reads ``head_dim`` from an attribute.

    CLIP, SigLIP, ViT and DeiT pass ``scaling=self.scale`` to the attention function; the scale
    is left at its original value so slimming does not change it.
    """

    attention_types: ClassVar[tuple[type, ...]]  # the family's attention and MLP module classes
    mlp_types: ClassVar[tuple[type, ...]]
    q_name = "q_proj"
    k_name = "k_proj"
    v_name = "v_proj"
    o_name = "out_proj"
    heads_attr = "num_heads"

    def modules(self, model: nn.Module) -> list[ModuleSpec]:
        attn_types, mlp_types = self.attention_types, self.mlp_types
        specs: list[ModuleSpec] = []
        for path, mod in model.named_modules():
            if isinstance(mod, attn_types):
                specs.append(
                    AttentionSpec(
                        name=path,
                        tower=self.tower_of(path),
                        role="self",
                        in_projs=tuple(InProj(f"{path}.{n}") for n in (self.q_name, self.k_name, self.v_name)),
                        out_proj=f"{path}.{self.o_name}",
                        num_heads=int(getattr(mod, self.heads_attr)),
                        head_dim=int(mod.head_dim),
                    )
                )
            elif isinstance(mod, mlp_types):
                specs.append(
                    MLPSpec(name=path, tower=self.tower_of(path), fc1=f"{path}.fc1", fc2=f"{path}.fc2",
                            width=int(mod.fc1.out_features))
                )
        return specs

    def patch_attention(self, model: nn.Module, spec: AttentionSpec, num_heads: int, head_dim: int) -> None:
        mod = model.get_submodule(spec.name)
        setattr(mod, self.heads_attr, num_heads)
        mod.head_dim = head_dim
