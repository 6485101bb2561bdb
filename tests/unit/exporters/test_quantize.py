"""INT8 and INT8-dynamic graphs, their calibration, the deployment table and ``auto``'s rule."""

import importlib.util
import json
import shutil
from pathlib import Path
from unittest.mock import MagicMock

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from upop.models.demo import shapes_dir
from upop.errors import ExportError
from upop.exporters.onnx import export_onnx
from upop.exporters.precision import PrecisionOptions, calibration_task, choose
from upop.exporters.quantize import Calibration, CalibrationData, head_nodes
from upop_cli.app import app

DEMOS = ["demo-vit", "demo-clip", "demo-blip", "demo-blip-nlvr"]


def _opts(task, precision="int8", **kw):
    return PrecisionOptions(precision, Calibration(size=kw.pop("size", 8), seed=kw.pop("seed", 0)), task=task,
                            rounds=1, runs=2, batch=2, **kw)


def _scales(path: Path) -> dict[str, np.ndarray]:
    """The quantization scales of a QDQ graph, by name."""
    proto = onnx.load(str(path))
    return {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer if i.name.endswith("_scale")}


def _view_precision(view: Path) -> str:
    return json.loads((view / "export.json").read_text())["precision"]


# ---- every precision runs, per family ---------------------------------------------------------------
@pytest.mark.parametrize("demo", DEMOS)
def test_auto_builds_every_precision_and_each_runs(demo, tmp_path):
    """fp16, int8 (calibrated on the demo's train images through its processor) and int8-dynamic graphs are
    built for every graph of the model, run in ONNX Runtime on the parity inputs, and stay close to PyTorch."""
    metric = {"fp32": 80.0, "fp16": 80.0, "int8": 79.5, "int8-dynamic": 79.8}
    opts = _opts(calibration_task(demo), "auto", metric_fn=lambda view, split: metric[_view_precision(view)])
    man = export_onnx(demo, tmp_path / "x", precision=opts)
    for g in man["graphs"]:
        for p in ("fp16", "int8", "int8-dynamic"):
            assert (tmp_path / "x" / g[p]["file"]).is_file()
        for p in ("int8", "int8-dynamic"):
            # cosine, or a small error where the outputs are tiny (NLVR's two logits: a cosine of near-zeros)
            close = [r["cosine"] > 0.95 or r["max_abs"] < 1e-2 for r in g[p]["parity"]]
            assert close and all(close), (g["name"], p, g[p]["parity"])
            assert g[p]["quantized_nodes"] > 0
    rows = {r["precision"]: r for r in man["deployment"]["rows"]}
    assert set(rows) == {"fp32", "fp16", "int8", "int8-dynamic"}
    assert rows["int8"]["metric_val"] == 79.5 and rows["int8"]["metric_test"] == 79.5
    assert all(set(r["latency"]) == {"1", "2"} and r["size_bytes"] > 0 for r in rows.values())
    assert man["choice"]["chosen"] == man["precision"] and set(man["choice"]["reasons"]) == set(rows) - {man["precision"]}
    assert json.loads((tmp_path / "x" / "export.json").read_text())["deployment"]["rows"][0]["precision"] == "fp32"
    assert not any(p.name.startswith(".view") for p in (tmp_path / "x").iterdir())


def _weight_heavy_vit(tmp_path: Path) -> Path:
    """demo-vit's processor and labels on a wider random ViT, whose MatMul weights are most of its bytes."""
    import transformers

    folder = tmp_path / "wide-vit"
    shutil.copytree(Path(__file__).resolve().parents[3] / "upop" / "demo_models" / "demo-vit", folder)
    (folder / "upop_demo.json").unlink()
    cfg = transformers.AutoConfig.from_pretrained(folder)
    cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads = 256, 1024, 4
    transformers.ViTForImageClassification(cfg).save_pretrained(folder)
    return folder


