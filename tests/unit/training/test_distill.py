"""Distillation from a frozen teacher: the terms of every task, where gradients go, the teacher's checks and
dtype, the settings (config, CLI), resume, and the report."""

import copy

import pytest
import torch
from typer.testing import CliRunner

import upop
from upop.adapters import get_adapter
from upop.run.config import DistillConfig
from upop.datasets import shapes
from upop.training.distill import Distiller, check_teacher, teacher_dtype
from upop.errors import ConfigError, UnsupportedModelError
from upop.tasks import make_task
from upop.tasks.base import task_class

from ...conftest import build_tiny, randomize_, vit_run_folder
from ..tasks.test_tasks import CASES, prep_for

# Every trainable task; one whose class has no ``forward`` yet (retrieval, until it lands) is left out.
DISTILL_CASES = [c for c in CASES if task_class(get_adapter(c[0]).tasks[c[2]]).distills()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shapes(tmp_path_factory.mktemp("kd") / "shapes", train=8, val=4, test=4, classification_per_class=(1, 1, 1))


def _setup(family, class_name, task, data):
    model = build_tiny(family, class_name, vocab=99)
    if task == "classification":
        model.classifier = torch.nn.Linear(model.classifier.in_features, 12)
        model.config.id2label = {i: f"LABEL_{i}" for i in range(12)}
        randomize_(model)
    t = make_task(get_adapter(family), task, prep_for(family, model), data, model=model, batch_size=4)
    return t, model, next(iter(t.train_batches()))


def _fresh(t, model):
    """A task with per-run state (a sampler, a momentum model) starts its run again."""
    if hasattr(t, "train_begin"):
        t.train_begin(model, None)


def _frozen(model):
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher


@pytest.mark.parametrize("family,class_name,task,primary", DISTILL_CASES, ids=[c[1] for c in DISTILL_CASES])
def test_terms_are_zero_for_the_same_model_and_positive_otherwise(family, class_name, task, primary, data):
    t, model, batch = _setup(family, class_name, task, data)
    model.eval()  # no dropout: the same model gives the same outputs
    teacher = _frozen(model)
    _fresh(t, model)
    out = t.forward(model, batch)
    from_out = t.loss_from(out, batch)
    _fresh(t, model)  # the same random choices again (BLIP's hard negatives come from the task's own generator)
    assert torch.allclose(from_out, t.loss(model, batch), atol=1e-6)  # loss composes the two steps
    with torch.no_grad():
        t_out = t.forward(teacher, batch, guide=out)
    assert float(t.distill_terms(out, t_out, 2.0).detach()) == 0.0
    layers = get_adapter(family).feature_layers(model)
    for mode in ("logits", "features", "both"):
        d = Distiller(t, teacher, DistillConfig(mode=mode, weight=3.0), layers)
        task_loss, kd = d.terms(model, batch)
        assert float(kd.detach()) == 0.0, mode
    other = _frozen(randomize_(copy.deepcopy(model), seed=7))
    for mode in ("logits", "features", "both"):
        task_loss, kd = Distiller(t, other, DistillConfig(mode=mode), layers).terms(model, batch)
        assert float(kd.detach()) > 0.0, mode  # the same model gives exactly 0 (above): any other is positive
    with torch.no_grad():
        o_out = t.forward(other, batch, guide=out)
    assert float(t.distill_terms(out, o_out, 1.0).detach()) > 0.0


@pytest.mark.parametrize("family,class_name,task,primary", DISTILL_CASES, ids=[c[1] for c in DISTILL_CASES])
def test_gradients_reach_the_student_only(family, class_name, task, primary, data):
    t, model, batch = _setup(family, class_name, task, data)
    teacher = _frozen(randomize_(copy.deepcopy(model), seed=3))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    d = Distiller(t, teacher, DistillConfig(mode="both"), get_adapter(family).feature_layers(model))
    opt = torch.optim.SGD(list(model.parameters()) + list(teacher.parameters()), lr=0.1)
    d(model, batch).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    opt.step()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert not teacher.training


def test_teacher_dtype_follows_the_device_and_amp():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert teacher_dtype(cuda, True, bf16_supported=True) == torch.bfloat16
    assert teacher_dtype(cuda, True, bf16_supported=False) == torch.float16
    assert teacher_dtype(cuda, False, bf16_supported=True) == torch.float32  # no autocast: fp32 weights
    assert teacher_dtype(cpu, True) == torch.float32


def test_a_teacher_of_another_family_or_shape_is_one_line():
    vit = get_adapter("vit")
    student = build_tiny("vit", "ViTForImageClassification")
    cases = [(build_tiny("clip", "CLIPModel"), "logits", "is a clip model and the student a vit model"),
             (build_tiny("vit", "ViTForImageClassification", hidden=48), "features", "hidden states of other shapes"),
             (build_tiny("vit", "ViTForImageClassification", layers=3), "both", "has 3 layers for feature distillation"),
             (build_tiny("vit", "ViTForImageClassification", image_size=48), "logits", "does not take the student's")]
    for teacher, mode, match in cases:
        with pytest.raises(UnsupportedModelError, match=match) as err:
            check_teacher(vit, student, teacher, mode, "t")
        assert "\n" not in str(err.value)
    wider = build_tiny("vit", "ViTForImageClassification", hidden=48)
    check_teacher(vit, student, wider, "logits", "t")  # a wider teacher still teaches its logits


def test_settings_are_validated():
    for bad in (dict(mode="soft"), dict(mode="logits", weight=-1.0), dict(mode="logits", temperature=0.0),
                dict(mode="logits", search="yes"), dict(teacher="demo-vit")):
        with pytest.raises(ConfigError):
            upop.CompressConfig(distill=DistillConfig(**bad))
    cfg = upop.CompressConfig(distill=DistillConfig(mode="both", weight=0.5, temperature=2.0, teacher="x"))
    assert upop.CompressConfig.from_json(cfg.to_json()).distill == cfg.distill
    assert upop.CompressConfig.from_dict({}).distill.mode == "off"


def _config(**distill):
    return upop.CompressConfig(ratio=0.5, search=upop.SearchConfig(steps=6, update_every=2, lr=1e-3),
                               retrain=upop.RetrainConfig(epochs=1, steps_per_epoch=3, lr=1e-3),
                               distill=DistillConfig(**distill))


def interrupt_at(n):
    """Distiller.__call__ that raises KeyboardInterrupt on its n-th call (as Ctrl-C between steps)."""
    real, calls = Distiller.__call__, []

    def call(distiller, model, batch):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(distiller, model, batch)

    return call


def test_resume_mid_search_with_distillation_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    model_dir, data = vit_run_folder(tmp_path)
    kw = dict(data=data, batch_size=4, eval_limit=4, latency=False)
    settings = dict(mode="both", search=True, weight=2.0, temperature=2.0)
    ref = upop.compress(str(model_dir), _config(**settings), **kw)
    state = tmp_path / "run.partial"
    monkeypatch.setattr(Distiller, "__call__", interrupt_at(4))
    with pytest.raises(KeyboardInterrupt):
        upop.compress(str(model_dir), _config(**settings), state_dir=state, **kw)
    monkeypatch.undo()
    saved = torch.load(state / "state.pt", weights_only=True)
    assert saved["phase"] == "search" and saved["search"]["step"] == 3
    assert not any("teacher" in k for k in saved)  # the teacher is opened again, never saved
    res = upop.compress(str(model_dir), _config(**settings), state_dir=state, resume=True, **kw)
    assert res.search.kept == ref.search.kept
    for k, v in ref.model.state_dict().items():
        assert torch.allclose(v, res.model.state_dict()[k], atol=1e-6), k
    kd = res.report.distill
    assert kd["mode"] == "both" and kd["search"] is True and kd["weight"] == 2.0 and kd["temperature"] == 2.0
    assert str(model_dir) in kd["teacher"] and kd["feature_layers"] == 2 and kd["teacher_dtype"] == "float32"


def test_distilling_during_the_search_changes_what_it_measures(tmp_path):
    """The search's loss has the distillation terms only with search=True (its logged task loss shows them)."""
    model_dir, data = vit_run_folder(tmp_path)
    kw = dict(data=data, batch_size=4, eval_limit=4, latency=False)
    plain = upop.compress(str(model_dir), _config(), **kw)
    off = upop.compress(str(model_dir), _config(mode="features", search=False, weight=50.0), **kw)
    on = upop.compress(str(model_dir), _config(mode="features", search=True, weight=50.0), **kw)
    losses = [[h["task_loss"] for h in r.search.history] for r in (plain, off, on)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert losses[2][-1] > losses[0][-1] + 1e-4  # the slimming masks move the student away from the teacher
    assert plain.report.distill is None and off.report.distill["search"] is False


def test_an_explicit_teacher_is_recorded_and_checked(tmp_path):
    model_dir, data = vit_run_folder(tmp_path)
    kw = dict(data=data, batch_size=4, eval_limit=4, latency=False)
    res = upop.compress(str(model_dir), _config(mode="logits", teacher=str(model_dir), search=False), **kw)
    assert res.report.distill["teacher"] == str(model_dir)
    from upop.run.report import to_markdown

    assert f"distilled (logits, weight 1, temperature 1, retrain only) from {model_dir}" in to_markdown(res.report)
    with pytest.raises(ConfigError, match="distillation compares the task's outputs"):
        upop.compress(build_tiny("vit", "ViTForImageClassification"), _config(mode="logits"),
                      batches=[get_adapter("vit").example_inputs(build_tiny("vit", "ViTForImageClassification"))])


def test_cli_distill_options_and_a_wrong_teacher(tmp_path):
    from upop_cli.app import app

    model_dir, data = vit_run_folder(tmp_path)
    clip = build_tiny("clip", "CLIPModel")
    clip.save_pretrained(tmp_path / "clip")
    get_adapter("clip").image_processor(32).save_pretrained(tmp_path / "clip")
    base = ["compress", "--model", str(model_dir), "--ratio", "0.5", "--data", str(data), "--batch-size", "4",
            "--search-epochs", "1", "--retrain-epochs", "1", "--no-latency", "--quiet"]
    r = CliRunner().invoke(app, base + ["--distill", "logits", "--teacher", str(tmp_path / "clip"),
                                        "--out", str(tmp_path / "o1")])
    assert r.exit_code == 2 and "is a clip model and the student a vit model" in r.output, r.output
    assert r.output.strip().count("\n") == 0
    for bad, name in ((["--distill", "soft"], "--distill"), (["--distill-weight", "-1"], "--distill-weight"),
                      (["--distill-temperature", "0"], "--distill-temperature")):
        r = CliRunner().invoke(app, base + bad + ["--out", str(tmp_path / "o2")])
        assert r.exit_code == 2 and name in r.output, r.output
    r = CliRunner().invoke(app, base + ["--distill", "features", "--distill-weight", "0.5", "--distill-search",
                                        "--out", str(tmp_path / "o3")])
    assert r.exit_code == 0, r.output
    import json

    kd = json.loads((tmp_path / "o3" / "report.json").read_text())["distill"]
    assert kd["mode"] == "features" and kd["weight"] == 0.5 and kd["search"] is True


def test_a_task_without_distillation_outputs_is_refused_in_one_line(tmp_path, monkeypatch):
    from upop.tasks.base import Task
    from upop.tasks.classification import Classification

    model_dir, data = vit_run_folder(tmp_path)
    monkeypatch.setattr(Classification, "forward", Task.forward)
    assert not Classification.distills()
    with pytest.raises(ConfigError, match="has no distillation outputs") as err:
        Classification.forward(Classification.__new__(Classification), None, {})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="the classification task of vit models has no distillation outputs"):
        upop.compress(str(model_dir), _config(mode="logits"), data=data, batch_size=4, latency=False)


class _LogitsTask:
    """The distillation interface over a bank of example batches (what a classification task does on its data)."""

    name = "classification"

    def forward(self, model, batch, guide=None):
        return {"logits": model(pixel_values=batch["pixel_values"]).logits}

    def loss_from(self, out, batch):
        return torch.nn.functional.cross_entropy(out["logits"].float(), batch["labels"])

    def distill_terms(self, student, teacher, temperature):
        from upop.tasks.base import distill_kl

        return distill_kl(student["logits"], teacher["logits"], temperature)


def _kd_run(rank: int, world: int) -> dict:
    """Search and retrain with logit distillation, each rank with its own teacher on its shard."""
    from upop.training.retrain import retrain
    from upop.pruning.search import search
    from upop.pruning.slim import slim_model

    from .test_distributed import _bank, _batches

    adapter = get_adapter("vit")
    model = build_tiny("vit", "ViTForImageClassification")
    teacher = _frozen(randomize_(build_tiny("vit", "ViTForImageClassification"), seed=5))
    loss = Distiller(_LogitsTask(), teacher, DistillConfig(mode="logits", temperature=2.0), [])
    specs = adapter.modules(model)
    res = search(model, specs, loss, _batches(rank, world), upop.SearchConfig(ratio=0.5, steps=4, update_every=2, lr=1e-3))
    slim_model(model, specs, res.kept, "dim", adapter, zeta=res.zeta)
    retrain(model, loss, _batches(rank, world), upop.RetrainConfig(epochs=1, lr=1e-3))
    return {"kept": res.kept, "loss": [h["task_loss"] for h in res.history],
            "logits": model.eval()(pixel_values=_bank()["pixel_values"]).logits.detach(),
            "teacher_same": all(torch.equal(v, _frozen(randomize_(build_tiny("vit", "ViTForImageClassification"),
                                                                  seed=5)).state_dict()[k])
                                for k, v in teacher.state_dict().items())}


def _kd_worker(rank: int, world: int, folder: str) -> None:
    from datetime import timedelta

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                                         world_size=world, timeout=timedelta(seconds=60))
    try:
        out = _kd_run(rank, world)
    finally:
        torch.distributed.destroy_process_group()
    torch.save(out, f"{folder}/rank{rank}.pt")


