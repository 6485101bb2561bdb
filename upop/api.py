"""The public verbs: ``compress`` (search → slim → retrain, with a report; see ``pipeline``) and ``load``."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .run.checkpoint import info_from_manifest, load_slim
from .run.pipeline import (CompressResult, OpenedModel, TaskSetup, compress, load_profile, open_model, resolve_device,
                       setup_task)

__all__ = ["CompressResult", "OpenedModel", "TaskSetup", "compress", "load", "open_model", "resolve_device",
           "setup_task", "check_profile"]



def check_profile(profile: str | None) -> None:
    """A profile must be a shipped target name or a profile file."""
    load_profile(profile)


def load(path: str | Path, device: str = "cpu") -> nn.Module:
    """Load a slim checkpoint folder; the model is identical to the one saved."""
    model, manifest = load_slim(path, device=str(resolve_device(device)))
    model._upop_info = info_from_manifest(manifest)  # type: ignore[assignment]
    return model
