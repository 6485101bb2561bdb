"""Precisions stacked on the exported FP32 graphs, the deployment table, and ``auto``'s choice.

Every precision is a set of graph files beside the FP32 ones (``export.json`` records each graph's ``fp16``,
``int8`` and ``int8-dynamic`` file). The deployment table measures each precision as a whole deployment:
the task metric on val and test (through ``metric_fn``, which evaluates an export folder), the size on
disk, ONNX Runtime latency (p50/p90, every graph once, summed) at batch 1 and N timed in interleaved rounds
so that drift on the machine falls on every candidate alike, and the speedup against the FP32 graphs of
this export and of the original model's export where one is given.

``auto`` keeps the fastest precision at batch N whose val metric is within ``max_drop`` points of FP32,
and says why each other one lost. ``int8`` with a metric returns the most sensitive nodes to float,
doubling their number, until its drop is within ``max_drop``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from upop.errors import ConfigError, ExportError, NoEvaluationDataError

from .quantize import Calibration, CalibrationData, quant_parity, quantize_dynamic_graph, quantize_static_graph
from .sessions import ort_session, synthetic_feed

__all__ = ["CHOICES", "PRECISIONS", "MetricFn", "PrecisionOptions", "add_precisions", "candidate_view", "choose",
           "measure_latency"]

PRECISIONS = ("fp32", "fp16", "int8", "int8-dynamic")
CHOICES = (*PRECISIONS, "auto")
#: ``metric_fn(export_dir, split)``: the task's primary metric (points) of the export folder's graphs.
MetricFn = Callable[[Path, str], float]


@dataclass
class PrecisionOptions:
    precision: str = "fp32"
    calibration: Calibration = field(default_factory=Calibration)
    max_drop: float = 1.0
    batch: int = 8
    metric_fn: MetricFn | None = None
    task: Any = None  # the Task whose train split calibrates INT8 (needed for int8 and auto)
    original: str | Path | None = None  # an export of the original model: speedups against its FP32 graphs
    rounds: int = 5
    runs: int = 6  # per round: rounds × runs timings per graph and batch
    also: tuple[str, ...] = ()  # more precisions to build and measure beside the asked one (benchmarks)

    def check(self) -> None:
        if self.precision not in CHOICES:
            raise ConfigError(f"--precision must be one of {', '.join(CHOICES)}, got {self.precision!r}")
        drop = self.max_drop
        if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0 <= drop < float("inf"):
            raise ConfigError(f"--max-drop must be a number of points >= 0, got {drop!r}")
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise ConfigError(f"the latency batch must be an integer >= 1, got {self.batch!r}")
        self.calibration.check()
        if set(self.also) - set(PRECISIONS):
            raise ConfigError(f"unknown precision(s) {sorted(set(self.also) - set(PRECISIONS))}")
        if self.precision == "auto" and self.metric_fn is None:
            raise ConfigError("--precision auto chooses by the task metric: it needs the export's evaluation "
                              "(upop eval), which is not available here")
        if self.original is not None and not (Path(self.original) / "export.json").is_file():
            raise ConfigError(f"--original {self.original} is not a upop export folder (no export.json)")

    def built(self) -> list[str]:
        """The precisions this export holds: FP32 always, the asked one, every one for ``auto``."""
        wanted = set(PRECISIONS) if self.precision == "auto" else {"fp32", self.precision, *self.also}
        return [p for p in PRECISIONS if p in wanted]


# ---- one precision seen as a whole export -----------------------------------------------------------
def graph_file(entry: dict[str, Any], precision: str) -> str:
    return entry["file"] if precision == "fp32" else entry[precision]["file"]


@contextlib.contextmanager
def candidate_view(folder: Path, precision: str) -> Iterator[Path]:
    """``folder`` as an export of one precision: a sub-folder whose graph files are that precision's (hard links),
    what any reader of an export folder (``upop eval``, ``predict``) runs; removed afterwards."""
    manifest = json.loads((folder / "export.json").read_text())
    view = folder / f".view-{precision}"
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir()
    try:
        for f in folder.iterdir():
            if f.is_file() and not f.name.endswith(".onnx") and f.name != "export.json":
                _link(f, view / f.name)
        graphs = []
        for g in manifest["graphs"]:
            name = graph_file(g, precision)
            _link(folder / name, view / name)
            graphs.append({k: v for k, v in g.items() if k not in PRECISIONS} | {"file": name})
        (view / "export.json").write_text(json.dumps({**manifest, "graphs": graphs, "precision": precision}, indent=2))
        yield view
    finally:
        shutil.rmtree(view, ignore_errors=True)


def _link(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dest)


# ---- latency ----------------------------------------------------------------------------------------
def measure_latency(sets: dict[str, tuple[Path, dict[str, Any], str]], batches: Sequence[int], rounds: int = 5,
                    runs: int = 6, threads: int | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """p50/p90 ms of every graph once (summed per round) for each named set ``(folder, manifest, precision)``, timed
    in interleaved rounds: each round times every set in turn, so what the machine does meanwhile falls on all."""
    import time

    from upop.latency.timing import percentile

    runners: dict[str, list[tuple[Any, dict[int, dict[str, np.ndarray]]]]] = {}
    for key, (folder, manifest, precision) in sets.items():
        runners[key] = []
        for g in manifest["graphs"]:
            sess = ort_session(folder / graph_file(g, precision), threads=threads)
            runners[key].append((sess, {b: synthetic_feed(g, sess, b) for b in batches}))
            for b in batches:  # warm-up, outside the timings
                sess.run(None, runners[key][-1][1][b])
    times: dict[str, dict[int, list[float]]] = {k: {b: [] for b in batches} for k in sets}
    for _ in range(rounds):
        for key, graphs in runners.items():
            for b in batches:
                for _ in range(runs):
                    t0 = time.perf_counter()
                    for sess, feeds in graphs:
                        sess.run(None, feeds[b])
                    times[key][b].append((time.perf_counter() - t0) * 1000)
    return {k: {str(b): {"p50_ms": percentile(ms, 0.5), "p90_ms": percentile(ms, 0.9)} for b, ms in per.items()}
            for k, per in times.items()}


# ---- the choice -------------------------------------------------------------------------------------
def choose(table: Sequence[dict[str, Any]], max_drop: float, batch: int) -> tuple[str, dict[str, str]]:
    """The fastest row at ``batch`` whose val metric is within ``max_drop`` points of FP32's, and why each other lost.

    ``table`` rows: ``precision``, ``metric_val`` (points), ``latency`` {str(batch): {"p50_ms": ...}}."""
    rows = {r["precision"]: r for r in table}
    if "fp32" not in rows or rows["fp32"].get("metric_val") is None:
        raise ExportError("auto: the FP32 graphs have no metric to compare the other precisions with")
    base = rows["fp32"]["metric_val"]

    def drop(r: dict[str, Any]) -> float:
        return base - r["metric_val"] if r.get("metric_val") is not None else float("inf")

    def ms(r: dict[str, Any]) -> float:
        return r["latency"][str(batch)]["p50_ms"]

    fit = [r for r in table if drop(r) <= max_drop + 1e-9]
    best = min(fit, key=ms)  # FP32 always fits (a drop of 0)
    reasons = {}
    for r in table:
        p = r["precision"]
        if p == best["precision"]:
            continue
        if r.get("metric_val") is None:
            reasons[p] = f"{p} has no metric"
        elif drop(r) > max_drop + 1e-9:
            reasons[p] = f"{p} lost {drop(r):.1f} points (budget {max_drop:g})"
        else:
            reasons[p] = (f"{p} slower than {best['precision']} here ({ms(r):.3g} vs {ms(best):.3g} ms at "
                          f"batch {batch})")
    return best["precision"], reasons


# ---- building the precisions ------------------------------------------------------------------------
@dataclass
class _Build:
    folder: Path
    manifest: dict[str, Any]
    graphs: list[Any]  # the ExportGraph objects, in the manifest's order
    opts: PrecisionOptions
    check_batches: tuple[int, ...]
    seq: int
    progress: Callable[[str], None] | None = None
    calib: CalibrationData | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    metrics: dict[tuple[str, str], float] = field(default_factory=dict)  # each evaluation once (they take minutes)

    def say(self, msg: str) -> None:
        if self.progress:
            self.progress(msg)

    def fp32_files(self) -> list[tuple[str, Path]]:
        return [(g["name"], self.folder / g["file"]) for g in self.manifest["graphs"]]

    def save(self) -> None:
        (self.folder / "export.json").write_text(json.dumps(self.manifest, indent=2))

    def metric(self, precision: str, split: str) -> float | None:
        if self.opts.metric_fn is None:
            return None
        if (precision, split) not in self.metrics:
            self.save()
            with candidate_view(self.folder, precision) as view:
                try:
                    self.metrics[precision, split] = float(self.opts.metric_fn(view, split))
                except NoEvaluationDataError:
                    if self.opts.precision == "auto":  # auto chooses by the metric: it cannot go on without one
                        raise
                    self.progress("no data to evaluate on (not a demo's export; --data DIR gives it): the table "
                                  "has parity, no metric")
                    self.opts.metric_fn = None
                    return None
        return self.metrics[precision, split]


def _int8(b: _Build, exclude: dict[str, list[str]]) -> None:
    """Static QDQ INT8 of every graph, ``exclude`` (per graph) kept in float beside the defaults."""
    assert b.calib is not None
    files = b.fp32_files()
    b.metrics = {k: v for k, v in b.metrics.items() if k[0] != "int8"}  # the INT8 graphs change
    for entry, graph in zip(b.manifest["graphs"], b.graphs):
        name = entry["name"]
        out = b.folder / f"{name}.int8.onnx"
        b.say(f"quantizing {name} (int8, {b.calib.spec.method} calibration on {len(b.calib.items)} items)")
        info = quantize_static_graph(name, dict(files)[name], out, functools.partial(b.calib.feeds, files, name),
                                     b.calib.spec.method, exclude.get(name))
        entry["int8"] = {"file": out.name, "format": "QDQ", "weights": "int8 per-channel symmetric",
                         "activations": "int8 symmetric", **info,
                         "parity": quant_parity(graph, out, b.check_batches, b.seq)}


def _int8_dynamic(b: _Build) -> None:
    for entry, graph in zip(b.manifest["graphs"], b.graphs):
        name = entry["name"]
        out = b.folder / f"{name}.int8-dynamic.onnx"
        b.say(f"quantizing {name} (int8-dynamic)")
        info = quantize_dynamic_graph(name, b.folder / entry["file"], out)
        entry["int8-dynamic"] = {"file": out.name, "weights": "int8 per-tensor", "activations": "dynamic uint8", **info,
                                 "parity": quant_parity(graph, out, b.check_batches, b.seq)}


def _fit_int8(b: _Build, base: float) -> None:
    """Return the most sensitive nodes to float until INT8's val drop is within the budget (1, 2, 4, ... nodes)."""
    from .quantize import sensitive_nodes

    got = b.metric("int8", "val")
    assert got is not None and b.calib is not None
    calib, files = b.calib, b.fp32_files()
    ranking: list[tuple[float, str, str]] = []
    if base - got > b.opts.max_drop:
        b.say(f"int8 lost {base - got:.2f} points: ranking the quantized nodes by their quantization noise")
        for entry in b.manifest["graphs"]:
            name = entry["name"]
            noise = sensitive_nodes(dict(files)[name], b.folder / entry["int8"]["file"],
                                    functools.partial(calib.feeds, files, name))
            ranking += [(err, name, node) for node, err in noise]
        ranking.sort()
    k, returned = 1, []
    while base - got > b.opts.max_drop and k <= len(ranking):
        returned = [(g, n) for _e, g, n in ranking[:k]]
        exclude: dict[str, list[str]] = {}
        for g, n in returned:
            exclude.setdefault(g, []).append(n)
        b.say(f"int8: {k} node(s) back in float")
        _int8(b, exclude)
        got = b.metric("int8", "val")
        assert got is not None
        k = min(k * 2, len(ranking)) if k < len(ranking) else k + 1  # the last try returns them all
    b.notes["int8_sensitivity"] = {"fp32_val": base, "int8_val": got, "drop": base - got, "max_drop": b.opts.max_drop,
                                   "within_budget": base - got <= b.opts.max_drop,
                                   "returned_to_float": [f"{g}:{n}" for g, n in returned]}


