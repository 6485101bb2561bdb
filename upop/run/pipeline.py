"""``compress``, phase by phase: open → plan → search → slim → retrain → report.

Each phase is a function with typed inputs and outputs; the run's shared settings travel in a
``Run``. A state folder makes every phase resumable: the search and the retrain checkpoint
through the training loop, the end of the search is itself a checkpoint, and a finished run is
kept there (phase ``done``) until its output has been written, so a failed final save loses nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import Adapter, get_adapter
from .checkpoint import SlimInfo, Stage, info_from_manifest, is_slim_checkpoint, load_slim, save_slim
from .config import DEFAULT_CHECKPOINT_EVERY, CompressConfig
from ..training.distributed import Dist, device_for, restart_count, rng_state
from ..training.distributed import init as init_distributed
from ..errors import ConfigError
from ..pruning.flops import flops_per_tower, params_per_tower
from ..latency.hardware import HardwarePlan, plan_hardware, predicted_latency_ms
from ..latency.measure import Runtime, latency_rows, measure, torch_runtime
from ..training.drop_path import branches as drop_path_branches, drop_path
from ..training.loop import CheckpointFn, LossFn, ProgressFn, StateFn, batch_items, peak_memory, reset_peak_memory
from .report import Report, module_rows
from ..training.retrain import EvalFn, RetrainResult, retrain
from .state import Baseline, RunState, StateStore
from ..pruning.search import SearchResult, search
from ..pruning.slim import slim_model
from ..pruning.towers import freeze_others, in_towers, keep_the_rest, thaw
from ..training.memory import enable_grad_checkpointing

Progress = Callable[[str, dict[str, float]], None]


# -- open -----------------------------------------------------------------------------------------

@dataclass
class OpenedModel:
    """A model ready to compress, with its adapter, provenance and preprocessing."""

    model: nn.Module
    adapter: Adapter
    info: SlimInfo
    processor: Any | None
    folder: str | None = None  # where the tokenizer / image processor live


def open_model(model: nn.Module | str | Path, task: str | None = None) -> OpenedModel:
    """A module, alias, demo name, hub id, local folder or slim checkpoint, opened for compression."""
    from ..models.hub import load_pretrained, load_processor

    if isinstance(model, nn.Module):
        adapter = get_adapter(model)
        info = getattr(model, "_upop_info", None) or SlimInfo(
            family=adapter.family, class_name=type(model).__name__, base_config=model.config.to_dict())
        return OpenedModel(model, adapter, info, None)
    if is_slim_checkpoint(model):
        slim, manifest = load_slim(model)
        return OpenedModel(slim, get_adapter(slim), info_from_manifest(manifest), load_processor(str(model)),
                           folder=str(model))
    loaded = load_pretrained(str(model), task=task)
    info = SlimInfo(family=loaded.adapter.family, class_name=type(loaded.model).__name__,
                    base_config=loaded.model.config.to_dict(), source=str(model))
    return OpenedModel(loaded.model, loaded.adapter, info, loaded.processor, folder=loaded.source)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for, but no CUDA GPU is available (use --device cpu or auto)")
    return torch.device(device)


@dataclass
class TaskSetup:
    task: Any
    batches: Any
    loss_fn: LossFn
    eval_fn: EvalFn
    report_fn: Callable[[nn.Module], dict[str, float]]


def setup_task(src: OpenedModel, task: str | None, data: str | Path | None, preprocessor: Any | None,
               batch_size: int, seed: int, eval_limit: int | None = None, **task_options: Any) -> TaskSetup:
    """The task's batches, loss, model-selection metric (val) and report metrics (test)."""
    from ..models.demo import DEMOS, is_demo, shapes_dir
    from ..tasks import Preprocessor, default_task, make_task

    name = task or default_task(src.adapter, src.model)
    demo = src.info.source is not None and is_demo(src.info.source)
    if demo:  # the demo's own task options, under any the caller gives (its data given or not)
        given = {k: v for k, v in task_options.items() if v is not None}
        task_options = {**DEMOS[src.info.source].task_options, **given}  # type: ignore[index]
    if data is None:
        if demo:
            data = shapes_dir()
        else:
            raise ConfigError("no data given: pass a data folder (--data DIR); only the demo-* models have built-in data")
    if preprocessor is None:
        if src.folder is None:
            raise ConfigError("a model given as a module needs a preprocessor (tokenizer + image processor)")
        preprocessor = Preprocessor.from_pretrained(src.folder, **src.adapter.preprocessor_options(src.model))
    t = make_task(src.adapter, name, preprocessor, data, model=src.model, batch_size=batch_size, seed=seed,
                  **task_options)
    t.check_images()  # a corrupt image stops the run now, not an hour into the search
    return TaskSetup(task=t, batches=t.train_batches(), loss_fn=t.loss, eval_fn=t.metric_fn("val", eval_limit),
                     report_fn=lambda m: t.evaluate(m, "test", eval_limit))


