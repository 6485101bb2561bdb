"""A task in one file: counting the shapes of a scene (1, 2 or 3) with an image classifier's head.

Everything the task needs is declared here and registered by decorator, editing no file of upop: its annotation
file (written by the test from the shapes set's scenes), its reader, one option (``max_count``, a flag of
``upop compress`` from its declaration), the family and model class it trains, and what ``upop predict`` shows.
The test runs it through compress → export → eval of the export → predict.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from typer.testing import CliRunner

from tests.conftest import vit_run_folder
from upop.errors import DataError
from upop.run.options import Option, at_least
from upop.tasks.base import Batches, Images, Task, register_task
from upop.exporters.predict import presenter

MAX_COUNT = Option("max_count", at_least(1), int, "Count: the largest count the head tells apart (default 3).",
                   task=True)


@dataclass
class CountRecord:
    image: Path
    count: int


def read_counts(path: Path, image_root: str | Path | None = None) -> list[CountRecord]:
    """``[{"image": "images/train/00001.png", "count": 2}, ...]``, image paths inside the data folder."""
    root = Path(image_root or path.parent).resolve()
    out = []
    for i, rec in enumerate(json.loads(path.read_text())):
        image = (root / rec["image"]).resolve()
        if root not in image.parents or not isinstance(rec.get("count"), int) or rec["count"] < 1:
            raise DataError(f"{path}: record {i} is not an image in the folder with a count >= 1")
        out.append(CountRecord(image, rec["count"]))
    return out


@register_task("vit-count", families=("vit",))
class ShapeCount(Task):
    name = "count"
    primary = "acc"
    title = "shape counting"
    annotation = ("count_{split}.json",)
    reader = staticmethod(read_counts)
    task_options = (MAX_COUNT,)
    model_classes = ("ViTForImageClassification",)

    @property
    def k(self) -> int:
        return self.options.get("max_count") or 3

    def train_batches(self) -> Batches:
        recs = self._records("train")

        def make(idx: list[int], rng: random.Random) -> dict:
            return {"pixel_values": Images(tuple(recs[i].image for i in idx)),
                    "labels": torch.tensor([min(recs[i].count, self.k) - 1 for i in idx])}

        return Batches(len(recs), self.batch_size, make, seed=self.seed, images=self.images)

    def forward(self, model, batch, guide=None) -> dict[str, torch.Tensor]:
        inputs = self.on_device(batch, model)
        return {"logits": model(pixel_values=inputs["pixel_values"]).logits[:, : self.k]}

    def loss_from(self, out, batch) -> torch.Tensor:
        return F.cross_entropy(out["logits"], batch["labels"].to(out["logits"].device))

    @torch.no_grad()
    def evaluate(self, model, split: str = "test", limit: int | None = None) -> dict[str, float]:
        recs = self._records(split, limit)

        def count(chunk, px) -> list[int]:
            return (self.forwards.logits(model, pixel_values=px)[:, : self.k].argmax(-1) + 1).tolist()

        preds = self.predict_all(model, recs, count, lambda r: [r.image])
        acc = 100.0 * sum(int(p == min(r.count, self.k)) for p, r in zip(preds, recs)) / len(recs)
        return {"acc": acc, "primary": acc}


@presenter("count")
def show_count(x) -> list[str]:
    (logits,) = x.model.run("classifier", pixel_values=x.pixels)
    return [f"{int(np.argmax(logits[0, :3])) + 1} shape(s)"]


def write_counts(data: Path) -> None:
    for split in ("train", "val", "test"):
        scenes = json.loads((data / f"scenes_{split}.json").read_text())
        recs = [{"image": s["image"], "count": len(s["objects"])} for s in scenes]
        (data / f"count_{split}.json").write_text(json.dumps(recs))


runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def _unregistered_after():
    """The toy task leaves no trace in the registries for the tests that run after this file."""
    yield
    from upop.run import options
    from upop.exporters import predict
    from upop.tasks import base

    base._TASKS.pop("vit-count")
    base._SERVES.pop(("vit", "count"))
    options._TASK_OPTIONS.pop("max_count")
    predict.PRESENTERS.pop("count")


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    model, data = vit_run_folder(tmp_path_factory.mktemp("count"))
    write_counts(data)
    return model, data


def _ok(r) -> str:
    assert r.exit_code == 0, r.output
    return r.output


def test_a_task_in_one_file_compresses_exports_evaluates_and_predicts(run_folder, tmp_path):
    pytest.importorskip("onnxruntime", reason="the export is evaluated and run with ONNX Runtime (extra cpu)")
    from upop.exporters.predict import predict
    from upop_cli.app import app

    model, data = run_folder
    slim, onnx = tmp_path / "slim", tmp_path / "onnx"
    _ok(runner.invoke(app, ["compress", "--model", str(model), "--task", "count", "--data", str(data), "--ratio", "0.5",
                            "--max-count", "3", "--search-epochs", "1", "--retrain-epochs", "1", "--batch-size", "4",
                            "--workers", "0", "--no-latency", "--out", str(slim), "--quiet"]))
    report = json.loads((slim / "report.json").read_text())
    assert report["task"] == "count" and "acc" in json.dumps(report)
    _ok(runner.invoke(app, ["export", str(slim), "--out", str(onnx), "--quiet"]))
    out = _ok(runner.invoke(app, ["eval", str(onnx), "--task", "count", "--data", str(data), "--json"]))
    metrics = json.loads(out[out.index("{"):])["metrics"]
    assert 0.0 <= metrics["acc"] <= 100.0
    image = sorted((data / "images" / "test").glob("*.png"))[0]
    shown = predict(onnx, [image], [], task="count")
    assert shown.task == "count" and len(shown.lines) == 1 and shown.lines[0].endswith("shape(s)")


def test_the_tasks_option_is_a_checked_flag_and_refused_where_it_does_not_apply(run_folder, tmp_path):
    from upop_cli.app import app

    model, data = run_folder
    base = ["compress", "--model", str(model), "--data", str(data), "--ratio", "0.5", "--out", str(tmp_path / "o")]
    r = runner.invoke(app, [*base, "--task", "count", "--max-count", "0"])
    assert r.exit_code == 2 and r.output.strip() == "error: --max-count must be an integer >= 1, got 0"
    r = runner.invoke(app, [*base, "--max-count", "2"])  # the model's own task: classification
    assert r.exit_code == 2
    assert "--max-count does not apply to this run (only shape counting uses it; this run is vit classification)" \
        in r.output


def test_the_tasks_annotation_names_and_reader_find_its_split(run_folder):
    from upop.adapters import get_adapter
    from upop.tasks import Preprocessor, make_task, task_names

    model, data = run_folder
    assert "count" in task_names()
    task = make_task(get_adapter("vit"), "count", Preprocessor(None, None), data)
    assert len(task._records("train")) == 8 and {r.count for r in task._records("train")} <= {1, 2, 3}
    with pytest.raises(DataError, match="has no train split for count"):
        make_task(get_adapter("vit"), "count", Preprocessor(None, None), data / "images").train_batches()
