"""``upop eval EXPORT_DIR``: the task metric of an exported artifact equals the PyTorch evaluation (within
``METRIC_TOL``) for every task, and bad input is one line with exit 2."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from upop.adapters import get_adapter
from upop.datasets import shapes
from upop.models.demo import build_tokenizer
from upop.errors import ConfigError, ExportFolderError
from upop.exporters import get
from upop.exporters.evaluate import METRIC_TOL, evaluate_artifact, evaluate_export, open_artifact
from upop.exporters.runtime import OrtModel
from upop.tasks import Preprocessor
from upop_cli.app import app

from ...conftest import batches_for, build_tiny

LIMIT = 24  # records per evaluation: every metric is computed, in seconds per model


def _json(args):
    r = CliRunner().invoke(app, ["eval", *args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout[r.stdout.index("{"):])


def _one_line(args, match):
    r = CliRunner().invoke(app, ["eval", *args])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and r.output.count("\n") == 1, r.output
    assert match in r.output, r.output


def _assert_same(torch_metrics, export_metrics):
    assert set(export_metrics) == set(torch_metrics) and "primary" in export_metrics
    for k, v in torch_metrics.items():
        assert abs(export_metrics[k] - v) <= METRIC_TOL, (k, v, export_metrics[k])


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The demos exported once (fp32 ONNX)."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for demo in DEMOS:
        get("onnx")(demo, root / demo)
        out[demo] = root / demo
    return out


DEMOS = ["demo-vit", "demo-clip", "demo-blip", "demo-blip-nlvr", "demo-smolvlm"]
#: the tasks a demo's export serves beyond its own (demo-smolvlm learnt VQA and captions: its graphs decode both)
OTHER_TASKS = [("demo-smolvlm", "caption")]


@pytest.mark.parametrize("demo,task", [(d, None) for d in DEMOS] + OTHER_TASKS)
def test_fp32_export_metric_equals_pytorch(exports, demo, task):
    chosen = ["--task", task] if task else []
    ref = _json([demo, "--device", "cpu", "--limit", str(LIMIT), *chosen])
    got = _json([str(exports[demo]), "--limit", str(LIMIT), "--device", "cpu", *chosen])
    assert got["runtime"] == "onnxruntime" and got["providers"] == ["CPUExecutionProvider"]
    assert got["task"] == ref["task"]
    _assert_same(ref["metrics"], got["metrics"])
    assert ref["metrics"]["primary"] > 0  # the demos are trained: a metric that could differ


def test_scoring_flags_reach_the_task_for_a_model_and_its_export(exports):
    """``--k-test`` and ``--rerank`` score as ``upop compress`` did with them, not by the defaults; both ways."""
    from upop.api import open_model, setup_task
    from upop.models.demo import shapes_dir

    flags = ["--k-test", "3", "--rerank", "prob", "--limit", str(LIMIT), "--device", "cpu"]
    ref = _json(["demo-blip", *flags])
    got = _json([str(exports["demo-blip"]), *flags])
    _assert_same(ref["metrics"], got["metrics"])
    src = open_model("demo-blip")
    ts = setup_task(src, None, shapes_dir(), None, 64, 0, LIMIT, k_test=3, rerank="prob")
    _assert_same(ts.task.evaluate(src.model, "test", LIMIT), ref["metrics"])
    default = _json(["demo-blip", "--limit", str(LIMIT), "--device", "cpu"])
    assert default["metrics"] != ref["metrics"]  # the flags changed the scoring


@pytest.fixture(scope="module")
def scored_slim(tmp_path_factory):
    """demo-blip compressed (one step a phase) with scoring options of its own: k-test 3, the probability rule."""
    out = tmp_path_factory.mktemp("scored") / "slim"
    r = CliRunner().invoke(app, ["compress", "--model", "demo-blip", "--ratio", "0.5", "--max-steps", "1", "--eval-limit",
                                 "8", "--k-test", "3", "--rerank", "prob", "--no-latency", "--quiet", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def test_a_slim_checkpoint_and_its_export_are_scored_as_the_run_was(scored_slim, tmp_path):
    """The run's scoring options are recorded with the slim checkpoint: ``upop eval`` applies them (saying so on
    stderr; a flag overrides one), and ``upop export`` records them over the demo's for the export's evaluation."""
    manifest = json.loads((scored_slim / "upop_manifest.json").read_text())
    assert manifest["scoring"] == {"k_test": 3, "rerank": "prob"}
    common = ["--limit", str(LIMIT), "--device", "cpu"]
    r = CliRunner().invoke(app, ["eval", str(scored_slim), *common, "--json"])
    assert r.exit_code == 0, r.output
    assert "scored as its run was: --k-test 3, --rerank prob" in r.stderr
    recorded = json.loads(r.stdout[r.stdout.index("{"):])["metrics"]
    explicit = _json([str(scored_slim), *common, "--k-test", "3", "--rerank", "prob"])["metrics"]
    assert recorded == explicit and recorded["k_test"] == 3.0
    r = CliRunner().invoke(app, ["eval", str(scored_slim), *common, "--k-test", "5", "--json"])
    assert "scored as its run was: --rerank prob (" in r.stderr  # the flag given is not the recorded one
    assert json.loads(r.stdout[r.stdout.index("{"):])["metrics"]["k_test"] == 5.0
    get("onnx")(scored_slim, tmp_path / "onnx")
    rec = json.loads((tmp_path / "onnx" / "export.json").read_text())["evaluation"]
    assert rec["task_options"] == {"k_test": 3, "rerank": "prob"}  # the run's, over demo-blip's k_test 16
    _assert_same(recorded, _json([str(tmp_path / "onnx"), "--limit", str(LIMIT), "--device", "cpu"])["metrics"])


@pytest.mark.parametrize("scoring,match", [
    ({"k_test": "3"}, "scoring option k_test must be an integer >= 1, got '3'"),
    ({"rerank": "softmax"}, "scoring option rerank must be one of logit, prob"),
    ({"momentum": False}, "scoring option 'momentum' is not one of k_test, max_new_tokens, rerank"),
    ([3], "scoring must be an object"),
])
def test_an_edited_scoring_record_is_one_line(scored_slim, tmp_path, scoring, match):
    import shutil

    copy = tmp_path / "slim"
    shutil.copytree(scored_slim, copy)
    manifest = json.loads((copy / "upop_manifest.json").read_text())
    manifest["scoring"] = scoring
    (copy / "upop_manifest.json").write_text(json.dumps(manifest))
    _one_line([str(copy), "--limit", "2", "--device", "cpu"], match)


@pytest.mark.parametrize("args,match", [
    (["demo-vit", "--rerank", "prob"], "--rerank does not apply to this vit classification model (only BLIP retrieval "
                                       "uses it)"),
    (["demo-clip", "--k-test", "4"], "--k-test does not apply to this clip retrieval model (only BLIP retrieval uses it)"),
    (["demo-blip", "--max-new-tokens", "4"], "--max-new-tokens does not apply to this blip retrieval model (only "),
    (["demo-blip", "--k-test", "0"], "k_test must be an integer >= 1"),
    (["demo-blip", "--rerank", "softmax"], "rerank must be one of logit, prob"),
])
def test_a_scoring_flag_the_task_does_not_take_is_one_line(exports, args, match):
    _one_line([*args, "--limit", "2", "--device", "cpu"], match)
    if "only" in match:  # the export of the same model: the same line, before its graphs run
        _one_line([str(exports[args[0]]), *args[1:], "--limit", "2", "--device", "cpu"], match)


def test_zero_shot_classification_of_a_dual_encoder_export(exports):
    """CLIP's export evaluated on another task its graphs serve (zero-shot classification: the text encoder
    embeds the class prompts), as the task evaluates the PyTorch model."""
    from upop.models.demo import shapes_dir
    from upop.models.hub import load_pretrained
    from upop.tasks import make_task

    loaded = load_pretrained("demo-clip")
    task = make_task(loaded.adapter, "classification", Preprocessor.from_pretrained(loaded.source), shapes_dir())
    ref = task.evaluate(loaded.model.eval(), "test", LIMIT)
    artifact = open_artifact(exports["demo-clip"])
    _assert_same(ref, evaluate_artifact(artifact, limit=LIMIT, task="classification"))
    assert ref["top5"] > 0


def test_the_export_records_what_evaluation_needs(exports):
    rec = json.loads((exports["demo-blip"] / "export.json").read_text())["evaluation"]
    assert rec == {"demo": "demo-blip", "task_options": {"k_test": 16}, "preprocessor": {}}
    metrics = evaluate_export(exports["demo-blip"], limit=LIMIT, batch_size=7)  # the library call
    assert metrics["k_test"] == 16.0 and metrics["primary"] == metrics["r_mean"]


def test_the_metric_is_computed_by_the_artifact(exports, monkeypatch):
    """A graph whose outputs are wrong gives another metric: the forwards are the artifact's, not PyTorch's."""
    good = evaluate_export(exports["demo-vit"], limit=LIMIT)
    real_run = OrtModel.run
    monkeypatch.setattr(OrtModel, "run", lambda self, graph, **x: [-o for o in real_run(self, graph, **x)])
    assert evaluate_export(exports["demo-vit"], limit=LIMIT)["top1"] < good["top1"]


# ---- the tiny captioning and VQA models (random weights, no demo): their predictions, then the metric ---------

@pytest.fixture(scope="module")
def generation_data(tmp_path_factory):
    return shapes(tmp_path_factory.mktemp("gen") / "shapes", train=4, val=4, test=6, classification_per_class=(1, 1, 1))


def _model_folder(root: Path, class_name: str, ratio: float) -> Path:
    """A tiny random model folder, or (ratio > 0) a slim checkpoint of it, whose layers kept different widths (the
    decoder's cache then differs per layer); with the tokenizer and image processor beside it."""
    import upop

    adapter = get_adapter("blip")
    model = build_tiny("blip", class_name, vocab=99)
    if ratio:
        cfg = upop.CompressConfig(ratio=ratio, search=upop.SearchConfig(steps=3, update_every=1, lr=1e-4),
                                  retrain=upop.RetrainConfig(epochs=0))
        folder = upop.compress(model, cfg, batches=batches_for(adapter, model, n=2)).save(root / "m")
    else:
        folder = root / "m"
        model.save_pretrained(folder)
    Preprocessor(build_tokenizer(), adapter.image_processor(32)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("class_name", ["BlipForConditionalGeneration", "BlipForQuestionAnswering"],
                         ids=["caption", "vqa"])
@pytest.mark.parametrize("ratio", [0.0, 0.5], ids=["unpruned", "slim"])
def test_fp32_export_of_a_generation_model_decodes_as_pytorch(class_name, ratio, generation_data, tmp_path,
                                                              monkeypatch):
    folder = _model_folder(tmp_path, class_name, ratio)
    get("onnx")(folder, tmp_path / "e")
    decoded: list[list[str]] = []
    real_decode = Preprocessor.decode

    def spy(self, ids):
        decoded[-1] += real_decode(self, ids)
        return decoded[-1][-len(ids):]

    monkeypatch.setattr(Preprocessor, "decode", spy)
    decoded.append([])
    ref = _json([str(folder), "--data", str(generation_data), "--device", "cpu", "--batch-size", "4"])
    decoded.append([])
    got = _json([str(tmp_path / "e"), "--data", str(generation_data), "--batch-size", "4"])
    assert len(decoded[0]) >= 6 and any(decoded[0])  # every record decoded, not to nothing
    assert decoded[1] == decoded[0]
    _assert_same(ref["metrics"], got["metrics"])


def _image(tmp_path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "x.png")
    return tmp_path / "x.png"


def test_predict_captions_as_the_task_evaluates(generation_data, tmp_path):
    """``upop predict`` on a BLIP caption export decodes as the caption task does (BLIP's prompt, beam search of
    3, 5 to 20 tokens), the prompt left out of the line."""
    from upop.datasets.readers import open_image
    from upop.exporters.predict import predict
    from upop.tasks import make_task

    folder = _model_folder(tmp_path, "BlipForConditionalGeneration", 0.0)
    get("onnx")(folder, tmp_path / "e")
    from transformers import BlipForConditionalGeneration

    model = BlipForConditionalGeneration.from_pretrained(folder).eval()
    prep = Preprocessor.from_pretrained(folder)
    task = make_task(get_adapter("blip"), "caption", prep, generation_data, model=model)
    d = task.decoding
    assert d.prompt and d.num_beams == 3
    prompt = torch.tensor([prep.tokenizer(d.prompt)["input_ids"]])
    px = prep.pixels([open_image(_image(tmp_path))])
    with torch.no_grad():
        ids = task.forwards.generate(model, d, pixel_values=px, input_ids=prompt, attention_mask=torch.ones_like(prompt))
    want = prep.decode(ids[:, prompt.shape[1] - 1:])
    assert predict(tmp_path / "e", [_image(tmp_path)], []).lines == want


def test_predict_scores_itm_with_enc_first(tmp_path):
    """The ITM probability ``upop predict`` shows is BLIP's ITM head on [ENC] + the text (ITC reads [CLS])."""
    from upop.datasets.readers import open_image
    from upop.exporters.predict import predict

    adapter = get_adapter("blip")
    model = build_tiny("blip", "BlipForImageTextRetrieval", vocab=99).eval()
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    model.save_pretrained(tmp_path / "m")
    prep = Preprocessor(tok, adapter.image_processor(32))
    prep.save_pretrained(tmp_path / "m")
    get("onnx")(tmp_path / "m", tmp_path / "e")
    texts = ["a red circle", "two blue squares"]
    lines = predict(tmp_path / "e", [_image(tmp_path)], texts).lines
    t = prep.text(texts)
    ids = t["input_ids"].clone()
    ids[:, 0] = tok.convert_tokens_to_ids("[ENC]")
    with torch.no_grad():
        seq, _ = adapter.encode_image(model, prep.pixels([open_image(_image(tmp_path))]))
        p = torch.softmax(adapter.itm_logits(model, seq.expand(2, -1, -1), ids, t["attention_mask"]), 1)[:, 1]
    got = [float(line.split("ITM ")[1].split()[0]) for line in lines]
    assert got == pytest.approx(p.tolist(), abs=2e-3)


@pytest.mark.parametrize("class_name", ["BlipForImageTextRetrieval", "BlipForQuestionAnswering"], ids=["itm", "vqa"])
def test_enc_found_after_dec_is_used_alike_by_pytorch_its_export_and_predict(class_name, generation_data, tmp_path):
    """A tokenizer without [ENC] and a text embedding two rows past it ([DEC] = bos, then [ENC]), as transformers'
    converted BLIP checkpoints are: PyTorch, the export's evaluation and ``upop predict`` all put that row first."""
    from upop.exporters.predict import predict
    from upop.models.enc_token import enc_token_id, text_embedding

    adapter = get_adapter("blip")
    model = build_tiny("blip", class_name, vocab=99)
    t = model.config.text_config
    tok = build_tokenizer()
    t.sep_token_id = t.eos_token_id = tok.sep_token_id  # the tiny config's own ids sit on the last rows
    assert t.bos_token_id == 97 and len(tok) < 97
    model.save_pretrained(tmp_path / "m")
    prep = Preprocessor(tok, adapter.image_processor(32))
    prep.save_pretrained(tmp_path / "m")
    first: list[int] = []
    assert enc_token_id(tok, *text_embedding(model)) == 98
    get("onnx")(tmp_path / "m", tmp_path / "e")
    ref = _json([str(tmp_path / "m"), "--data", str(generation_data), "--device", "cpu", "--batch-size", "4"])
    got = _json([str(tmp_path / "e"), "--data", str(generation_data), "--batch-size", "4"])
    _assert_same(ref["metrics"], got["metrics"])
    real_run = OrtModel.run

    def spy(self, graph, **x):
        if graph in ("itm", "question_encoder"):
            first.append(int(x["input_ids"][0, 0]))
        return real_run(self, graph, **x)

    OrtModel.run = spy
    try:
        predict(tmp_path / "e", [_image(tmp_path)], ["a red circle?"])
    finally:
        OrtModel.run = real_run
    assert first and set(first) == {98}


# ---- bad input: one line, exit 2 ---------------------------------------------------------------------------

def test_a_folder_that_is_not_an_export(tmp_path):
    (tmp_path / "d").mkdir()
    _one_line([str(tmp_path / "d"), "--runtime", "onnxruntime"], "is not an export folder")
    with pytest.raises(ExportFolderError, match="not a upop export folder"):
        evaluate_export(tmp_path / "d")
    _one_line([str(tmp_path / "nope"), "--runtime", "onnxruntime"], "is not an export folder")


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_damaged_graph(exports, tmp_path):
    e = _copy(exports["demo-vit"], tmp_path / "e")
    (e / "classifier.onnx").write_bytes(b"not a graph")
    _one_line([str(e)], "cannot be loaded (damaged or not an ONNX graph)")


@pytest.mark.parametrize("demo,edit,match", [
    ("demo-blip", lambda m: m.update(task="caption"),
     "says task 'caption', but its model class BlipForImageTextRetrieval does 'retrieval'"),
    ("demo-vit", lambda m: m.update(task="nlvr"), "a vit export cannot do task 'nlvr'"),
    ("demo-vit", lambda m: m["evaluation"]["task_options"].update(k_test="16"), "evaluation.task_options k_test='16'"),
    ("demo-vit", lambda m: m["evaluation"].update(demo="demo-gpt"), "evaluation.demo 'demo-gpt' is not a built-in demo"),
    ("demo-vit", lambda m: m.update(graphs=[g for g in m["graphs"] if g["name"] != "classifier"] or [
        {"name": "image_encoder", "file": "classifier.onnx"}]), "needs graph(s) classifier"),
    ("demo-vit", lambda m: m.update(family="gpt"), "unknown model family 'gpt'"),
], ids=["task-other-class", "task-other-family", "option-type", "demo", "graphs", "family"])
def test_an_edited_manifest(exports, tmp_path, demo, edit, match):
    e = _copy(exports[demo], tmp_path / "e")
    manifest = json.loads((e / "export.json").read_text())
    edit(manifest)
    (e / "export.json").write_text(json.dumps(manifest))
    _one_line([str(e)], match)


def test_bad_values_and_no_data(exports, tmp_path):
    _one_line([str(exports["demo-vit"]), "--batch-size", "0"], "--batch-size")
    _one_line([str(exports["demo-vit"]), "--runtime", "tflite"], "--runtime 'tflite' is not a runtime upop knows")
    _one_line(["demo-vit", "--runtime", "onnxruntime"], "is not an export folder")
    e = _copy(exports["demo-vit"], tmp_path / "e")
    manifest = json.loads((e / "export.json").read_text())
    manifest["evaluation"]["demo"] = None
    (e / "export.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="no data given"):
        evaluate_export(e)


# ---- TensorRT ------------------------------------------------------------------------------------------

class _FakeEngine:
    """``EngineRunner``'s interface over an ONNX Runtime session (the "engine" file holds the ONNX graph): what
    ``TrtModel`` calls, checked here without TensorRT."""

    def __init__(self, engine_bytes):
        import onnxruntime as ort

        self.sess = ort.InferenceSession(engine_bytes, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.sess.get_inputs()]
        self.outputs = [o.name for o in self.sess.get_outputs()][::-1]  # an engine's order need not be the graph's
        self.feed = {}
        self.outs = {}

    def bind(self, feed):
        assert set(feed) == set(self.inputs) and all(isinstance(v, torch.Tensor) for v in feed.values())
        self.feed = {k: v.numpy() for k, v in feed.items()}
        self.outs = {}
        return self.outs

    def run(self):
        names = [o.name for o in self.sess.get_outputs()]
        self.outs.update({n: torch.from_numpy(v) for n, v in zip(names, self.sess.run(None, self.feed))})


def _fake_engine_folder(onnx_export: Path, root: Path) -> Path:
    _copy(onnx_export, root / "onnx")
    graphs = json.loads((root / "onnx" / "export.json").read_text())["graphs"]
    for g in graphs:
        (root / f"{g['name']}.engine").write_bytes((root / "onnx" / g["file"]).read_bytes())
    meta = {"format": "tensorrt", "batch": "1:4:8", "engines": [{"name": g["name"], "file": f"{g['name']}.engine"}
                                                                for g in graphs]}
    (root / "engines.json").write_text(json.dumps(meta))
    return root


def test_tensorrt_runtime_over_stub_engines(exports, tmp_path, monkeypatch):
    """The TensorRT path (engines.json, the ONNX manifest beside it, batches capped at the profile, outputs by
    name) with ``EngineRunner`` stubbed by ONNX Runtime: the same metric as the ONNX Runtime path."""
    import upop.exporters.tensorrt as trt_mod

    monkeypatch.setattr(trt_mod, "require_tensorrt", lambda: None)
    monkeypatch.setattr(trt_mod, "EngineRunner", _FakeEngine)
    folder = _fake_engine_folder(exports["demo-blip"], tmp_path / "t")
    got = evaluate_export(folder, runtime="tensorrt", limit=LIMIT, batch_size=64)
    _assert_same(evaluate_export(exports["demo-blip"], limit=LIMIT), got)
    # the ONNX graphs of a TensorRT folder run in ONNX Runtime too
    _assert_same(got, evaluate_export(folder, limit=LIMIT))
    (folder / "itm.engine").unlink()
    with pytest.raises(ExportFolderError, match="itm.engine cannot be read"):
        evaluate_export(folder, runtime="tensorrt")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available(),
                    reason="TensorRT and a GPU are present: the engine test below runs instead")
def test_tensorrt_runtime_missing_is_one_line(exports, tmp_path):
    folder = _fake_engine_folder(exports["demo-vit"], tmp_path / "t")
    r = CliRunner().invoke(app, ["eval", str(folder), "--runtime", "tensorrt"])
    assert r.exit_code == 2 and r.output.count("\n") == 1
    assert ('pip install "upop[trt]"' in r.output) or ("NVIDIA GPU" in r.output)
    _one_line([str(exports["demo-vit"]), "--runtime", "tensorrt"], "no engines.json")


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available(),
                    reason="needs TensorRT and an NVIDIA GPU")
@pytest.mark.parametrize("demo", ["demo-vit", "demo-blip"])
def test_tensorrt_engines_evaluate_as_pytorch(demo, tmp_path):
    get("trt")(demo, tmp_path / "t")
    ref = _json([demo, "--device", "cpu", "--limit", str(LIMIT)])
    got = _json([str(tmp_path / "t"), "--runtime", "tensorrt", "--limit", str(LIMIT)])
    assert got["providers"] == ["TensorRT"]
    # TensorRT builds fp32 networks with TF32 allowed (its default), which moves scores past fp32 rounding: the
    # metric is held to one record's worth, not METRIC_TOL
    assert abs(got["metrics"]["primary"] - ref["metrics"]["primary"]) <= 100.0 / LIMIT + 1e-6
    assert np.isfinite(list(got["metrics"].values())).all()


def test_a_deeply_nested_engines_json_is_one_error(tmp_path):
    """engines.json comes from anywhere, as export.json does: read with the same depth limit."""
    from upop.errors import ExportFolderError
    from upop.exporters.runtime import read_engines_manifest

    (tmp_path / "engines.json").write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(ExportFolderError, match="nested more than|damaged"):
        read_engines_manifest(tmp_path)
