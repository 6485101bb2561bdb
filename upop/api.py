"""The public verbs: ``compress`` (search → slim → retrain, with a report) and ``load``."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._version import __version__
from .adapters import Adapter, get_adapter
from .checkpoint import SlimInfo, Stage, is_slim_checkpoint, load_slim, save_slim, info_from_manifest
from .config import CompressConfig
from .distributed import device_for, restart_count, rng_state
from .distributed import init as init_distributed
from .errors import CheckpointError, ConfigError
from .flops import flops_per_tower, params_per_tower
from .hub import load_pretrained
from .retrain import EvalFn, retrain
from .search import LossFn, ProgressFn, SearchResult, search
from .slim import slim_model


class RunState:
    """An interrupted run's state: one torch file, written atomically, read with weights_only."""

    def __init__(self, folder: str | Path, config: CompressConfig, run: dict[str, Any] | None = None):
        self.folder, self.config = Path(folder), config.to_dict()
        self.run = run or {}
        self.path = self.folder / "state.pt"

    def save(self, state: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(".state.pt.tmp")
        torch.save({"config": self.config, "run": self.run, **state}, tmp)
        os.replace(tmp, self.path)  # a kill -9 mid-write leaves the previous state intact

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, weights_only=True, map_location="cpu")
        except (RuntimeError, OSError, EOFError) as exc:
            raise CheckpointError(f"{self.path} cannot be read: {str(exc).splitlines()[0]}") from None
        if state.get("config") != self.config:
            raise ConfigError(f"the interrupted run in {self.folder} used other settings; "
                              "resume with the same options, or delete that folder")
        was = state.get("run") or {}
        for key, what in (("world_size", "processes"), ("per_rank_batch", "as batch size per process")):
            if key in was and key in self.run and was[key] != self.run[key]:
                raise ConfigError(f"the interrupted run in {self.folder} ran with {was[key]} {what}, this one with "
                                  f"{self.run[key]}; resume with the same --nproc and --batch-size")
        return state

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def check_profile(profile: str | None) -> None:
    """A profile must be a shipped target name or a profile file."""
    if profile is None:
        return
    from .profiles import load

    load(profile)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for, but no CUDA GPU is available (use --device cpu or auto)")
    return torch.device(device)


@dataclass
class CompressResult:
    model: nn.Module
    report: dict[str, Any]
    search: SearchResult
    info: SlimInfo
    processor: Any | None = None
    config: CompressConfig = field(default_factory=CompressConfig)

    def save(self, out_dir: str | Path, overwrite: bool = False, with_report: bool = True) -> Path:
        """Write the slim checkpoint (weights, processor, manifest with the config) and the report
        files, all into a temporary folder renamed into place at the end."""
        from .report import write_report

        def extra(tmp: Path) -> None:
            (tmp / "upop_config.json").write_text(self.config.to_json())
            if with_report:
                write_report(self.report, tmp)

        return save_slim(self.model, out_dir, self.info, processor=self.processor, overwrite=overwrite,
                         extra={"config": self.config.to_dict()}, extra_writer=extra)


@dataclass
class _Source:
    model: nn.Module
    adapter: Adapter
    info: SlimInfo
    processor: Any | None
    folder: str | None = None  # where the tokenizer / image processor live


def _open(model: nn.Module | str | Path, task: str | None) -> _Source:
    if isinstance(model, nn.Module):
        adapter = get_adapter(model)
        info = getattr(model, "_upop_info", None) or SlimInfo(
            family=adapter.family, class_name=type(model).__name__, base_config=model.config.to_dict())
        return _Source(model, adapter, info, None)
    if is_slim_checkpoint(model):
        slim, manifest = load_slim(model)
        info = info_from_manifest(manifest)
        from .hub import load_processor

        return _Source(slim, get_adapter(slim), info, load_processor(str(model)), folder=str(model))
    loaded = load_pretrained(str(model), task=task)
    info = SlimInfo(family=loaded.adapter.family, class_name=type(loaded.model).__name__,
                    base_config=loaded.model.config.to_dict(), source=str(model))
    return _Source(loaded.model, loaded.adapter, info, loaded.processor, folder=loaded.source)


