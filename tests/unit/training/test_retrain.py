import pytest
import torch

from upop.run.config import RetrainConfig
from upop.training.retrain import retrain, warmup_cosine
from upop.pruning.slim import slim_model

from ...conftest import batches_for, build_tiny
from upop.adapters import get_adapter


def test_warmup_then_cosine_to_zero():
    f = warmup_cosine(warmup=4, total=20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0
    assert f(20) == pytest.approx(0.0)
    vals = [f(s) for s in range(4, 21)]
    assert all(b <= a for a, b in zip(vals, vals[1:]))


def test_retrain_lowers_the_loss_of_a_slim_model():
    adapter = get_adapter("vit")
    model = build_tiny("vit", "ViTForImageClassification")
    specs = adapter.modules(model)
    slim_model(model, specs, {s.name: list(range(s.num_units("dim") // 2)) for s in specs}, "dim", adapter)
    batches = batches_for(adapter, model, n=1, batch_size=4)
    with torch.no_grad():
        before = float(adapter.native_loss(model, batches[0]))
    retrain(model, adapter.native_loss, batches, RetrainConfig(epochs=1, steps_per_epoch=30, lr=3e-3, warmup_ratio=0.1))
    with torch.no_grad():
        after = float(adapter.native_loss(model.eval(), batches[0]))
    assert after < before * 0.8


def test_the_best_evaluated_state_is_kept():
    adapter = get_adapter("vit")
    model = build_tiny("vit", "ViTForImageClassification")
    batches = batches_for(adapter, model, n=2)
    scores = iter([5.0, 9.0, 1.0, 2.0])  # epochs 0..3: the best is after epoch 1
    states = []

    def eval_fn(m):
        states.append({k: v.clone() for k, v in m.state_dict().items()})
        return next(scores)

    res = retrain(model, adapter.native_loss, batches, RetrainConfig(epochs=3, lr=1e-3), eval_fn=eval_fn)
    assert res.best_epoch == 1 and res.best_metric == 9.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, states[1][k])
    assert [e["epoch"] for e in res.evals] == [0, 1, 2, 3]


def test_zero_epochs_leaves_the_model_alone():
    adapter = get_adapter("vit")
    model = build_tiny("vit", "ViTForImageClassification")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    retrain(model, adapter.native_loss, batches_for(adapter, model, n=1), RetrainConfig(epochs=0))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _blip_cosine_lr_schedule(epoch: int, max_epoch: int, init_lr: float, min_lr: float) -> float:
    """The reference's (BLIP utils.cosine_lr_schedule), called once at the start of each epoch."""
    import math

    return (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / max_epoch)) + min_lr


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_the_epoch_cosine_schedule_is_the_references_without_clipping(monkeypatch, grad_accum):
    import upop.training.retrain as rt

    adapter = get_adapter("vit")
    model = build_tiny("vit", "ViTForImageClassification")
    batches = batches_for(adapter, model, n=4, batch_size=2)
    seen = []
    real = rt.TrainLoop
    monkeypatch.setattr(rt, "TrainLoop", lambda m, loss, b, settings, *a, **k: seen.append(settings) or real(
        m, loss, b, settings, *a, **k))
    clipped = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: clipped.append(1))
    cfg = RetrainConfig(epochs=3, lr=1e-3, schedule="epoch-cosine", grad_accum=grad_accum)
    retrain(model, adapter.native_loss, batches, cfg)
    (settings,) = seen
    per_epoch = 4 // grad_accum  # optimizer steps per epoch
    assert settings.total == 3 * per_epoch and settings.max_grad_norm is None and not clipped
    lrs = [1e-3 * settings.schedule(step) for step in range(settings.total)]
    want = [_blip_cosine_lr_schedule(step // per_epoch, 3, 1e-3, 0.0) for step in range(settings.total)]
    assert lrs == pytest.approx(want, rel=1e-12)
    seen.clear()
    retrain(model, adapter.native_loss, batches, RetrainConfig(epochs=3, lr=1e-3, grad_accum=grad_accum))
    assert seen[0].max_grad_norm == 1.0 and clipped  # the default clips


def test_a_bad_retrain_schedule_is_one_line():
    from upop.errors import ConfigError

    with pytest.raises(ConfigError, match="retrain schedule must be one of warmup-cosine, epoch-cosine"):
        RetrainConfig(schedule="step").validate()
