import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import upop
from upop.adapters import get_adapter
from upop.exporters import get
from upop.exporters.graphs import export_graphs
from upop.exporters.onnx import ExportError, ParityError, check_parity
from upop.exporters.runtime import OrtModel
from upop_cli.app import app

from ...conftest import FAMILY_CLASSES, IDS, batches_for, build_tiny

ROOT = Path(__file__).resolve().parents[3]



def needs_tensorrt_gpu(fn):
    """The GPU and TensorRT markers, and a skip with the reason where either is missing."""
    skip = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available(),
                              reason="needs TensorRT and an NVIDIA GPU")
    return pytest.mark.gpu(pytest.mark.tensorrt(skip(fn)))

def _slim(family, class_name, tmp_path, ratio=0.5):
    adapter = get_adapter(family)
    model = build_tiny(family, class_name)
    cfg = upop.CompressConfig(ratio=ratio, search=upop.SearchConfig(steps=3, update_every=1, lr=1e-4),
                              retrain=upop.RetrainConfig(epochs=0))
    res = upop.compress(model, cfg, batches=batches_for(adapter, model, n=2))
    sizes = {len(k) for k in res.search.kept.values()}
    assert len(sizes) > 1  # modules kept different sizes
    return res, res.save(tmp_path / "slim")


@pytest.mark.parametrize("family,class_name", FAMILY_CLASSES, ids=IDS)
def test_every_family_exports_with_parity_at_batch_1_and_3(family, class_name, tmp_path):
    _res, slim = _slim(family, class_name, tmp_path)
    man = get("onnx")(slim, tmp_path / "onnx", fp16=True)
    on_disk = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert on_disk["graphs"] and on_disk["slim"] is True
    assert on_disk["source_sha256"] == json.loads((slim / "upop_manifest.json").read_text())["weights"]["sha256"]
    for g in man["graphs"]:
        assert {p["batch"] for p in g["parity"]} == {1, 3}
        assert all(p["max_abs"] <= 1e-4 for p in g["parity"])
        assert all(p["max_abs"] <= p["tolerance"] for p in g["fp16"]["parity"])
        assert (tmp_path / "onnx" / g["file"]).is_file() and (tmp_path / "onnx" / g["fp16"]["file"]).is_file()
        assert g["inputs"] and g["outputs"]


@pytest.mark.parametrize("class_name", ["BlipForConditionalGeneration", "BlipForQuestionAnswering"])
def test_greedy_loop_over_ort_graphs_matches_generate(class_name, tmp_path):
    res, slim = _slim("blip", class_name, tmp_path)
    get("onnx")(slim, tmp_path / "onnx")
    ort_model = OrtModel(tmp_path / "onnx")
    model = upop.load(slim)
    cfg = model.config.text_config
    torch.manual_seed(3)
    px = torch.randn(3, 3, 32, 32)
    if class_name == "BlipForConditionalGeneration":
        ref = model.generate(pixel_values=px, max_new_tokens=8, do_sample=False, num_beams=1)
        got = ort_model.greedy_caption(px.numpy(), cfg.bos_token_id, cfg.sep_token_id, max_new_tokens=8)
    else:
        ids = torch.randint(1, cfg.vocab_size - 2, (3, 6))
        mask = torch.ones_like(ids)
        ref = model.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                             num_beams=1)
        got = ort_model.greedy_answer(px.numpy(), ids.numpy(), mask.numpy(), cfg.bos_token_id, cfg.sep_token_id,
                                      max_new_tokens=8)
    assert ref.shape[1] > 2
    assert np.array_equal(ref.numpy(), got[:, : ref.shape[1]])


def _prompted(model, n: int, length: int, seed: int):
    """Pixels and prompt ids as BLIP's generate takes them ([CLS] prompt [SEP]; it drops the last, starts at [DEC])."""
    cfg = model.config.text_config
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(n, 3, 32, 32, generator=g)
    ids = torch.randint(5, cfg.vocab_size - 2, (n, length), generator=g)
    ids[:, -1] = cfg.sep_token_id
    prompt = ids[:, :-1].clone()
    prompt[:, 0] = cfg.bos_token_id
    return px, ids, prompt


@pytest.mark.parametrize("beams,min_length", [(3, 9), (2, 0), (4, 4)])
def test_beam_search_over_ort_graphs_matches_generate(beams, min_length, tmp_path):
    """The reference's caption decoding (a prompt, beam search, a minimum and maximum length) through the
    exported prefill and step graphs gives generate()'s tokens, the prompt included."""
    from upop.exporters.beam import BeamSettings

    _res, slim = _slim("blip", "BlipForConditionalGeneration", tmp_path)
    get("onnx")(slim, tmp_path / "onnx")
    ort_model, model = OrtModel(tmp_path / "onnx"), upop.load(slim)
    cfg = model.config.text_config
    for seed in range(3):
        px, ids, prompt = _prompted(model, 3, 4, seed)
        ref = model.generate(pixel_values=px, input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=beams,
                             max_length=12, min_length=min_length, do_sample=False, length_penalty=1.0,
                             early_stopping=False)
        got = ort_model.beam_caption(px.numpy(), prompt.numpy(), cfg.sep_token_id, cfg.pad_token_id,
                                     BeamSettings(beams, 12, min_length))
        assert np.array_equal(ref.numpy(), got), (seed, ref, got)