def _matmul_weight_share(path: Path) -> float:
    proto = onnx.load(str(path))
    sizes = {i.name: onnx.numpy_helper.to_array(i).nbytes for i in proto.graph.initializer}
    weights = {i for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") for i in n.input if i in sizes}
    return sum(sizes[w] for w in weights) / sum(sizes.values())


@pytest.mark.parametrize("precision", ["int8", "int8-dynamic"])
def test_int8_files_are_at_most_035x_fp32_for_weight_heavy_graphs(precision, tmp_path):
    folder = _weight_heavy_vit(tmp_path)
    task = calibration_task(folder, data=shapes_dir()) if precision == "int8" else None
    man = export_onnx(folder, tmp_path / "x", precision=_opts(task, precision))
    (g,) = man["graphs"]
    fp32 = tmp_path / "x" / g["file"]
    assert _matmul_weight_share(fp32) > 0.9  # the graph is weight-heavy
    ratio = (tmp_path / "x" / g[precision]["file"]).stat().st_size / fp32.stat().st_size
    assert ratio <= 0.35, ratio
    row = next(r for r in man["deployment"]["rows"] if r["precision"] == precision)
    assert row["size_bytes"] == (tmp_path / "x" / g[precision]["file"]).stat().st_size


# ---- calibration -----------------------------------------------------------------------------------
def test_calibration_is_reproducible_and_recorded(tmp_path):
    task = calibration_task("demo-vit")
    a = export_onnx("demo-vit", tmp_path / "a", precision=_opts(task, size=12, seed=3))
    b = export_onnx("demo-vit", tmp_path / "b", precision=_opts(task, size=12, seed=3))
    c = export_onnx("demo-vit", tmp_path / "c", precision=_opts(task, size=12, seed=4))
    sa, sb, sc = (_scales(tmp_path / d / "classifier.int8.onnx") for d in "abc")
    assert sa and sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert any(not np.array_equal(sa[k], sc[k]) for k in sa)  # another draw, other activation ranges
    assert a["calibration"] == b["calibration"] != c["calibration"]
    rec = a["calibration"]
    assert (rec["split"], rec["count"], rec["seed"], rec["method"]) == ("train", 12, 3, "minmax")
    assert len(rec["items_sha256"]) == 64


def test_calibration_draws_from_the_train_split_through_the_processor():
    task = calibration_task("demo-blip")
    data = CalibrationData(task, Calibration(size=5, seed=1))
    train = {p for p in task.image_paths("train")}
    assert len(data.items) == 5 and all(p in train for images, _ in data.items for p in images)
    (pool,) = list(data.data_batches())
    size = task.model.config.vision_config.image_size
    assert pool["pixel_values"].shape == (5, 3, size, size) and pool["input_ids"].shape[0] == 5
    # the processor's normalisation: not raw 0..255 pixels
    assert -5 < pool["pixel_values"].min() < 0 < pool["pixel_values"].max() < 5


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_other_calibration_methods_run(method, tmp_path):
    opts = _opts(calibration_task("demo-vit"))
    opts.calibration = Calibration(size=8, method=method)
    man = export_onnx("demo-vit", tmp_path / "x", precision=opts)
    assert man["calibration"]["method"] == method and man["graphs"][0]["int8"]["parity"][0]["cosine"] > 0.9


# ---- what stays in float ---------------------------------------------------------------------------
def test_heads_layernorm_softmax_and_patch_embedding_stay_float(tmp_path):
    man = export_onnx("demo-clip", tmp_path / "x", precision=_opts(calibration_task("demo-clip")))
    for g in man["graphs"]:
        fp32 = onnx.load(str(tmp_path / "x" / g["file"]))
        heads = head_nodes(fp32)
        assert heads and set(heads) <= set(g["int8"]["float_nodes"])
        q = onnx.load(str(tmp_path / "x" / g["int8"]["file"]))
        producer = {o: n for n in q.graph.node for o in n.output}
        for n in q.graph.node:
            if n.op_type in ("LayerNormalization", "Softmax", "Conv") or n.name in heads:
                # their inputs come straight from float tensors, not from a DequantizeLinear
                assert all(getattr(producer.get(i), "op_type", "") != "DequantizeLinear" for i in n.input), n.name


# ---- the sensitivity pass --------------------------------------------------------------------------
def test_sensitivity_pass_returns_the_worst_nodes_to_float_until_within_budget(tmp_path):
    first: dict[str, int] = {}

    def metric(view: Path, split: str) -> float:
        p = _view_precision(view)
        if p != "int8":
            return 90.0
        q = onnx.load(str(view / "classifier.int8.onnx"))
        dq = sum(n.op_type == "DequantizeLinear" for n in q.graph.node)
        first.setdefault("dq", dq)
        return 88.0 if dq >= first["dq"] else 89.5  # fully quantized: 2 points lost; one node back: 0.5

    man = export_onnx("demo-vit", tmp_path / "x",
                      precision=_opts(calibration_task("demo-vit"), metric_fn=metric, max_drop=1.0))
    s = man["int8_sensitivity"]
    assert s["within_budget"] and s["drop"] == pytest.approx(0.5) and len(s["returned_to_float"]) == 1
    node = s["returned_to_float"][0].split(":", 1)[1]
    assert node in man["graphs"][0]["int8"]["float_nodes"]


def test_sensitivity_pass_says_when_the_budget_cannot_be_met(tmp_path):
    def metric(view: Path, split: str) -> float:
        return 90.0 if _view_precision(view) != "int8" else 80.0

    man = export_onnx("demo-vit", tmp_path / "x",
                      precision=_opts(calibration_task("demo-vit"), metric_fn=metric, max_drop=1.0))
    s = man["int8_sensitivity"]
    assert not s["within_budget"] and s["drop"] == pytest.approx(10.0) and s["returned_to_float"]


# ---- auto's rule -----------------------------------------------------------------------------------
def _row(p, val, ms8, ms1=1.0):
    return {"precision": p, "metric_val": val, "latency": {"1": {"p50_ms": ms1}, "8": {"p50_ms": ms8}}}


def test_auto_keeps_the_fastest_within_the_budget_and_says_why_each_other_lost():
    table = [_row("fp32", 80.0, 100), _row("fp16", 80.0, 120), _row("int8", 77.7, 30), _row("int8-dynamic", 79.4, 50)]
    chosen, why = choose(table, 1.0, 8)
    assert chosen == "int8-dynamic"
    assert why["int8"] == "int8 lost 2.3 points (budget 1)"
    assert why["fp16"].startswith("fp16 slower than int8-dynamic here (120 vs 50 ms at batch 8)")
    assert why["fp32"].startswith("fp32 slower than int8-dynamic here")
    assert choose(table, 3.0, 8)[0] == "int8"  # a larger budget takes the faster one
    assert choose(table, 0.0, 8)[0] == "fp32"  # none other within 0 points
    table[1] = _row("fp16", 80.0, 90)
    assert choose(table, 0.0, 8)[0] == "fp16"
    table = [_row("fp32", 80.0, 100), _row("int8", 80.0, 101)]
    assert choose(table, 1.0, 8) == ("fp32", {"int8": "int8 slower than fp32 here (101 vs 100 ms at batch 8)"})


def test_auto_in_an_export_chooses_by_the_measured_table(tmp_path, monkeypatch):
    lat = {"fp32": 10.0, "fp16": 12.0, "int8": 4.0, "int8-dynamic": 6.0}
    metric = {"fp32": 85.0, "fp16": 85.0, "int8": 82.0, "int8-dynamic": 84.5}

    def fixed(sets, batches, rounds, runs):
        return {k: {str(b): {"p50_ms": lat[k] * b, "p90_ms": lat[k] * b} for b in batches} for k in sets}

    monkeypatch.setattr("upop.exporters.precision.measure_latency", fixed)
    opts = _opts(calibration_task("demo-vit"), "auto", metric_fn=lambda v, s: metric[_view_precision(v)], max_drop=3.5)
    opts.metric_fn = lambda v, s: metric[_view_precision(v)]
    man = export_onnx("demo-vit", tmp_path / "x", precision=opts)
    assert man["precision"] == "int8"
    opts.max_drop = 1.0
    man = export_onnx("demo-vit", tmp_path / "x", overwrite=True, precision=opts)
    assert man["precision"] == "int8-dynamic"
    assert man["choice"]["reasons"]["int8"] == "int8 lost 3.0 points (budget 1)"
    rows = {r["precision"]: r for r in man["deployment"]["rows"]}
    assert rows["int8-dynamic"]["speedup_vs_fp32"]["2"] == pytest.approx(10 / 6)


def test_speedup_against_the_original_models_export(tmp_path):
    original = export_onnx("demo-vit", tmp_path / "orig")
    assert original["graphs"]
    man = export_onnx("demo-vit", tmp_path / "x", precision=_opts(None, "fp32", original=tmp_path / "orig"))
    (row,) = man["deployment"]["rows"]
    assert set(row["speedup_vs_original"]) == {"1", "2"} and all(v > 0 for v in row["speedup_vs_original"].values())


# ---- bad values ------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,message", [
    (["--precision", "int8", "--calibration-size", "0"], "--calibration-size must be an integer >= 1"),
    (["--precision", "int8", "--max-drop", "-1"], "--max-drop must be a number of points >= 0"),
    (["--precision", "int9"], "--precision must be one of"),
    (["--precision", "int8", "--calibration-method", "mse"], "--calibration-method must be one of"),
    (["--fp16", "--precision", "int8"], "give one of --fp16 and --precision int8"),
    (["--precision", "int8", "--batch", "x"], "--batch must be N or MIN:OPT:MAX"),
    (["--precision", "fp32", "--original", "/nonexistent"], "is not a upop export folder"),
    (["--format", "trt", "--precision", "int8-dynamic"], "int8-dynamic"),
])
def test_bad_values_are_one_line_and_exit_2(args, message, tmp_path):
    r = CliRunner().invoke(app, ["export", "demo-vit", "--out", str(tmp_path / "x"), *args])
    assert r.exit_code == 2, r.output
    lines = [x for x in r.output.splitlines() if x.strip() and not x.startswith("Loading")]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.output
    assert not (tmp_path / "x").exists()