# -- the run ----------------------------------------------------------------------------------------

@dataclass
class Inputs:
    """What the phases train and measure on."""

    batches: Iterable[Any]
    retrain_batches: Iterable[Any]
    loss: LossFn
    eval_fn: EvalFn | None = None  # model selection (val), higher is better
    report_fn: Callable[[nn.Module], dict[str, float]] | None = None  # the report's metrics (test)
    primary: str | None = None
    task: str | None = None
    task_impl: Any = None  # the Task object, when the task supplies the batches
    search_loss: LossFn | None = None  # the search's loss, when it differs from the retrain's (distillation)


@dataclass
class Run:
    """Settings every phase reads."""

    config: CompressConfig
    dist: Dist
    device: torch.device
    progress: Progress | None = None
    store: StateStore | None = None
    saved: RunState | None = None
    checkpoint_every: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    profile: Any = None  # the loaded hardware profile, if any
    latency_runtimes: dict[str, Runtime] = field(default_factory=dict)  # what to time in; empty: nothing
    latency_batch: int = 1
    frozen: list[str] = field(default_factory=list)  # parameters of the towers left out of the search (--towers)

    def stage(self, name: str) -> ProgressFn | None:
        progress = self.progress
        return (lambda rec: progress(name, rec)) if progress is not None else None

    def resumes(self, phase: str) -> bool:
        return self.saved is not None and self.saved.phase == phase

    def own(self, state: dict[str, Any] | None) -> dict[str, Any] | None:
        """A checkpoint holds every rank's RNG state (a list); each rank continues with its own."""
        if state is None:
            return None
        rng = state["rng"]
        return {**state, "rng": rng[self.dist.rank] if isinstance(rng, list) else rng}

    def write(self, make: Callable[[], RunState]) -> None:
        """Rank 0 builds and writes the state (only then: it copies the whole model); every rank waits for it."""
        if self.store is not None and self.dist.is_main:
            self.store.save(make())
        self.dist.barrier()

    def saver(self, make: Callable[[dict[str, Any]], RunState]) -> CheckpointFn | None:
        """A checkpoint writer for the training loop: every rank's RNG gathered, the state built by rank 0."""
        if self.store is None:
            return None

        def write(state_fn: StateFn) -> None:
            rngs = self.dist.gather(rng_state())
            if self.dist.is_main:
                self.store.save(make({**state_fn(), "rng": rngs}))  # type: ignore[union-attr]
            self.dist.barrier()

        return write

    def on_interrupt(self, make: Callable[[dict[str, Any]], RunState]) -> Callable[[dict[str, Any]], None] | None:
        store = self.store
        return (lambda st: store.save(make(st))) if store is not None else None

    def timed(self, phase: str, started: float) -> None:
        self.timings[phase] = time.perf_counter() - started


def evaluated(fn: Callable[[nn.Module], Any] | None, label: str, progress: Progress | None) -> Any:
    """``fn`` with an "evaluate" progress line before and after (the metric once known)."""
    if fn is None or progress is None:
        return fn

    def run(m: nn.Module) -> Any:
        progress("evaluate", {"step": 0.0, "total": 1.0, "label": label})
        value = fn(m)
        shown = value.get("primary", 0.0) if isinstance(value, dict) else float(value)
        progress("evaluate", {"step": 1.0, "total": 1.0, "label": label, "metric": float(shown)})
        return value

    return run


