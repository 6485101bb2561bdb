from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from upop.datasets.readers import outside_data_allowed
from upop.run.report import target_missed as latency_note

from .export_cmd import plan_chain
from .options import check_values, merge, read_toml
from .recipes_cmd import recipe_options
from .errors import Interrupted
from .out import console, print_json
from .progress import Reporter, interactive


def default_out(model: str, value: float, kind: str = "p") -> Path:
    name = Path(model.rstrip("/")).name or "model"
    return Path("upop-out") / (f"{name}-p{value:g}" if kind == "p" else f"{name}-{value:g}ms")


def run(flags: dict[str, Any], config_file: Path | None, overwrite: bool, quiet: bool, resume: bool = False,
        allow_outside_data: bool = False, as_json: bool = False) -> None:
    from upop.training.distributed import env_rank
    from upop.errors import ConfigError

    check_values(flags)
    opts = read_toml(config_file)
    model = flags.get("model") or opts.get("model")
    if not model:
        raise ConfigError("--model is required (an alias, hub id, local folder, or demo-blip / demo-clip / demo-vit)")
    main = env_rank() == 0  # under torchrun only rank 0 draws, writes, locks and prints
    recipe = recipe_options(model, flags.get("data") or opts.get("data"), flags.get("task") or opts.get("task"),
                            flags.get("recipe") or opts.get("recipe"), main,
                            flags.get("ratio") if flags.get("ratio") is not None else opts.get("ratio"))
    o = merge(flags, {**recipe, **opts}, _defaults(model))  # flags > --config > recipe > defaults
    _unused(o, flags, {"--config " + str(config_file): opts, "the recipe": recipe}, model, main)
    cfg = _config(o)
    out = Path(o["out"]) if o.get("out") else default_out(model, cfg.ratio if cfg.target_latency_ms is None
                                                              else cfg.target_latency_ms, "ms" if cfg.target_latency_ms else "p")
    from upop.models.hub import network_rule

    network_rule(model)  # one probe of the hub at most; demos and local folders never touch it
    guard = _output_guard(out, model, o.get("data"), overwrite, main, o.get("teacher"))
    chain = plan_chain({**o, "allow_outside_data": allow_outside_data}, model, out, overwrite) if main else None
    with guard as partial, outside_data_allowed(allow_outside_data):
        result = _compress(model, cfg, o, out, partial, overwrite, quiet, resume, main, as_json)
    if main:
        _record_latest(out, model)
        if chain is not None:
            _deploy(chain, result.report, model, out, overwrite, quiet)
        _tell(result.report, out, quiet, as_json)


def _deploy(chain: Any, report: Any, model: str, out: Path, overwrite: bool, quiet: bool) -> None:
    """``--export``: the slim checkpoint is written and kept whatever happens here; the report gains the table."""
    from upop.run.report import write_report

    report.deployment = chain.run(model, out, overwrite, console(stderr=True, quiet=quiet))
    write_report(report, out)


def _not_applying(o: dict[str, Any], family: str | None, task: str | None) -> dict[str, str]:
    """The options this run has no use for, each with why."""
    out = {}
    if o.get("distill") == "off":
        out |= {k: "it tunes --distill, which is off" for k in ("distill_weight", "distill_temperature",
                                                               "distill_search", "teacher")}
    elif o.get("distill") == "features":
        out["distill_temperature"] = "it is the temperature of the logit KL; --distill features has none"
    if family is not None and task is not None:
        out |= _task_options_unused(family, task)
    return out | _export_options_unused(o)


def _export_options_unused(o: dict[str, Any]) -> dict[str, str]:
    """The precision options without --export, and INT8's own without a precision that calibrates or compares."""
    if not o.get("export"):
        return {k: "it is for --export, which is not given" for k in ("precision", "max_drop", "calibration_size")}
    if o.get("precision") in ("int8", "auto"):
        return {}
    return {"calibration_size": "only --precision int8 and auto calibrate",
            "max_drop": "only --precision int8 and auto compare metrics"}


def _task_options_unused(family: str, task: str) -> dict[str, str]:
    """The tasks' own options that this run's task does not declare, each with the tasks that use it."""
    from upop.adapters import get_adapter
    from upop.errors import UpopError
    from upop.tasks import options_not_taken

    try:
        adapter = get_adapter(family)
    except UpopError:  # an unknown family: the run says so itself
        return {}
    return {name: f"only {' and '.join(users)} uses it; this run is {family} {task}"
            for name, users in options_not_taken(adapter, task).items()}