@dataclass
class TaskSetup:
    task: Any
    batches: Any
    loss_fn: LossFn
    eval_fn: EvalFn
    report_fn: Callable[[nn.Module], dict[str, float]]


def setup_task(src: _Source, task: str | None, data: str | Path | None, preprocessor: Any | None,
               batch_size: int, seed: int, eval_limit: int | None = None) -> TaskSetup:
    """The task's batches, loss, model-selection metric (val) and report metrics (test)."""
    from .demo import is_demo, shapes_dir
    from .tasks import Preprocessor, default_task, make_task

    name = task or default_task(src.adapter, src.model)
    if data is None:
        if src.info.source is not None and is_demo(src.info.source):
            data = shapes_dir()
        else:
            raise ConfigError("no data given: pass a data folder (--data DIR); only the demo-* models have built-in data")
    if preprocessor is None:
        if src.folder is None:
            raise ConfigError("a model given as a module needs a preprocessor (tokenizer + image processor)")
        preprocessor = Preprocessor.from_pretrained(src.folder, **src.adapter.preprocessor_options(src.model))
    t = make_task(src.adapter, name, preprocessor, data, model=src.model, batch_size=batch_size, seed=seed)
    return TaskSetup(task=t, batches=t.train_batches(), loss_fn=t.loss, eval_fn=t.metric_fn("val", eval_limit),
                     report_fn=lambda m: t.evaluate(m, "test", eval_limit))


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
    progress: Callable[[str, dict[str, float]], None] | None = None,
    state_dir: str | Path | None = None,
    resume: bool = False,
    checkpoint_every: int = 0,
) -> CompressResult:
    """Compress ``model`` (a module, alias, demo name, hub id, local folder or slim checkpoint).

    With ``data`` (or a demo model), the task named by ``task`` (default: the model class's)
    supplies batches, loss and metrics: the report then holds the test metrics before and after,
    and retraining keeps the state that is best on the validation split. Without it, pass
    ``batches`` (and optionally ``loss_fn``, default the family's own loss, and ``eval_fn``,
    higher is better).

    With ``state_dir``, Ctrl-C during the search or the retrain writes the run's state there;
    ``resume=True`` continues from it (same settings required) and removes it when done. The state is
    also written at the end of the search, and with ``checkpoint_every`` > 0 every that many steps and
    after each retrain epoch, so a killed run (kill -9, a lost node) resumes from its last checkpoint.

    Under torchrun (WORLD_SIZE > 1) every rank calls this: ``batch_size`` is per rank, the task's
    batches are sharded, evaluations gather across ranks, and only rank 0 reports progress and
    writes the state; after an elastic restart the run resumes by itself.
    """
    config = config or CompressConfig()
    config.validate()
    if checkpoint_every < 0:
        raise ConfigError(f"checkpoint_every must be 0 (phase ends only) or a positive step count, not {checkpoint_every}")
    check_profile(config.profile)
    dist = init_distributed(config.device)
    device = device_for(dist, resolve_device(config.device))
    if not dist.is_main:
        progress = None
    restarted = restart_count() > 0
    src = _open(model, task)
    net, adapter = src.model.to(device), src.adapter
    report_fn = None
    primary = None
    task_name = task or adapter.task_of(net)
    if batches is None:
        ts = setup_task(src, task, data, preprocessor, batch_size, config.search.seed, eval_limit)
        batches, report_fn, primary, task_name = ts.batches, ts.report_fn, ts.task.primary, ts.task.name
        loss_fn, eval_fn = loss_fn or ts.loss_fn, eval_fn or ts.eval_fn
    if dist.enabled:
        batches = batches.shard(dist.rank, dist.world) if hasattr(batches, "shard") else batches
        if retrain_batches is not None and hasattr(retrain_batches, "shard"):
            retrain_batches = retrain_batches.shard(dist.rank, dist.world)
    loss = loss_fn or adapter.native_loss
    def stage(name: str) -> ProgressFn | None:
        return (lambda rec: progress(name, rec)) if progress is not None else None

    def evaluated(fn: Callable[[nn.Module], Any], label: str) -> Callable[[nn.Module], Any]:
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

    report_fn, eval_fn = evaluated(report_fn, "test"), evaluated(eval_fn, "val")

    t0 = time.perf_counter()
    example = adapter.example_inputs(net, batch_size=1, generator=torch.Generator().manual_seed(0))
    params_before, flops_before = params_per_tower(net, adapter), flops_per_tower(net, adapter, example)
    per_rank = getattr(batches, "bs", batch_size)
    run_info = {"world_size": dist.world, "per_rank_batch": per_rank, "effective_batch": per_rank * dist.world,
                "backend": torch.distributed.get_backend() if dist.enabled else None}
    store = RunState(state_dir, config, run_info) if state_dir is not None else None
    saved = store.load() if (store is not None and (resume or restarted)) else None
    if resume and saved is None and not restarted:
        raise ConfigError(f"nothing to resume: no interrupted run in {state_dir}")
    if saved is not None:
        test_before, metric_before = saved["pre"]["test_before"], saved["pre"]["metric_before"]
    else:
        test_before = report_fn(net) if report_fn is not None else None
        metric_before = float(eval_fn(net)) if eval_fn is not None else None
    pre = {"test_before": test_before, "metric_before": metric_before}

    def saver(phase: str, extra: dict[str, Any]) -> Callable[[Callable[[], dict[str, Any]]], None] | None:
        """A checkpoint writer: every rank's RNG gathered, the state built and written by rank 0."""
        if store is None:
            return None

        def write(state_fn: Callable[[], dict[str, Any]]) -> None:
            rngs = dist.gather(rng_state())
            if dist.is_main:
                state = state_fn()
                state["rng"] = rngs
                store.save({"phase": phase, phase: state, "pre": pre, **extra})
            dist.barrier()

        return write

    def on_interrupt(phase: str, extra: dict[str, Any]) -> Callable[[dict[str, Any]], None] | None:
        if store is None:
            return None
        return lambda st: store.save({"phase": phase, phase: st, "pre": pre, **extra})

    specs = adapter.modules(net)
    hw = hardware_plan(net, adapter, specs, config)
    if saved is not None and saved["phase"] == "retrain":
        result = SearchResult(**saved["search_result"])
    else:
        result = search(net, specs, loss, batches, config.search, progress=stage("search"),
                        unit_costs=hw.get("unit_costs"), allowed_sizes=hw.get("allowed"),
                        resume=_own_rng(saved["search"], dist.rank) if saved else None,
                        on_interrupt=on_interrupt("search", {}),
                        checkpoint=saver("search", {}), checkpoint_every=checkpoint_every)
    slim_model(net, specs, result.kept, config.granularity, adapter, zeta=result.zeta)
    search_dict = dataclasses.asdict(result)
    if saved is not None and saved["phase"] == "retrain" and saved.get("retrain") is None:
        net.load_state_dict(saved["slim_model"])
    elif store is not None and (saved is None or saved["phase"] == "search"):
        # The end of the search is a checkpoint: a crash in retraining does not redo the search.
        if dist.is_main:
            store.save({"phase": "retrain", "retrain": None, "search_result": search_dict, "pre": pre,
                        "slim_model": {k: v.detach().cpu() for k, v in net.state_dict().items()}})
        dist.barrier()
    src.info.stages.append(Stage(granularity=config.granularity, ratio=config.ratio, kept=result.kept,
                                 units={s.name: s.num_units(config.granularity) for s in specs}))
    src.info.profile = config.profile
    metric_slim = float(eval_fn(net)) if eval_fn is not None else None
    rt = retrain(net, loss, retrain_batches if retrain_batches is not None else batches, config.retrain,
                 eval_fn=eval_fn, progress=stage("retrain"),
                 resume=_own_rng(saved["retrain"], dist.rank) if saved is not None and saved["phase"] == "retrain"
                 and saved.get("retrain") is not None else None,
                 on_interrupt=on_interrupt("retrain", {"search_result": search_dict}),
                 checkpoint=saver("retrain", {"search_result": search_dict}), checkpoint_every=checkpoint_every)
    dist.barrier()
    if store is not None and dist.is_main:
        store.clear()
    metric_after = rt.best_metric if rt.best_metric is not None else metric_slim
    params_after, flops_after = params_per_tower(net, adapter), flops_per_tower(net, adapter, example)
    test_after = report_fn(net) if report_fn is not None else None
    if hw:
        from .hardware import predicted_latency_ms

        hw["report"]["predicted_ms_after"] = predicted_latency_ms(net, adapter, hw["profile"], config.granularity)
    net._upop_info = src.info  # type: ignore[assignment]
    metrics: dict[str, Any] = {"primary": primary, "before": test_before, "after": test_after,
                               "val_before": metric_before, "val_after_search": metric_slim,
                               "val_after": metric_after, "best_epoch": rt.best_epoch}
    if report_fn is None:
        metrics.update(before=metric_before, after=metric_after)
    report = {
        "upop_version": __version__,
        "model": src.info.source or src.info.class_name,
        "family": adapter.family,
        "model_class": src.info.class_name,
        "task": task_name,
        "ratio": config.ratio,
        "granularity": config.granularity,
        "profile": config.profile,
        "removed_cost_share": result.removed_share,
        "metrics": metrics,
        "params": {"before": params_before, "after": params_after},
        "flops": {"before": flops_before, "after": flops_after, "inputs": "one example, batch 1"},
        "modules": module_report(specs, result, config.granularity),
        "hardware": hw.get("report"),
        "distributed": run_info,
        "resumed_from": _resume_point(saved),
        "search": {"steps": result.steps, "history": result.history},
        "retrain": {"history": rt.history, "evals": rt.evals},
        "seconds": time.perf_counter() - t0,
    }
    return CompressResult(model=net, report=report, search=result, info=src.info, processor=src.processor,
                          config=config)