def test_two_processes_each_with_its_teacher_distil_as_one_process(tmp_path):
    import torch.multiprocessing as mp

    one = _kd_run(0, 1)
    mp.spawn(_kd_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        two = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert two["kept"] == one["kept"] and two["teacher_same"]
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)  # the ranks' mean: the whole batch's loss
        assert torch.allclose(two["logits"], one["logits"], atol=1e-4)


def test_toml_keys_are_checked_like_the_flags(tmp_path):
    from upop_cli.options import read_toml

    good = tmp_path / "good.toml"
    good.write_text('[compress]\ndistill = "both"\ndistill-weight = 0.5\ndistill-temperature = 2.0\n'
                    'distill-search = true\nteacher = "demo-vit"\n')
    assert read_toml(good) == {"distill": "both", "distill_weight": 0.5, "distill_temperature": 2.0,
                               "distill_search": True, "teacher": "demo-vit"}
    for line, name in (('distill = "soft"', "distill"), ("distill_temperature = 0", "distill_temperature"),
                       ('distill_search = "yes"', "distill_search")):
        bad = tmp_path / "bad.toml"
        bad.write_text(line + "\n")
        with pytest.raises(ConfigError, match=f"{name} must be"):
            read_toml(bad)


def test_the_teacher_is_fp16_on_a_gpu_that_only_emulates_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert teacher_dtype(torch.device("cuda"), True) == torch.float16


def test_the_distiller_forwards_its_tasks_training_hooks_and_only_those():
    from upop.training.loop import loss_hooks

    class WithState:
        def loss(self, model, batch):
            return 0

        def train_state(self):
            return {}

    class Without:
        def loss(self, model, batch):
            return 0

    teacher = torch.nn.Linear(1, 1)
    with_state = WithState()
    assert loss_hooks(Distiller(with_state, teacher, DistillConfig(mode="logits"), [])) is with_state
    assert loss_hooks(Distiller(Without(), teacher, DistillConfig(mode="logits"), [])) is None
    assert not hasattr(Distiller(Without(), teacher, DistillConfig(mode="logits"), []), "train_state")