def _size(folder: Path, manifest: dict[str, Any], precision: str) -> int:
    return sum((folder / graph_file(g, precision)).stat().st_size for g in manifest["graphs"])


def _parity_summary(manifest: dict[str, Any], precision: str) -> dict[str, float]:
    rows = [p for g in manifest["graphs"] for p in (g["parity"] if precision == "fp32" else g[precision]["parity"])]
    out = {"max_abs": max(p["max_abs"] for p in rows)}
    if all("cosine" in p for p in rows):
        out["min_cosine"] = min(p["cosine"] for p in rows)
    return out


def deployment_table(b: _Build, built: Sequence[str], batches: Sequence[int]) -> list[dict[str, Any]]:
    """One row per precision: metric (val, test), size, latency p50/p90 at each batch, speedups, parity."""
    sets = {p: (b.folder, b.manifest, p) for p in built}
    if b.opts.original is not None:
        orig = Path(b.opts.original)
        sets["original"] = (orig, json.loads((orig / "export.json").read_text()), "fp32")
    b.say(f"timing {', '.join(sets)} at batch {', '.join(map(str, batches))} (ONNX Runtime CPU, interleaved)")
    lat = measure_latency(sets, batches, b.opts.rounds, b.opts.runs)
    keys = [str(n) for n in batches]
    rows = []
    for p in built:
        row: dict[str, Any] = {"precision": p, "metric_val": b.metric(p, "val"), "metric_test": b.metric(p, "test"),
                               "size_bytes": _size(b.folder, b.manifest, p), "latency": lat[p],
                               "speedup_vs_fp32": {n: lat["fp32"][n]["p50_ms"] / lat[p][n]["p50_ms"] for n in keys},
                               "parity": _parity_summary(b.manifest, p)}
        if "original" in lat:
            row["speedup_vs_original"] = {n: lat["original"][n]["p50_ms"] / lat[p][n]["p50_ms"] for n in keys}
        rows.append(row)
    return rows