def _family_task(model: str, task: str | None) -> tuple[str | None, str | None]:
    """The model's family and task from its config or slim manifest (no weights read)."""
    from upop.run.checkpoint import is_slim_checkpoint, read_manifest
    from upop.errors import UpopError
    from upop.models.hub import resolve

    from .recipes_cmd import _family_and_task

    source = resolve(model)
    if not is_slim_checkpoint(source):
        return _family_and_task(model, task)
    try:
        from upop.adapters import get_adapter

        manifest = read_manifest(source)
        classes = get_adapter(manifest["base_config"].get("model_type", "")).classes
        return manifest["family"], task or classes.get(manifest["model_class"])
    except (UpopError, AttributeError):
        return None, None


def _unused(o: dict[str, Any], flags: dict[str, Any], files: dict[str, dict[str, Any]], model: str, main: bool) -> None:
    """An option that does not apply: a flag is refused in one line; one from a file or recipe is said once."""
    from upop.errors import ConfigError
    from upop.run.safety import say_once

    from .options import flag

    from upop.tasks.base import declaring

    wanted = {k for k in declaring() if o.get(k) is not None}
    family, task = _family_task(model, o.get("task")) if wanted else (None, None)
    for name, why in _not_applying(o, family, task).items():
        if flags.get(name) is not None:
            raise ConfigError(f"{flag(name)} does not apply to this run ({why}): drop it")
        source = next((where for where, values in files.items() if values.get(name) is not None), None)
        if source is not None and main:
            say_once(f"{name} from {source} is not used ({why})")


def _defaults(model: str) -> dict[str, Any]:
    """The options a flag or the TOML file leaves unset: the table's defaults (the config dataclasses', one place
    for CLI and API), and a demo model's own epochs, learning rate and batch."""
    from upop.run.config import CompressConfig
    from upop.models.demo import DEMOS

    out = CompressConfig.option_defaults()
    demo = DEMOS.get(model)
    if demo:  # the tiny demos on their synthetic shapes train best without augmentation (docs/recipes.md)
        out |= {"search_epochs": demo.compress_search_epochs, "retrain_epochs": demo.compress_retrain_epochs,
                "lr": demo.compress_lr, "batch_size": demo.batch_size, "augment": "none"}
    return out


def _config(o: dict[str, Any]):
    from upop.api import check_profile
    from upop.run.config import CompressConfig
    from upop.errors import ConfigError

    if o.get("ratio") is None and o.get("target_latency") is None:
        raise ConfigError("--ratio is required (the share of compressible cost to remove, between 0 and 1), "
                          "or --target-latency with --profile")
    cfg = CompressConfig.from_values(o)
    check_profile(cfg.profile)
    return cfg


@contextmanager
def _output_guard(out: Path, model: str, data: str | None, overwrite: bool, main: bool,
                  teacher: str | None = None) -> Iterator[Path]:
    """Everything about the output settled before the run: nothing but upop's own folders is replaced,
    the source is not inside it, ``<out>.partial`` is upop's, the parent can take the run, and no
    other run writes the same output (rank 0 holds the lock until the run ends)."""
    from upop.models.hub import resolve
    from upop.run.safety import OutputLock, check_replace, check_room, check_state_folder, weights_bytes

    source = resolve(model)
    sources = [source, resolve(teacher) if teacher else None]
    check_replace(out, overwrite=overwrite, sources=sources, inputs=[data], kind="slim")
    partial = check_state_folder(out)
    if not main:
        yield partial
        return
    # The run's state holds the weights and two optimizer moments; the checkpoint the weights again.
    check_room(out, 4 * weights_bytes(source))
    with OutputLock(out):
        check_replace(out, overwrite=overwrite, kind="slim")  # again, now that no other run can change it
        yield partial