def _own_rng(state: dict[str, Any], rank: int) -> dict[str, Any]:
    """A checkpoint holds every rank's RNG state (a list); each rank continues with its own."""
    rng = state["rng"]
    return {**state, "rng": rng[rank] if isinstance(rng, list) else rng}


def _resume_point(saved: dict[str, Any] | None) -> dict[str, Any] | None:
    if saved is None:
        return None
    inner = saved.get(saved["phase"])
    return {"phase": saved["phase"], "step": int(inner["step"]) if inner else 0}


def hardware_plan(model: nn.Module, adapter: Adapter, specs: list, config: CompressConfig) -> dict[str, Any]:
    """Aligned sizes and latency costs from the profile; with a latency target, the ratio that meets it."""
    if config.profile is None:
        return {}
    from .hardware import allowed_sizes, predicted_latency_ms, unit_latency_costs
    from .profiles import load

    profile = load(config.profile)
    if profile.alignment.whole_heads and config.granularity != "head":
        raise ConfigError(f"profile {profile.name} keeps whole heads only: use --granularity head")
    costs = unit_latency_costs(model, adapter, specs, config.granularity, profile)
    before = predicted_latency_ms(model, adapter, profile, config.granularity)
    if config.target_latency_ms is not None:
        ratio = 1.0 - config.target_latency_ms / before
        if ratio <= 0:
            raise ConfigError(f"the model already meets {config.target_latency_ms} ms on {profile.name} "
                              f"(predicted {before:.3f} ms)")
        if ratio >= 0.95:
            raise ConfigError(f"{config.target_latency_ms} ms on {profile.name} would remove {ratio:.0%} of the "
                              f"compressible latency (predicted {before:.3f} ms); choose a looser target")
        config.ratio = config.search.ratio = ratio
    return {"profile": profile, "unit_costs": costs, "allowed": allowed_sizes(specs, config.granularity, profile),
            "report": {"profile": profile.name, "latency_model": profile.latency_model,
                       "predicted_ms_before": before, "target_ms": config.target_latency_ms}}


def module_report(specs, result: SearchResult, granularity: str) -> list[dict[str, Any]]:
    rows = []
    for s in specs:
        kept = len(result.kept[s.name])
        row: dict[str, Any] = {"module": s.name, "tower": s.tower, "kind": s.kind, "role": s.role,
                               "units": s.num_units(granularity), "kept": kept}
        if s.kind == "attn":
            row["num_heads"], row["head_dim"] = s.kept_shape(kept, granularity)
        rows.append(row)
    return rows


def load(path: str | Path, device: str = "cpu") -> nn.Module:
    """Load a slim checkpoint folder; the model is identical to the one saved."""
    model, manifest = load_slim(path, device=str(resolve_device(device)))
    model._upop_info = info_from_manifest(manifest)  # type: ignore[assignment]
    return model