def add_precisions(folder: Path, manifest: dict[str, Any], graphs: list[Any], opts: PrecisionOptions,
                   check_batches: tuple[int, ...], seq: int, progress: Callable[[str], None] | None = None) -> None:
    """Build the asked precisions beside the FP32 (and FP16) graphs in ``folder``, fill ``manifest`` with them,
    the deployment table and, for ``auto``, the choice. ``folder`` is the export's temporary folder."""
    opts.check()
    built = opts.built()
    b = _Build(folder, manifest, graphs, opts, check_batches, seq, progress)
    if "int8" in built:
        if opts.task is None:
            raise ConfigError("int8 calibrates on the task's train split: give the data (--data) and task")
        b.calib = CalibrationData(opts.task, opts.calibration)
        manifest["calibration"] = b.calib.record()
        _int8(b, {})
        if opts.metric_fn is not None:
            base = b.metric("fp32", "val")
            assert base is not None
            _fit_int8(b, base)
    if "int8-dynamic" in built:
        _int8_dynamic(b)
    manifest.update(b.notes)
    batches = sorted({1, opts.batch})
    table = deployment_table(b, built, batches)
    manifest["deployment"] = {"runtime": "onnxruntime", "device": "cpu", "batches": batches, "rows": table,
                              "latency_rule": "every graph once, summed; p50/p90 over interleaved rounds"}
    manifest["precision"] = opts.precision
    if opts.precision == "auto":
        chosen, reasons = choose(table, opts.max_drop, opts.batch)
        manifest["precision"] = chosen
        manifest["choice"] = {"chosen": chosen, "max_drop": opts.max_drop, "batch": opts.batch, "reasons": reasons,
                              "rule": f"fastest at batch {opts.batch} within {opts.max_drop:g} points of fp32 on val"}
    b.save()


def calibration_task(source: str | Path, task: str | None = None, data: str | Path | None = None) -> Any:
    """The task of ``source`` over its data folder (the demo's own for demo-* models), read by the same rules as
    evaluation (``upop.run.pipeline.setup_task``): what INT8 calibrates on."""
    from upop.run.pipeline import open_model, setup_task

    src = open_model(str(source), task)
    return setup_task(src, task, data, None, batch_size=8, seed=0).task
