"""Configs and image processors for models built here from scratch: the demo models and the test fixtures.

None of this is part of pruning: a model loaded from a checkpoint never calls it. Each family
declares its overrides in a small ``ModelFactory`` subclass next to its adapter, and the
registered adapter class mixes it in (``class ViTAdapter(QKVOAdapter, ViTModels)``), so
``adapter.random_config(...)`` keeps working for tests, benchmarks and ``upop.models.demo`` while
``Adapter`` itself holds only the pruning contract and the task hooks.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ModelFactory:
    """What building a small model of a family from scratch needs."""

    family: ClassVar[str]

    def image_processor(self, size: int) -> Any:
        """The family's (PIL) image processor at ``size`` px, normalised to [-1, 1]; for models built here."""
        raise NotImplementedError(f"{self.family}: no image processor for models built here")

    def small_config(self, class_name: str, *, hidden: int, layers: int, heads: int, image_size: int,
                     patch_size: int, vocab: int, token_ids: dict[str, int], num_labels: int = 2) -> Any:
        """A small trainable config (the demo models), with the tokenizer's special ids."""
        raise NotImplementedError(f"{self.family}: no demo config")

    def random_config(self, class_name: str, hidden: int = 32, layers: int = 2, heads: int = 4,
                      image_size: int = 32, patch_size: int = 8, vocab: int = 99) -> Any:
        """A tiny config for randomly initialised test and benchmark models."""
        raise NotImplementedError(f"{self.family}: no random config")