def prepare_inputs(src: OpenedModel, run: Run, *, data: str | Path | None, task: str | None, preprocessor: Any | None,
                   batch_size: int, eval_limit: int | None, batches: Iterable[Any] | None, loss_fn: LossFn | None,
                   retrain_batches: Iterable[Any] | None, eval_fn: EvalFn | None,
                   task_options: dict[str, Any]) -> Inputs:
    """The task's batches, loss and metrics (or the caller's own), sharded across the ranks."""
    report_fn, primary, task_name = None, None, task or src.adapter.task_of(src.model)
    task_impl = None
    if batches is None:
        ts = setup_task(src, task, data, preprocessor, batch_size, run.config.search.seed, eval_limit, **task_options)
        batches, report_fn, primary, task_name = ts.batches, ts.report_fn, ts.task.primary, ts.task.name
        task_impl = ts.task
        task_impl.amp = run.config.search.amp and run.config.retrain.amp  # evaluation as the run computes
        loss_fn, eval_fn = loss_fn or ts.loss_fn, eval_fn or ts.eval_fn
    dist = run.dist
    if dist.enabled:
        batches = batches.shard(dist.rank, dist.world) if hasattr(batches, "shard") else batches
        if retrain_batches is not None and hasattr(retrain_batches, "shard"):
            retrain_batches = retrain_batches.shard(dist.rank, dist.world)
    return Inputs(batches=batches, retrain_batches=retrain_batches if retrain_batches is not None else batches,
                  loss=loss_fn or src.adapter.native_loss, eval_fn=evaluated(eval_fn, "val", run.progress),
                  report_fn=evaluated(report_fn, "test", run.progress), primary=primary, task=task_name,
                  task_impl=task_impl)


def open_state(run: Run, state_dir: str | Path | None, resume: bool, run_info: dict[str, Any]) -> None:
    """The state folder, and what to resume from (after --resume, or by itself after an elastic restart)."""
    if state_dir is None:
        return
    run.store = StateStore(state_dir, run.config.to_dict(), run_info)
    run.store.check_owned()
    restarted = restart_count() > 0
    if resume or restarted:
        run.saved = run.store.load()
    if resume and run.saved is None and not restarted:
        raise ConfigError(f"nothing to resume: no interrupted run in {state_dir}")


# -- the phases -------------------------------------------------------------------------------------

def measure_baseline(run: Run, net: nn.Module, adapter: Adapter, inputs: Inputs) -> Baseline:
    """The unpruned model's metrics and latency (from the state when resuming: measured once)."""
    if run.saved is not None:
        return run.saved.baseline
    t0 = time.perf_counter()
    test = inputs.report_fn(net) if inputs.report_fn is not None else None
    val = float(inputs.eval_fn(net)) if inputs.eval_fn is not None else None
    run.timed("baseline", t0)
    return Baseline(test=test, val=val, latency=measure_latency(run, net, adapter))


def measure_latency(run: Run, net: nn.Module, adapter: Adapter) -> dict[str, Any] | None:
    """Forward latency at batch 1 and the training batch, in PyTorch and every runtime the caller handed in;
    on rank 0 alone (the report is its; other ranks timing at once would share the machine and skew it)."""
    if not run.latency_runtimes or not run.dist.is_main:
        return None
    t0 = time.perf_counter()
    out = measure(net, adapter, sorted({1, run.latency_batch}), run.device, run.latency_runtimes)
    run.timings["latency"] = run.timings.get("latency", 0.0) + time.perf_counter() - t0
    return out


