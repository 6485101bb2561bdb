"""The compress report's latency rows for a deployment that decodes with a cache (``upop.latency.measure``): image
encode, prefill at a stated prompt length and one decode step at a stated past length with its tokens/s, before and
after, in PyTorch and ONNX Runtime; a model whose deployment is one forward gets no such rows."""

import pytest
import torch

from upop.latency.measure import STAGES, TEXT_TOKENS, latency_rows, measure, staged_graphs, torch_runtime

from ..exporters.test_vlm_export import IMAGE_TOKEN, SIZE, build, slim


class _Inputs:
    """Example inputs of the forward the report also times (the family adapters are not on this branch)."""

    def example_inputs(self, model, batch_size, seq_len, generator):
        tokens = 16  # the tiny LLaVA's image features per image
        ids = torch.randint(3, IMAGE_TOKEN - 1, (batch_size, seq_len + tokens), generator=generator)
        ids[:, 1:1 + tokens] = IMAGE_TOKEN
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "pixel_values": torch.randn(batch_size, 3, SIZE, SIZE, generator=generator)}


@pytest.fixture(scope="module")
def timed():
    from upop.exporters.timing import ort_runtime

    cpu = torch.device("cpu")
    runtimes = {"torch": torch_runtime(cpu), "onnxruntime": ort_runtime(cpu)}
    before = measure(build("llava-clip-llama"), _Inputs(), [1], cpu, runtimes)
    after = measure(slim(build("llava-clip-llama")), _Inputs(), [1], cpu, runtimes)
    return before, after, latency_rows(before, after, cpu)


def test_rows_for_image_encode_prefill_and_decode_in_every_runtime(timed):
    _before, _after, rows = timed
    staged = {(r["runtime"], r["stage"]): r for r in rows if "stage" in r}
    assert set(staged) == {(rt, s) for rt in ("torch", "onnxruntime") for s in ("image encode", "prefill", "decode")}
    assert [r for r in rows if "stage" not in r] == []  # one whole forward is not how it runs: stages only
    for rt in ("torch", "onnxruntime"):
        assert staged[(rt, "prefill")]["tokens"] == f"sequence {TEXT_TOKENS}"
        decode = staged[(rt, "decode")]
        assert decode["tokens"] == f"past {TEXT_TOKENS}" and decode["graph"] == "decoder_step"
        assert decode["after_tokens_per_s"] == pytest.approx(1000.0 / decode["after_ms"])
        assert all(r["before_ms"] > 0 and r["after_ms"] > 0 for r in staged.values())


def test_a_one_forward_deployment_has_no_stages():
    from transformers import ViTConfig, ViTForImageClassification

    model = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                intermediate_size=64, image_size=16, patch_size=8))
    assert staged_graphs(model, None) == []
    assert [g.stage for g in staged_graphs(build("idefics3-siglip-llama"), None)] == ["image encode", "prefill", "decode"]


def test_stage_rows_survive_a_saved_and_resumed_baseline(timed):
    import io

    before, after, _rows = timed
    buf = io.BytesIO()
    torch.save({"latency": before}, buf)  # the run state's file (upop.run.state)
    buf.seek(0)
    resumed = torch.load(buf, weights_only=True)["latency"]  # as a resumed run reads it back
    assert STAGES in resumed["torch"]
    rows = latency_rows(resumed, after, torch.device("cpu"))
    assert sorted(r.get("stage", "forward") for r in rows if r["runtime"] == "torch") == \
        ["decode", "image encode", "prefill"]


def test_the_report_table_names_each_stage_its_tokens_and_the_decode_tokens_per_second(timed):
    from upop.run.report import Report, summary_rows

    _before, _after, rows = timed
    report = Report(model="m", family="llava", model_class="LlavaForConditionalGeneration", task="vqa", ratio=0.5,
                    granularity="head", profile=None, removed_cost_share=0.5, metrics={}, params={"before": {}, "after": {}},
                    flops={"before": {}, "after": {}}, modules=[], search={}, retrain={}, seconds=0.0, latency=rows)
    labels = [r[0] for r in summary_rows(report)]
    assert f"latency ms, prefill at sequence {TEXT_TOKENS}, onnxruntime cpu batch 1 (p50)" in labels
    assert f"latency ms, decode at past {TEXT_TOKENS}, torch cpu batch 1 (p50)" in labels
    assert f"tokens/s, decode at past {TEXT_TOKENS}, onnxruntime cpu" in labels
    assert "latency ms, image encode, torch cpu batch 1 (p50)" in labels


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_stages_are_timed_on_the_gpu_where_the_model_is():
    from upop.latency.measure import time_stages

    cuda = torch.device("cuda")
    model = slim(build("idefics3-siglip-llama")).to(cuda)
    stages = time_stages(model, None, cuda, torch_runtime(cuda))
    assert [s["stage"] for s in stages.values()] == ["image encode", "prefill", "decode"]
    assert all(s["p50_ms"] > 0 for s in stages.values()) and stages["decoder_step"]["tokens_per_s"] > 0


def test_a_runtime_that_cannot_run_the_model_loses_its_rows_not_the_run(capsys):
    """Idefics3's whole forward does not export to ONNX: a failing runtime is said once and left out."""
    from upop.latency.measure import Runtime
    from upop.run.safety import forget_notes

    def broken(model, inputs):
        raise RuntimeError("ONNX export failed\nwith a long trace")

    forget_notes()
    cpu = torch.device("cpu")
    out = measure(build("llava-clip-llama"), _Inputs(), [1], cpu, {"torch": torch_runtime(cpu), "bad": Runtime(broken)})
    assert set(out) == {"torch"} and set(out["torch"]) == {STAGES}
    err = capsys.readouterr().err
    assert "latency in bad not measured (RuntimeError: ONNX export failed); the report has no bad rows" in err
