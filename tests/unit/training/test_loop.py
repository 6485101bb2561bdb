"""The one training loop: gradient accumulation, step caps, skipped mask gradients, logging, throughput."""

import pytest
import torch

import upop
from upop.adapters import get_adapter
from upop.run.config import RetrainConfig, SearchConfig
from upop.training.retrain import retrain
from upop.pruning.search import SearchPhase, search

from ...conftest import batches_for, build_tiny


def _halves(batches):
    """The same items as ``batches``, each batch split in two (for grad_accum=2)."""
    out = []
    for b in batches:
        n = next(iter(b.values())).shape[0] // 2
        out += [{k: v[:n] for k, v in b.items()}, {k: v[n:] for k, v in b.items()}]
    return out


def _vit():
    return get_adapter("vit"), build_tiny("vit", "ViTForImageClassification")


def _labelled(adapter, model, n):
    """Batches of 4 that carry their labels (the native loss labels by batch position, which a split changes)."""
    out = batches_for(adapter, model, n=n, batch_size=4)
    for i, b in enumerate(out):
        b["labels"] = (torch.arange(4) + i) % model.config.num_labels
    return out


def _loss(model, batch):
    return model(**batch).loss


def _same_weights(a, b):
    for k, v in a.state_dict().items():
        # The key bias cannot change attention (softmax is shift-invariant): its gradient is rounding noise,
        # which Adam scales up to full steps, so it differs between any two summation orders.
        if not k.endswith("k_proj.bias"):
            assert torch.allclose(v, b.state_dict()[k], atol=1e-5), k


def test_search_with_grad_accum_equals_one_batch_of_the_whole(tmp_path):
    adapter, model = _vit()
    whole = _labelled(adapter, model, 3)
    cfg = dict(ratio=0.5, epochs=2, update_every=2, lr=1e-3)
    a = search(model, adapter.modules(model), _loss, whole, SearchConfig(**cfg))
    model2 = build_tiny("vit", "ViTForImageClassification")
    b = search(model2, adapter.modules(model2), _loss, _halves(whole), SearchConfig(**cfg, grad_accum=2))
    assert a.steps == b.steps == 6
    assert a.kept == b.kept
    for name, imp in a.importance.items():
        ref = torch.tensor(imp)
        assert torch.allclose(torch.tensor(b.importance[name]), ref, atol=1e-6 * float(ref.abs().max()) + 1e-12), name
    assert [h["loss"] for h in a.history] == pytest.approx([h["loss"] for h in b.history], rel=1e-5)
    _same_weights(model, model2)


def test_retrain_with_grad_accum_equals_one_batch_of_the_whole():
    adapter, model = _vit()
    whole = _labelled(adapter, model, 3)
    a = retrain(model, _loss, whole, RetrainConfig(epochs=2, lr=1e-3))
    model2 = build_tiny("vit", "ViTForImageClassification")
    b = retrain(model2, _loss, _halves(whole), RetrainConfig(epochs=2, lr=1e-3, grad_accum=2))
    assert len(a.history) == len(b.history) == 6
    assert [h["lr"] for h in a.history] == [h["lr"] for h in b.history]
    _same_weights(model, model2)


def test_max_steps_caps_the_search_and_the_retrain():
    adapter, model = _vit()
    batches = batches_for(adapter, model, n=4)
    res = search(model, adapter.modules(model), adapter.native_loss, batches, SearchConfig(epochs=3, max_steps=5))
    assert res.steps == 5 and len(res.history) == 5 and res.history[-1]["pi"] == pytest.approx(0.5)
    rt = retrain(model, adapter.native_loss, batches, RetrainConfig(epochs=3, max_steps=7))
    assert len(rt.history) == 7


def test_a_non_finite_mask_gradient_is_left_out_of_the_importance_and_counted():
    adapter, model = _vit()
    phase = SearchPhase(model, adapter.modules(model), SearchConfig(), total=4, unit_costs=None, allowed_sizes=None,
                        resume=None)
    zetas = [z for _, z in phase.masks.items()]
    for z in zetas:
        z.grad = torch.ones_like(z)
    zetas[1].grad[0] = float("inf")  # an fp16 overflow in one module
    phase.after_backward(None)
    for z in zetas:
        z.grad = torch.full_like(z, 2.0)
    phase.after_backward(None)
    phase.sync()
    assert phase.skipped == 1
    assert torch.equal(phase.importance, torch.full_like(phase.importance, 2.0))
    phase.masks.remove()