def run_search(run: Run, net: nn.Module, specs: list, inputs: Inputs, plan: HardwarePlan | None,
               base: Baseline) -> SearchResult:
    if run.saved is not None and run.saved.phase != "search":
        return SearchResult(**run.saved.search_result)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    loss = inputs.search_loss if inputs.search_loss is not None else inputs.loss
    result = search(net, specs, loss, inputs.batches, run.config.search, progress=run.stage("search"),
                    unit_costs=plan.unit_costs if plan else None, allowed_sizes=plan.allowed if plan else None,
                    resume=run.own(run.saved.search) if run.resumes("search") else None,  # type: ignore[union-attr]
                    on_interrupt=run.on_interrupt(lambda st: RunState("search", base, search=st)),
                    checkpoint=run.saver(lambda st: RunState("search", base, search=st)),
                    checkpoint_every=run.checkpoint_every)
    run.timed("search", t0)
    return result


def run_slim(run: Run, net: nn.Module, specs: list, result: SearchResult, src: OpenedModel, base: Baseline) -> None:
    """Slims ``net`` as the search decided; the end of the search is a checkpoint (a crash in the
    retrain does not redo the search)."""
    cfg = run.config
    slim_model(net, specs, result.kept, cfg.granularity, src.adapter, zeta=result.zeta)
    src.info.stages.append(Stage(granularity=cfg.granularity, ratio=cfg.ratio, kept=result.kept,
                                 units={s.name: s.num_units(cfg.granularity) for s in specs}))
    src.info.profile = cfg.profile
    saved = run.saved
    if saved is not None and saved.phase == "done":
        net.load_state_dict(saved.final_model)  # type: ignore[arg-type]
    elif saved is not None and saved.phase == "retrain" and saved.retrain is None:
        net.load_state_dict(saved.slim_model)  # type: ignore[arg-type]
    elif saved is None or saved.phase == "search":
        run.write(lambda: RunState("retrain", base, search_result=dataclasses.asdict(result),
                                   slim_model={k: v.detach().cpu() for k, v in net.state_dict().items()}))


def run_retrain(run: Run, net: nn.Module, inputs: Inputs, result: SearchResult,
                base: Baseline) -> tuple[RetrainResult, float | None]:
    """Retrains the slim model; returns the retrain's result and the slim model's metric before it
    (the retrain's epoch 0: the slim model is evaluated once)."""
    search_dict = dataclasses.asdict(result)
    t0 = time.perf_counter()

    def state(st: dict[str, Any]) -> RunState:
        return RunState("retrain", base, search_result=search_dict, retrain=st)

    rt = retrain(net, inputs.loss, inputs.retrain_batches, run.config.retrain, eval_fn=inputs.eval_fn,
                 progress=run.stage("retrain"), resume=run.own(run.saved.retrain) if run.resumes("retrain") else None,  # type: ignore[union-attr]
                 on_interrupt=run.on_interrupt(state), checkpoint=run.saver(state),
                 checkpoint_every=run.checkpoint_every)
    run.dist.barrier()
    run.timed("retrain", t0)
    return rt, next((e["metric"] for e in rt.evals if e["epoch"] == 0), None)


# -- report and result --------------------------------------------------------------------------------

@dataclass
class Measured:
    """Parameters and FLOPs per tower, counted on one example at batch 1 (and the measured latency)."""

    params: dict[str, int]
    flops: dict[str, int]
    latency: dict[str, Any] | None = None  # measured forward latency per runtime and batch

    @classmethod
    def of(cls, net: nn.Module, adapter: Adapter, example: dict[str, torch.Tensor]) -> "Measured":
        return cls(params_per_tower(net, adapter), flops_per_tower(net, adapter, example))