def test_beam_search_matches_generate_token_for_token_on_pytorch_logits():
    """The numpy beam search alone, driven by the PyTorch decoder (no cache: the whole sequence each step),
    against generate(): no runtime noise, so every token and every length must agree. With the end token's
    bias raised, beams end at different lengths, so the length normalisation (a length penalty of 0 or 2
    instead of 1 fails 1 and 9 of these 12 seeds) and min_length (0 instead of 4 fails all 12) both decide."""
    from upop.exporters.beam import BeamSettings, beam_search

    model = build_tiny("blip", "BlipForConditionalGeneration", vocab=99).eval()
    cfg = model.config.text_config
    with torch.no_grad():  # the end token competes: finished beams of several lengths, min_length binding
        model.text_decoder.cls.predictions.bias[cfg.sep_token_id] += 1.0
    for seed in range(12):
        px, ids, prompt = _prompted(model, 2, 3, seed)
        with torch.no_grad():
            emb = model.vision_model(pixel_values=px)[0].repeat_interleave(3, 0)
        seqs = {}

        def logits_of(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                out = model.text_decoder(input_ids=torch.from_numpy(x), encoder_hidden_states=emb)
            return out.logits[:, -1].numpy()

        def prefill(x):
            seqs["ids"] = x
            return logits_of(x)

        def step(tokens, rows, length):
            seqs["ids"] = np.concatenate([seqs["ids"][rows], tokens[:, None]], axis=1)
            assert seqs["ids"].shape[1] == length
            return logits_of(seqs["ids"])

        got = beam_search(prefill, step, prompt.numpy(), cfg.sep_token_id, cfg.pad_token_id, BeamSettings(3, 10, 4))
        with torch.no_grad():
            ref = model.generate(pixel_values=px, input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=3,
                                 max_length=10, min_length=4, do_sample=False)
        assert np.array_equal(ref.numpy(), got), (seed, ref, got)


def test_parity_failure_is_a_typed_error_naming_graph_output_and_tolerance(tmp_path):
    _res, slim = _slim("vit", "ViTForImageClassification", tmp_path)
    get("onnx")(slim, tmp_path / "onnx")
    graph = export_graphs(upop.load(slim), get_adapter("vit"))[0]
    with torch.no_grad():
        graph.module.model.classifier.bias.add_(1.0)  # PyTorch now differs from the exported graph
    with pytest.raises(ParityError, match=r"graph classifier: output logits differs .* \(tolerance 0.0001\)"):
        check_parity(graph, tmp_path / "onnx" / "classifier.onnx", (1,), 8, 1e-4, relative_to_scale=False)


def test_cli_export_and_predict(tmp_path):
    import transformers

    _res, slim = _slim("vit", "ViTForImageClassification", tmp_path)
    transformers.ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(slim)
    runner = CliRunner()
    r = runner.invoke(app, ["export", str(slim), "--out", str(tmp_path / "e"), "--fp16"])
    assert r.exit_code == 0, r.output
    assert "classifier" in r.output and (tmp_path / "e" / "preprocessor_config.json").is_file()
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "x.png")
    r = runner.invoke(app, ["predict", str(tmp_path / "e"), "--image", str(tmp_path / "x.png")])
    assert r.exit_code == 0, r.output
    assert "LABEL_" in r.output and "CPUExecutionProvider" in r.output
    r = runner.invoke(app, ["export", str(slim), "--out", str(tmp_path / "e")])
    assert r.exit_code == 2 and "already exists" in r.output