def test_losses_are_logged_for_every_step_in_order_whatever_the_logging_window(monkeypatch):
    from upop.training import loop

    adapter, model = _vit()
    batches = batches_for(adapter, model, n=3)
    ref = search(model, adapter.modules(model), adapter.native_loss, batches, SearchConfig(epochs=3, update_every=2))
    real_init = loop.LoopSettings.__init__

    def windowed(self, *a, **kw):
        real_init(self, *a, **kw)
        self.log_every = 4  # fetch the losses every 4 steps (what a GPU run does every 10)

    monkeypatch.setattr(loop.LoopSettings, "__init__", windowed)
    seen = []
    model2 = build_tiny("vit", "ViTForImageClassification")
    res = search(model2, adapter.modules(model2), adapter.native_loss, batches, SearchConfig(epochs=3, update_every=2),
                 progress=seen.append)
    assert [h["step"] for h in res.history] == list(map(float, range(1, 10)))
    assert [h["loss"] for h in res.history] == pytest.approx([h["loss"] for h in ref.history], rel=1e-6)
    assert [int(r["step"]) for r in seen] == [4, 8, 9]  # one progress line per window
    assert all(r["images_per_s"] > 0 and 0 <= r["data_wait"] <= 1 and r["step_s"] > 0 for r in seen)


def test_the_report_has_throughput_time_per_phase_and_peak_memory():
    adapter, model = _vit()
    cfg = upop.CompressConfig(ratio=0.5, search=upop.SearchConfig(steps=4, update_every=2),
                              retrain=upop.RetrainConfig(epochs=1, steps_per_epoch=2))
    res = upop.compress(model, cfg, batches=batches_for(adapter, model, n=2), eval_fn=lambda m: 0.0)
    perf = res.report.performance
    assert set(perf["seconds"]) == {"baseline", "latency", "search", "retrain"} and all(v >= 0 for v in perf["seconds"].values())
    for phase in ("search", "retrain"):
        assert perf[phase]["images_per_s"] > 0 and 0 <= perf[phase]["data_wait"] <= 1
    assert perf["search"]["steps"] == 4 and perf["retrain"]["steps"] == 2
    assert perf["peak_memory"]["host_rss_mib"] > 10
    assert res.report.search["skipped_steps"] == 0
    assert res.report.distributed["effective_batch"] == 2 and res.report.distributed["grad_accum"] == 1


def test_each_run_starts_the_gpu_peak_again(monkeypatch):
    """A run's peak CUDA memory is its own: the counter is reset when a run starts (a stubbed torch.cuda: the
    reset, then the read, both on the run's device)."""
    from upop.run import pipeline
    from upop.training import loop

    calls: list[tuple[str, torch.device]] = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: calls.append(("reset", d)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: calls.append(("read", d)) or 3 * 2**20)
    monkeypatch.setattr(pipeline, "resolve_device", lambda _name: torch.device("cuda", 0))
    monkeypatch.setattr(pipeline, "torch_runtime", lambda d: None)
    run = pipeline.start_run(upop.CompressConfig(device="cuda"), None, 0)
    assert calls == [("reset", torch.device("cuda", 0))]
    assert loop.peak_memory(run.device)["cuda_max_allocated_mib"] == 3.0 and calls[-1] == ("read", torch.device("cuda", 0))
    loop.reset_peak_memory(torch.device("cpu"))  # nothing to reset on the CPU
    assert len(calls) == 2