def build_report(run: Run, src: OpenedModel, inputs: Inputs, specs: list, result: SearchResult, rt: RetrainResult,
                 base: Baseline, before: Measured, after: Measured, test_after: Any, metric_slim: float | None,
                 hardware: dict[str, Any] | None, run_info: dict[str, Any], started: float) -> Report:
    from .._version import __version__

    cfg = run.config
    metric_after = rt.best_metric if rt.best_metric is not None else metric_slim
    metrics: dict[str, Any] = {"primary": inputs.primary, "before": base.test, "after": test_after,
                               "val_before": base.val, "val_after_search": metric_slim, "val_after": metric_after,
                               "best_epoch": rt.best_epoch}
    if inputs.report_fn is None:
        metrics.update(before=base.val, after=metric_after)
    saved = run.saved
    return Report(
        model=src.info.source or src.info.class_name, family=src.adapter.family, model_class=src.info.class_name,
        task=inputs.task, ratio=cfg.ratio, granularity=cfg.granularity, profile=cfg.profile,
        removed_cost_share=result.removed_share, metrics=metrics,
        params={"before": before.params, "after": after.params},
        flops={"before": before.flops, "after": after.flops, "inputs": "one example, batch 1"},
        modules=module_rows(specs, result.kept, cfg.granularity),
        search={"steps": result.steps, "history": result.history, "skipped_steps": result.skipped_steps},
        retrain={"history": rt.history, "evals": rt.evals}, seconds=time.perf_counter() - started,
        upop_version=__version__, hardware=hardware, distributed=run_info,
        latency=latency_rows(base.latency, after.latency, run.device) if base.latency and after.latency else None,
        resumed_from={"phase": saved.phase, "step": saved.step()} if saved is not None else None,
        performance={"seconds": dict(run.timings), "search": result.throughput, "retrain": rt.throughput,
                     "peak_memory": peak_memory(run.device)})


@dataclass
class CompressResult:
    model: nn.Module
    report: Report
    search: SearchResult
    info: SlimInfo
    processor: Any | None = None
    config: CompressConfig = field(default_factory=CompressConfig)
    state: StateStore | None = None  # cleared once the output is written

    def save(self, out_dir: str | Path, overwrite: bool = False, with_report: bool = True) -> Path:
        """Write the slim checkpoint (weights, processor, manifest with the config) and the report
        files, all into a temporary folder renamed into place at the end; then, and only then, the
        run's state folder is cleared (a failed save keeps it: ``--resume`` then only writes)."""
        from .report import write_report

        def extra(tmp: Path) -> None:
            (tmp / "upop_config.json").write_text(self.config.to_json())
            if with_report:
                write_report(self.report, tmp)

        out = save_slim(self.model, out_dir, self.info, processor=self.processor, overwrite=overwrite,
                        extra={"config": self.config.to_dict()}, extra_writer=extra)
        if self.state is not None:
            self.state.clear()
        return out


def finish(run: Run, net: nn.Module, src: OpenedModel, result: SearchResult, report: Report,
           base: Baseline) -> CompressResult:
    """The finished run is kept in the state folder (phase ``done``) until ``CompressResult.save``."""
    if not run.resumes("done"):
        run.write(lambda: RunState("done", base, search_result=dataclasses.asdict(result), report=report.to_dict(),
                                   final_model={k: v.detach().cpu() for k, v in net.state_dict().items()}))
    net._upop_info = src.info  # type: ignore[assignment]
    thaw(net, run.frozen)
    return CompressResult(model=net, report=report, search=result, info=src.info, processor=src.processor,
                          config=run.config, state=run.store if run.dist.is_main else None)


def load_profile(name: str | None) -> Any:
    """A shipped target name or a profile file, loaded (and validated) once per run."""
    if name is None:
        return None
    from ..latency.hwprofile import load

    return load(name)