def test_a_graph_the_quantizer_cannot_take_is_one_line_exit_2(tmp_path, monkeypatch):
    def refuses(*a, **k):
        raise RuntimeError("Unable to find data type for weight_name='x'\nmore detail")

    monkeypatch.setattr("onnxruntime.quantization.quantize_static", refuses)
    r = CliRunner().invoke(app, ["export", "demo-vit", "--precision", "int8", "--calibration-size", "4",
                                 "--out", str(tmp_path / "x")])
    assert r.exit_code == 2
    assert "error: int8: ONNX Runtime's quantizer cannot take graph classifier: Unable to find data type" in r.output
    assert "Traceback" not in r.output and "more detail" not in r.output and not (tmp_path / "x").exists()


def test_auto_without_a_metric_says_so(tmp_path):
    with pytest.raises(Exception, match="auto chooses by the task metric"):
        _opts(None, "auto").check()


def test_cli_int8_export_prints_the_deployment_table(tmp_path):
    r = CliRunner().invoke(app, ["export", "demo-vit", "--precision", "int8", "--calibration-size", "4",
                                 "--batch", "2", "--out", str(tmp_path / "x")])
    assert r.exit_code == 0, r.output
    assert "deployment" in r.output and "int8 *" in r.output and "int8 calibrated on 4 train items" in r.output
    man = json.loads((tmp_path / "x" / "export.json").read_text())
    assert man["precision"] == "int8" and man["deployment"]["batches"] == [1, 2]