def test_ctrl_c_inside_a_step_is_acted_on_when_the_step_is_whole():
    import os
    import signal

    from upop.training.loop import deferred_interrupt

    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)  # lands mid-step
            done.append("rest of the step")
    assert done == ["rest of the step"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            done.append("not reached")
    assert done == ["rest of the step"]


@pytest.fixture(params=[False, True], ids=["alone", "group-of-one"])
def alone_or_grouped(request, tmp_path):
    """This process alone, or in a process group of one (what ``torchrun --nproc-per-node 1`` gives)."""
    if request.param:
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    yield request.param
    if request.param:
        torch.distributed.destroy_process_group()


def test_an_interrupt_during_the_last_mask_update_resumes_to_the_same_selection(tmp_path, monkeypatch,
                                                                                 alone_or_grouped):
    """Ctrl-C arriving while the final masks move (where a GPU run first waits for the device) is deferred
    to the end of the step, so the saved state holds the final selection; a group of one saves it too (no
    other worker to wait for)."""
    import os
    import signal

    from upop.pruning import search as search_mod

    adapter, model = _vit()
    batches = batches_for(adapter, model, n=3)
    cfg = SearchConfig(epochs=2, update_every=2)
    ref = search(model, adapter.modules(model), adapter.native_loss, batches, cfg)
    real = search_mod.SearchPhase._move_masks

    def interrupted(self, step):
        if step == self.total:
            os.kill(os.getpid(), signal.SIGINT)
        real(self, step)

    monkeypatch.setattr(search_mod.SearchPhase, "_move_masks", interrupted)
    saved = []
    model2 = build_tiny("vit", "ViTForImageClassification")
    with pytest.raises(KeyboardInterrupt):
        search(model2, adapter.modules(model2), adapter.native_loss, batches, cfg, on_interrupt=saved.append)
    state = saved[0]
    assert state["step"] == 6 and state["pi"] == pytest.approx(0.5) and len(state["history"]) == 6
    assert bool(state["marked"].any()) and all(float(z.min()) == 0.0 for z in state["zeta"].values() if (z < 1).any())
    specs = adapter.modules(model2)
    expected = [j not in ref.kept[sp.name] for sp in specs for j in range(sp.num_units("dim"))]
    assert state["marked"].tolist() == expected
    assert [h["pi"] for h in state["history"]] == [h["pi"] for h in ref.history]


# -- what only a GPU would show: host reads, the AMP dtype, the grad scaler's state ---------------------------

def test_a_blip_retrieval_step_reads_the_device_at_most_once_per_logging_window(tmp_path):
    """The loop fetches the losses once per window; nothing else in a step (BLIP's gathers, its momentum queue,
    its hard negatives keyed by the batch's images) may read a device value back. The only other reads are
    transformers' own check of each text padding mask (outside upop: counted apart and named)."""
    from upop.datasets import shapes

    from ...gpuless import blip_training_reads

    data = shapes(tmp_path / "d", train=8, val=2, test=3, image_size=32, classification_per_class=(1, 1, 1))
    res = blip_training_reads(str(data), 7, 3)
    assert res["steps"] == 7 and res["windows"] == 3
    assert len(res["after_first"]) <= res["windows"], res["after_first"]
    assert {c.split(" at ")[1].split(":")[0] for c in res["library"]} <= {"transformers/masking_utils.py"}


def _emulated_bf16(including_emulation=True):
    """A V100's answer: bf16 only by emulation."""
    return including_emulation


def test_a_gpu_that_only_emulates_bf16_trains_in_fp16_with_a_grad_scaler(monkeypatch):
    from upop.training.parts import amp_dtype, grad_scaler

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", _emulated_bf16)
    assert amp_dtype(cuda, True) == torch.float16
    assert isinstance(grad_scaler(torch.device("cpu"), amp_dtype(cuda, True)), torch.amp.GradScaler)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100
    assert amp_dtype(cuda, True) == torch.bfloat16 and grad_scaler(cuda, torch.bfloat16) is None
    assert amp_dtype(cuda, False) is None and amp_dtype(torch.device("cpu"), True) is None


def test_a_resumed_fp16_run_keeps_its_loss_scale(monkeypatch):
    """The grad scaler's scale is part of the state: a resumed fp16 run goes on with it rather than restarting at
    2**16 (and skipping steps while it backs off again). fp16 autocast and the scaler run on the CPU here."""
    from upop.training import loop as loop_mod

    monkeypatch.setattr(loop_mod, "amp_dtype", lambda device, enabled: torch.float16 if enabled else None)
    adapter, model = _vit()
    batches = _labelled(adapter, model, 3)
    settings = loop_mod.LoopSettings(total=2, lr=1e-3, weight_decay=0.0, amp=True, seed=0)
    first = loop_mod.TrainLoop(model, _loss, batches, settings, loop_mod.Phase())
    first.run()
    first.scaler.update(1234.0)  # as after some overflows
    state = first.state()
    assert state["scaler"]["scale"] == 1234.0
    resumed = loop_mod.TrainLoop(build_tiny("vit", "ViTForImageClassification"), _loss, batches,
                                 loop_mod.LoopSettings(total=3, lr=1e-3, weight_decay=0.0, amp=True, seed=0),
                                 loop_mod.Phase(), resume=state)
    resumed._restore()
    assert resumed.scaler.get_scale() == 1234.0