def compress(
    model: nn.Module | str | Path,
    config: CompressConfig | None = None,
    *,
    data: str | Path | None = None,
    task: str | None = None,
    preprocessor: Any | None = None,
    batch_size: int = 32,
    eval_limit: int | None = None,
    batches: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    retrain_batches: Iterable[Any] | None = None,
    eval_fn: EvalFn | None = None,
    progress: Progress | None = None,
    state_dir: str | Path | None = None,
    resume: bool = False,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    task_options: dict[str, Any] | None = None,
    latency: bool | dict[str, Runtime] = True,
) -> CompressResult:
    """Compress ``model`` (a module, alias, demo name, hub id, local folder or slim checkpoint).

    With ``data`` (or a demo model) the task (``task``, default the class's) supplies batches, loss and
    metrics; otherwise pass ``batches`` (and ``loss_fn``, ``eval_fn``: higher is better). ``task_options`` go
    to the task (the input pipeline's ``workers``, ``cache_gb``). ``latency``: measure the forward before
    and after in PyTorch (True), also in the given ``Runtime``s, or not (False). With ``state_dir`` the run
    checkpoints there (every ``checkpoint_every`` steps, at the ends of the phases, on Ctrl-C, and when
    finished until ``CompressResult.save`` has written the output); ``resume`` continues from it. Under
    torchrun every rank calls this: ``batch_size`` is per rank and rank 0 reports and writes.
    """
    started = time.perf_counter()
    run = start_run(config or CompressConfig(), progress, checkpoint_every, latency)
    src = open_model(model, task)
    from ..tasks import scoring_options

    # the options the run is scored with go with the slim checkpoint: upop eval and its exports score it alike
    src.info.scoring = {**src.info.scoring, **scoring_options(task_options or {})}
    net = src.model.to(run.device)
    if run.config.grad_checkpointing:
        enable_grad_checkpointing(net)
    inputs = prepare_inputs(src, run, data=data, task=task, preprocessor=preprocessor, batch_size=batch_size,
                            eval_limit=eval_limit, batches=batches, loss_fn=loss_fn, retrain_batches=retrain_batches,
                            eval_fn=eval_fn, task_options=task_options or {})
    distill_info = add_distillation(run, src, net, inputs, loss_fn)
    example = src.adapter.example_inputs(net, batch_size=1, generator=torch.Generator().manual_seed(0))
    before = Measured.of(net, src.adapter, example)
    specs = src.adapter.modules(net)
    searched = in_towers(specs, run.config.search.towers)
    run.frozen = freeze_others(net, src.adapter.tower_of, specs, run.config.search.towers)
    if run.config.search.drop_path or run.config.retrain.drop_path:
        drop_path_branches(net, src.adapter)  # a family without them stops here, before the baseline's evaluation
    plan = plan_for(run, net, src.adapter, searched)
    run_info = distributed_info(run, inputs, batch_size)
    run.latency_batch = run_info["per_rank_batch"]
    open_state(run, state_dir, resume, {**run_info, "ratio": plan.ratio if plan else run.config.ratio,
                                        "task_options": training_options(task_options or {})})
    if plan is not None:
        run.config = plan.applied(run.config)
    base = measure_baseline(run, net, src.adapter, inputs)
    with drop_path(net, src.adapter, run.config.search.drop_path):
        result = run_search(run, net, searched, inputs, plan, base)
    result.kept = keep_the_rest(result.kept, specs, run.config.granularity)  # the towers left out keep every unit
    run_slim(run, net, specs, result, src, base)
    if run.resumes("done"):
        return finish(run, net, src, result, Report.from_dict(run.saved.report), base)  # type: ignore[union-attr, arg-type]
    with drop_path(net, src.adapter, run.config.retrain.drop_path):
        rt, metric_slim = run_retrain(run, net, inputs, result, base)
    after = Measured.of(net, src.adapter, example)
    after.latency = measure_latency(run, net, src.adapter)
    test_after = inputs.report_fn(net) if inputs.report_fn is not None else None
    hardware = plan.report(predicted_latency_ms(net, src.adapter, plan.profile, run.config.granularity)) if plan else None
    report = build_report(run, src, inputs, specs, result, rt, base, before, after, test_after, metric_slim,
                          hardware, run_info, started)
    report.distill = distill_info
    return finish(run, net, src, result, report, base)


def open_teacher(source: str, task: str | None) -> nn.Module:
    """The teacher with the student's task head; a model that has none is opened as it is, so that the check
    that follows names what it is (another family, another class)."""
    from ..errors import UnsupportedModelError

    try:
        return open_model(source, task).model
    except UnsupportedModelError:
        return open_model(source).model