def test_missing_calibration_input_is_named(tmp_path):
    from upop.exporters.quantize import _resolve

    sess = MagicMock()
    sess.get_inputs.return_value = [MagicMock(type="tensor(float)")]
    sess.get_inputs.return_value[0].name = "mystery"
    with pytest.raises(ExportError, match="no data for input mystery"):
        _resolve(sess, {"pixel_values": np.zeros((1, 3, 2, 2), np.float32)})


# ---- TensorRT (mocked: no TensorRT on this machine) --------------------------------------------------
def test_tensorrt_networks_are_strongly_typed_without_precision_flags(tmp_path, monkeypatch):
    import sys

    from upop.exporters import tensorrt as trt_mod

    trt = MagicMock()
    trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED = 1
    builder = trt.Builder.return_value
    builder.build_serialized_network.return_value = b"engine"
    config = builder.create_builder_config.return_value
    config.get_timing_cache.return_value.serialize.return_value = b"cache"
    trt.OnnxParser.return_value.parse_from_file.return_value = True
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    out = trt_mod.build_engine(tmp_path / "g.onnx", {"x": ((1, 2), (2, 2), (4, 2))}, timing_cache=tmp_path / "c")
    assert out == b"engine"
    builder.create_network.assert_called_once_with(1 << 1)
    config.set_flag.assert_not_called()  # no BuilderFlag.FP16 / INT8: the ONNX file's types decide
    del trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED  # TensorRT 11: strongly typed is the only mode
    assert trt_mod.strongly_typed_flags(trt) == 0