def test_export_of_a_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "src").mkdir()
    r = CliRunner().invoke(app, ["export", str(tmp_path / "src"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "neither a upop slim checkpoint nor a model folder" in r.output
    with pytest.raises(ExportError):
        get("onnx")(tmp_path / "src", tmp_path / "o2")


def test_unknown_format(tmp_path):
    r = CliRunner().invoke(app, ["export", str(tmp_path), "--format", "tflite"])
    assert r.exit_code == 2 and "supported formats: onnxruntime (or ort, onnx), openvino, tensorrt (or trt)" in r.output


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available(),
                    reason="TensorRT and a GPU are present: the engine test below runs instead")
def test_tensorrt_missing_is_one_clean_line(tmp_path):
    _res, slim = _slim("vit", "ViTForImageClassification", tmp_path)
    r = CliRunner().invoke(app, ["export", str(slim), "--format", "trt", "--out", str(tmp_path / "t")])
    assert r.exit_code == 2
    assert ('pip install "upop[trt]"' in r.output) or ("NVIDIA GPU" in r.output)
    assert not (tmp_path / "t").exists()


def test_tensorrt_profile_shapes_and_batch_parsing():
    from upop.errors import UpopError
    from upop.exporters.tensorrt import ShapeRange, profile_shapes

    io = [{"name": "input_ids", "shape": ["batch", "sequence"]}, {"name": "pixel_values", "shape": ["batch", 3, 32, 32]}]
    shapes = profile_shapes(io, ShapeRange.parse("1:4:16"), ShapeRange.parse("1:12:64"))
    assert shapes["input_ids"] == ((1, 1), (4, 12), (16, 64))
    assert shapes["pixel_values"] == ((1, 3, 32, 32), (4, 3, 32, 32), (16, 3, 32, 32))
    kv = profile_shapes([{"name": "past_self_key_0", "shape": ["batch", 2, "past", 8]}], ShapeRange.parse("1:4:16"),
                        ShapeRange.parse("1:12:64"))
    assert kv["past_self_key_0"] == ((1, 2, 1, 8), (4, 2, 12, 8), (16, 2, 64, 8))  # a cache grows with tokens
    step = profile_shapes([{"name": "attention_mask", "shape": ["batch", "total"]}], ShapeRange.parse("1:4:16"),
                          ShapeRange.parse("1:12:64"))
    assert step["attention_mask"] == ((1, 2), (4, 13), (16, 65))  # a decode step's mask: the past and the new token
    for bad in ("8:4:16", "1:2", "a:b:c", "0:1:2"):
        with pytest.raises(UpopError, match="MIN:OPT:MAX"):
            ShapeRange.parse(bad)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_stubs") is None,
                    reason="tensorrt-stubs not installed (pip install --no-deps tensorrt-stubs)")
def test_tensorrt_module_type_checks_against_the_stubs(tmp_path):
    script = str(ROOT / "scripts" / "typecheck_tensorrt.py")
    r = subprocess.run([sys.executable, script], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    canary = tmp_path / "canary.py"  # the stubs in effect: a misspelt builder call fails (else every call would pass)
    canary.write_text("import tensorrt as trt\n\n\ndef f() -> None:\n"
                      "    trt.Builder(trt.Logger(trt.Logger.WARNING)).create_network_v3()\n")
    r = subprocess.run([sys.executable, script, str(canary)], capture_output=True, text=True)
    assert r.returncode == 1 and 'has no attribute "create_network_v3"' in r.stdout, r.stdout + r.stderr


@needs_tensorrt_gpu
def test_tensorrt_engines_build(tmp_path):
    _res, slim = _slim("vit", "ViTForImageClassification", tmp_path)
    meta = get("trt")(slim, tmp_path / "trt", fp16=True, batch="1:2:4")
    assert all((tmp_path / "trt" / e["file"]).stat().st_size > 0 for e in meta["engines"])


@needs_tensorrt_gpu
def test_tensorrt_profile_and_calibration(tmp_path):
    from upop.adapters import get_adapter
    from upop.latency.calibrate import calibrate
    from upop.exporters.timing import block_timer, profile_trt
    from upop.profiles import load

    _res, slim = _slim("vit", "ViTForImageClassification", tmp_path)
    get("trt")(slim, tmp_path / "trt", fp16=True, batch="1:2:4")
    runs = profile_trt(str(tmp_path / "trt"), [1, 4], "cuda", "fp16", warmup=2, runs=5)
    assert {r.batch for r in runs} == {1, 4} and all(r.p50_ms > 0 and r.provider == "TensorRT" for r in runs)
    built = profile_trt(str(slim), [2], "cuda", "fp32", warmup=2, runs=5)  # engines built on the way
    assert built and all(r.batch == 2 for r in built)
    model = build_tiny("vit", "ViTForImageClassification").cuda()
    base = load("h100")
    prof = calibrate(model, get_adapter("vit"), base, device=torch.device("cuda"), runtime="tensorrt", points=2, warmup=2,
                     runs=5, timer=block_timer("tensorrt", torch.device("cuda"), base.precision))
    assert prof.table["runtime"] == "tensorrt" and all(m > 0 for b in prof.table["blocks"] for m in b["ms"])


def test_a_graph_that_reads_what_the_export_does_not_give_is_refused_in_one_line():
    """Every runtime's graphs are fed through GraphModel.feed: the inputs a graph reads, or one line naming it."""
    from upop.exporters.runtime import ExportFolderError, GraphModel

    class Stub(GraphModel):
        manifest, dir = {"task": "classification"}, Path("exp")

        def input_names(self, graph):
            return ["pixel_values", "input_ids"]

    px = np.zeros(1)
    assert list(Stub().feed("g", {"pixel_values": px, "input_ids": px, "extra": px})) == ["pixel_values", "input_ids"]
    with pytest.raises(ExportFolderError, match=r"^exp: graph g takes pixel_values, input_ids, not what a "
                                                r"classification export gives it: the graph is not this export's$"):
        Stub().feed("g", {"pixel_values": px})