def add_distillation(run: Run, src: OpenedModel, net: nn.Module, inputs: Inputs,
                     loss_fn: LossFn | None) -> dict[str, Any] | None:
    """With distillation on, the retrain's loss (and the search's, with ``distill.search``) becomes the task's
    loss plus the match with a frozen teacher: the unpruned input model as it is now (copied before the search
    trains it), or ``distill.teacher`` opened from its source. Nothing of the teacher goes into the run's state:
    a resumed run opens it again. Returns the report's record of the settings."""
    from ..training.distill import Distiller, check_teacher, freeze, teacher_dtype

    cfg = run.config.distill
    if not cfg.enabled:
        return None
    if inputs.task_impl is None or loss_fn is not None:
        raise ConfigError("distillation compares the task's outputs: give the data (or a demo model) and no "
                          "loss function of your own")
    if not inputs.task_impl.distills():
        raise ConfigError(f"the {inputs.task} task of {src.adapter.family} models has no distillation outputs; run it "
                          "without --distill")
    if cfg.teacher is None:
        teacher, source = copy.deepcopy(net), f"the unpruned input model ({src.info.source or src.info.class_name})"
    else:
        teacher, source = open_teacher(cfg.teacher, inputs.task).to(run.device), cfg.teacher
    check_teacher(src.adapter, net, teacher, cfg.mode, cfg.teacher or "(the input model)")
    dtype = teacher_dtype(run.device, run.config.search.amp and run.config.retrain.amp)
    layers = src.adapter.feature_layers(net) if cfg.mode in ("features", "both") else []
    held = run.device if cfg.search else torch.device("cpu")  # a retrain-only teacher moves over when first used
    distiller = Distiller(inputs.task_impl, freeze(teacher, held, dtype), cfg, layers)
    inputs.loss = distiller
    inputs.search_loss = distiller if cfg.search else inputs.task_impl.loss
    return {"mode": cfg.mode, "weight": cfg.weight, "temperature": cfg.temperature, "search": cfg.search,
            "teacher": source, "teacher_dtype": str(dtype).removeprefix("torch."), "feature_layers": len(layers)}


def plan_for(run: Run, net: nn.Module, adapter: Adapter, specs: list) -> HardwarePlan | None:
    """The hardware plan when a profile is given (the ratio it chooses is recorded with the run's state, so a
    resume under a changed profile is refused rather than continuing with another ratio)."""
    if run.profile is None:
        return None
    cfg = run.config
    return plan_hardware(net, adapter, specs, cfg.granularity, cfg.ratio, run.profile, cfg.target_latency_ms)


def start_run(config: CompressConfig, progress: Progress | None, checkpoint_every: int,
              latency: bool | dict[str, Runtime] = True) -> Run:
    """Validates the settings, loads the profile, joins the process group under torchrun, picks the device."""
    config.validate()
    if checkpoint_every < 0:
        raise ConfigError(f"checkpoint_every must be 0 (phase ends only) or a positive step count, not {checkpoint_every}")
    profile = load_profile(config.profile)
    dist = init_distributed(config.device)
    run = Run(config, dist, device_for(dist, resolve_device(config.device)), progress if dist.is_main else None,
              checkpoint_every=checkpoint_every)
    run.profile = profile
    reset_peak_memory(run.device)
    if latency is not False:
        run.latency_runtimes = {"torch": torch_runtime(run.device), **(latency if isinstance(latency, dict) else {})}
    return run


def training_options(task_options: dict[str, Any]) -> dict[str, Any]:
    """The task options that change what a run trains or measures (augmentation, momentum, k_test, ...): a resumed
    run must use the same. The input pipeline's (workers, cache) change only how fast images arrive."""
    return {k: v for k, v in sorted(task_options.items()) if k not in ("workers", "cache_gb") and v is not None}


def distributed_info(run: Run, inputs: Inputs, batch_size: int) -> dict[str, Any]:
    """processes × batch per process × accumulation = effective batch (what the report states)."""
    per_rank = getattr(inputs.batches, "bs", None)
    if per_rank is None:  # the caller's own batches: their first batch's size, when they can be indexed
        per_rank = batch_items(inputs.batches[0]) if isinstance(inputs.batches, (list, tuple)) and inputs.batches \
            else batch_size
    accum = run.config.search.grad_accum
    return {"world_size": run.dist.world, "per_rank_batch": per_rank, "grad_accum": accum,
            "effective_batch": per_rank * run.dist.world * accum,
            "backend": torch.distributed.get_backend() if run.dist.enabled else None}