def test_tensorrt_int8_engines_are_built_from_the_int8_qdq_graphs(tmp_path, monkeypatch):
    from upop.exporters import tensorrt as trt_mod

    trt = MagicMock(__version__="10.9.0")
    built = []
    monkeypatch.setattr("upop.exporters.quantize.modelopt_quantizer", lambda: None)  # ONNX Runtime's Q/DQ then
    monkeypatch.setattr(trt_mod, "require_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_mod, "build_engine", lambda path, shapes, timing_cache: built.append(path.name) or b"e")
    meta = trt_mod.export_trt("demo-vit", tmp_path / "t", batch="1:2:4",
                              precision=_opts(calibration_task("demo-vit"), "int8"))
    assert built == ["classifier.int8.onnx"] and meta["precision"] == "int8" and meta["strongly_typed"]
    assert meta["int8_quantizer"] == "onnxruntime (ModelOpt not installed)"
    assert meta["calibration"]["count"] == 8
    built.clear()
    trt_mod.export_trt("demo-vit", tmp_path / "t16", batch="1:2:4", fp16=True)
    assert built == ["classifier.fp16.onnx"]


def test_task_metric_is_upop_evals_primary_metric_of_the_export(monkeypatch):
    from upop.exporters import evaluate

    calls = []
    monkeypatch.setattr(evaluate, "evaluate_export", lambda d, **kw: calls.append((d, kw)) or {"primary": 71.5, "top1": 71.5})
    metric = evaluate.task_metric("DATA", limit=7)
    assert metric(Path("E"), "val") == 71.5
    assert calls == [(Path("E"), {"data": "DATA", "split": "val", "batch_size": 32, "limit": 7})]


def test_a_quantized_file_that_leaves_its_folder_is_refused(tmp_path):
    from upop.errors import ExportFolderError
    from upop.exporters.runtime import read_export_manifest

    man = {"task": "classification", "graphs": [{"name": "classifier", "file": "classifier.onnx",
                                                 "int8": {"file": "../../etc/passwd"}}]}
    (tmp_path / "export.json").write_text(json.dumps(man))
    with pytest.raises(ExportFolderError, match="INT8 file"):
        read_export_manifest(tmp_path)


def test_tensorrt_int8_uses_modelopts_onnx_ptq_where_installed(tmp_path, monkeypatch):
    """ModelOpt's API as documented (``modelopt.onnx.quantization.quantize``), faked: what upop hands it."""
    import sys
    import types

    from upop.exporters import tensorrt as trt_mod

    calls = []

    def quantize(**kw):
        calls.append(kw)
        shutil.copy(kw["onnx_path"], kw["output_path"])

    fake = types.ModuleType("modelopt.onnx.quantization")
    fake.quantize = quantize
    for name, mod in (("modelopt", types.ModuleType("modelopt")), ("modelopt.onnx", types.ModuleType("modelopt.onnx")),
                      ("modelopt.onnx.quantization", fake)):
        monkeypatch.setitem(sys.modules, name, mod)
    sys.modules["modelopt.onnx"].quantization = fake
    built = []
    monkeypatch.setattr(trt_mod, "require_tensorrt", lambda: MagicMock(__version__="10.9.0"))
    monkeypatch.setattr(trt_mod, "build_engine", lambda path, shapes, timing_cache: built.append(path.name) or b"e")
    meta = trt_mod.export_trt("demo-vit", tmp_path / "t", batch="1:2:4",
                              precision=_opts(calibration_task("demo-vit"), "int8", size=6))
    assert built == ["classifier.int8-trt.onnx"] and meta["int8_quantizer"] == "modelopt"
    (kw,) = calls
    assert kw["quantize_mode"] == "int8" and kw["calibration_method"] == "max" and kw["calibration_eps"] == ["cpu"]
    assert kw["calibration_data"]["pixel_values"].shape[0] == 6 and kw["nodes_to_exclude"]
    onnx_man = json.loads((tmp_path / "t" / "onnx" / "export.json").read_text())
    assert onnx_man["graphs"][0]["int8-trt"]["quantizer"] == "modelopt"


@pytest.mark.skipif(importlib.util.find_spec("modelopt") is None,
                    reason='ModelOpt is not installed (pip install "nvidia-modelopt[onnx]": the trt extra)')
def test_modelopt_quantizes_a_graph_on_the_cpu(tmp_path, monkeypatch):
    import sys

    from upop.exporters.quantize import quantize_for_tensorrt

    if importlib.util.find_spec("tensorrt_stubs") is not None:
        monkeypatch.setitem(sys.modules, "tensorrt", None)  # the stubs are no TensorRT: ModelOpt would call them
    man = export_onnx("demo-vit", tmp_path / "x")
    task = calibration_task("demo-vit")
    data = CalibrationData(task, Calibration(size=8))
    files = [("classifier", tmp_path / "x" / man["graphs"][0]["file"])]
    info = quantize_for_tensorrt("classifier", files[0][1], tmp_path / "q.onnx", lambda: data.feeds(files, "classifier"),
                                 "minmax")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and info["quantizer"] == "modelopt"


def test_calibration_obeys_the_data_folders_rules(tmp_path):
    """An annotation naming an image outside the data folder is refused, as evaluation refuses it, unless allowed."""
    data = tmp_path / "data"
    shutil.copytree(shapes_dir(), data)
    recs = json.loads((data / "retrieval_train.json").read_text())
    shutil.copy(data / recs[0]["image"], tmp_path / "outside.png")
    recs[0]["image"] = "../outside.png"
    (data / "retrieval_train.json").write_text(json.dumps(recs))
    args = ["export", "demo-blip", "--precision", "int8", "--calibration-size", "2", "--data", str(data)]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "is outside the data folder" in r.output and "--allow-outside-data" in r.output
    r = CliRunner().invoke(app, [*args, "--allow-outside-data", "--out", str(tmp_path / "y")])
    assert r.exit_code == 0, r.output
