"""Tiny random models of every registered family, built in code (no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

from upop.adapters import all_adapters, get_adapter  # noqa: E402

FAMILY_CLASSES = [(a.family, c) for a in all_adapters() for c in a.classes]


@pytest.fixture(autouse=True)
def _short_latency_budget(monkeypatch):
    """Every compress report times the model before and after; in-process tests time a few runs, not a
    half-second's worth (tests/unit/test_measure.py checks the measurement itself)."""
    monkeypatch.setattr("upop.latency.measure.BUDGET_S", 0.005)
IDS = [c for _f, c in FAMILY_CLASSES]


def randomize_(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Well-conditioned random weights with non-zero biases (BLIP's vision init std is 1e-10)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "itc_temp":  # BLIP's ITC temperature (0.07) is a scale, not a weight
                continue
            if ("norm" in name.lower()) and name.endswith("weight"):
                p.copy_(1 + std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def build_tiny(family: str, class_name: str, seed: int = 0, **sizes) -> torch.nn.Module:
    adapter = get_adapter(family)
    torch.manual_seed(seed)
    model = adapter.build(class_name, adapter.random_config(class_name, **sizes))
    return randomize_(model, seed=seed).eval()


@pytest.fixture(params=FAMILY_CLASSES, ids=IDS)
def tiny(request):
    family, class_name = request.param
    return get_adapter(family), build_tiny(family, class_name)


def vit_run_folder(root) -> tuple:
    """A tiny 12-class ViT saved with its image processor, and a tiny shapes set: what the CLI runs
    (``upop compress`` in a subprocess) need. Returns (model folder, data folder)."""
    import transformers

    from upop.datasets import shapes

    data = shapes(root / "d", train=8, val=4, test=4, classification_per_class=(2, 1, 1))
    model = build_tiny("vit", "ViTForImageClassification")
    model.classifier = torch.nn.Linear(model.classifier.in_features, 12)
    model.config.num_labels = 12
    model.save_pretrained(root / "m")
    transformers.ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(root / "m")
    return root / "m", data


def batches_for(adapter, model, n: int = 3, batch_size: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [adapter.example_inputs(model, batch_size=batch_size, generator=g) for _ in range(n)]


def vit_export(root) -> tuple:
    """A slim tiny ViT with its image processor, its FP32 ONNX export (through the CLI) and an image:
    (slim folder, export folder, image)."""
    import transformers
    from PIL import Image
    from typer.testing import CliRunner

    import upop
    from upop_cli.app import app

    model = build_tiny("vit", "ViTForImageClassification")
    cfg = upop.CompressConfig(ratio=0.5, search=upop.SearchConfig(steps=2, update_every=1),
                              retrain=upop.RetrainConfig(epochs=0))
    slim = upop.compress(model, cfg, batches=batches_for(get_adapter("vit"), model, n=1)).save(root / "slim")
    transformers.ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(slim)
    r = CliRunner().invoke(app, ["export", str(slim), "--out", str(root / "onnx"), "--quiet"])
    assert r.exit_code == 0, r.output
    Image.new("RGB", (40, 40), (10, 200, 10)).save(root / "x.png")
    return slim, root / "onnx", root / "x.png"