def _compress(model: str, cfg: Any, o: dict[str, Any], out: Path, partial: Path, overwrite: bool, quiet: bool,
              resume: bool, main: bool, as_json: bool = False) -> Any:
    import upop
    from upop.training.distributed import env_rank
    from upop.errors import DivergedError

    try:
        with Reporter(interactive(quiet, as_json) and main, lines=main and not quiet) as rep:
            result = upop.compress(model, cfg, data=o.get("data"), task=o.get("task"), batch_size=o["batch_size"],
                                   eval_limit=o.get("eval_limit"), progress=rep, state_dir=partial, resume=resume,
                                   checkpoint_every=o["checkpoint_every"], latency=_latency(o["latency"], cfg),
                                   task_options=task_options(o))
            if main:
                _save(result, out, partial, overwrite)
            finish_together()
    except RuntimeError as exc:
        from upop.training.distributed import PeerLostError, has_peers

        if not has_peers():  # alone (a group of one too), the error is the run's own: shown as it is
            raise
        # Under torchrun a failed collective means another rank is gone; torchrun restarts the
        # group (--max-restarts) and the restarted ranks resume from the last checkpoint.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PeerLostError(f"rank {env_rank()}: {first[:200]}") from None
    except DivergedError as exc:
        kept = (f"; the last good state is kept in {partial} (--resume continues from it)"
                if (partial / "state.pt").is_file() else "")
        raise DivergedError(f"{exc}{kept}") from None
    except KeyboardInterrupt:
        if not main:  # rank 0 and the launcher say it once
            raise typer.Exit(130) from None
        if (partial / "state.pt").is_file():
            raise Interrupted(f"interrupted; the run's state is in {partial}: run the same command with --resume "
                              "to continue") from None
        raise
    return result


def task_options(o: dict[str, Any]) -> dict[str, Any]:
    """What the task reads (``upop.run.options.task_values``)."""
    from upop.run.options import task_values

    return task_values(o)


def _latency(wanted: bool, cfg: Any) -> Any:
    """PyTorch always; every runtime that is measured in the report too, where it is installed."""
    if not wanted:
        return False
    from upop.api import resolve_device
    from upop.exporters import backends

    device = resolve_device(cfg.device)
    return {b.name: b.report_runtime(device) for b in backends() if b.in_report and b.available()} or True


def _save(result: Any, out: Path, partial: Path, overwrite: bool) -> None:
    """The last step: a full disk or a read-only folder here is one line, and the run's state is kept."""
    from upop.errors import OutputError

    try:
        result.save(out, overwrite=overwrite)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        kept = (f"; the run's state is kept in {partial}: make room or fix the folder, then run the same command "
                "with --resume to write it") if (partial / "state.pt").is_file() else ""
        raise OutputError(f"could not write {out}: {reason}{kept}") from None


def _record_latest(out: Path, model: str) -> None:
    """``latest.json`` in the output root, for ``upop export`` / ``upop profile`` with no path. The run
    itself succeeded: a record that cannot be written is a warning, not a failure."""
    from .latest import write_latest

    from upop.errors import UpopError

    try:
        write_latest(out, model)
    except (OSError, UpopError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        typer.echo(f"warning: could not record {out} as the last compress output: {reason}", err=True)


def _tell(report: Any, out: Path, quiet: bool = False, as_json: bool = False) -> None:
    """The summary table and the output paths, on a terminal or in a log alike (plain text off a
    terminal); under ``--json`` the report alone on stdout and the summary on stderr; ``--quiet``: nothing."""
    if as_json:
        print_json({**report.to_dict(), "out": str(out.resolve())})
    if not quiet:
        print_summary(report, out, stderr=as_json)


def finish_together() -> None:
    """Under torchrun every rank waits for rank 0's files, then leaves the group: the workers of all
    nodes end at once, so no node's agent is still polling the rendezvous when another's shuts it down."""
    from upop.training.distributed import current

    import torch

    dist = current()
    if dist.enabled:
        dist.barrier()
        torch.distributed.destroy_process_group()



def print_summary(report: Any, out: Path, stderr: bool = False) -> None:
    from upop.run.report import deployment_lines, deployment_rows, run_lines, summary_rows

    con = console(stderr=stderr)
    table = Table(title=f"{report.model} → {out}  (ratio {report.ratio}, {report.granularity}, "
                        f"{report.seconds:.0f} s)")
    for col in ("", "before", "after", "after/before"):
        table.add_column(col, justify="right" if col else "left")
    for row in summary_rows(report):
        table.add_row(*row)
    note = latency_note(report)
    table.caption = "; ".join(line[2:] for line in run_lines(report) if line[2:] != note) or None
    con.print(table)
    if note:  # said once, where it is seen
        con.print(f"[bold red]{note}[/bold red]")
    dep = deployment_rows(report)
    if dep:
        table = Table(title=f"deployment ({report.deployment['deployment']['runtime']} "
                            f"{report.deployment['deployment']['device']})")
        for col in dep[0]:
            table.add_column(col, justify="left" if col == "precision" else "right")
        for row in dep[1:]:
            table.add_row(*row)
        con.print(table)
    for line in deployment_lines(report):
        con.print(line, soft_wrap=True)
    con.print(f"slim checkpoint: {out}   report: {out / 'report.md'}   picture: {out / 'compression.png'}",
              soft_wrap=True)
