from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from .latest import source_or_latest
from .options import at_least, check
from .out import console, print_json


def _profile(target: str, runtime: str, device: str, batches: list[int], precision: str, warmup: int, runs: int):
    from upop.exporters import backend

    return backend(runtime).profile(target, batches, device, precision, warmup, runs)


def _is_profile_result(path: Path) -> bool:
    from upop.errors import UpopError
    from upop.run.safety import read_json

    try:
        data = read_json(path, UpopError)
    except UpopError:
        return False
    return isinstance(data, dict) and isinstance(data.get("runs"), list) and "speedup" in data


def _is_calibrated_profile(path: Path) -> bool:
    from upop.errors import UpopError
    from upop.profiles import read_file

    try:
        return read_file(path).latency_model == "table"
    except (UpopError, OSError, ValueError):
        return False


PRECISIONS, DEVICES = ("fp32", "fp16"), ("cpu", "cuda")


def runtime_name(runtime: str) -> str:
    """The one name of ``--runtime`` (older spellings ort and trt map here, at the CLI's edge)."""
    from upop.exporters import canonical

    return canonical(runtime)


def check_profile_options(runtime: str, device: str, batches: list[int], precision: str, warmup: int,
                          runs: int) -> None:
    runtime_name(runtime)
    check("--device", device, " or ".join(DEVICES), lambda v: v in DEVICES)
    check("--precision", precision, " or ".join(PRECISIONS), lambda v: v in PRECISIONS)
    for b in batches:
        check("--batch", b, "an integer >= 1", at_least(1))
    check("--warmup", warmup, "an integer >= 0", at_least(0))
    check("--runs", runs, "an integer >= 1", at_least(1))


def run(target: str | None, runtime: str, device: str, batches: list[int], precision: str, compare: str | None,
        json_out: str | Path | None, warmup: int, runs: int, quiet: bool, overwrite: bool = False) -> None:
    """``json_out``: ``"-"`` prints the runs alone on stdout (the table then goes to stderr), a path writes them
    (upop's own result file only with ``overwrite``, never another file)."""
    from upop.errors import ConfigError
    from upop.models.hub import network_rule
    from upop.latency.timing import speedup
    from upop.run.safety import check_file, write_file

    check_profile_options(runtime, device, batches, precision, warmup, runs)
    runtime = runtime_name(runtime)
    to_stdout = json_out == "-"
    if json_out is not None and not to_stdout and Path(json_out).is_dir():
        raise ConfigError(f"--json {json_out} is a folder: give a file to write, or --json alone for stdout "
                          "(the target goes first: upop profile TARGET --json)")
    if overwrite and (json_out is None or to_stdout):
        raise ConfigError("--overwrite replaces the file of --json FILE; there is none here: drop it")
    file_rule = {"kind": "profile-json", "overwrite": overwrite, "recognise": _is_profile_result,
                 "sources": [target, compare]}
    if json_out is not None and not to_stdout:
        check_file(json_out, **file_rule)  # before the measurement, not after it
    target = source_or_latest(target, "profile")
    network_rule(target, compare)  # one probe at most for both; demos and local folders never touch the hub

    results = _profile(target, runtime, device, batches, precision, warmup, runs)
    other = _profile(compare, runtime, device, batches, precision, warmup, runs) if compare else []
    ratio = speedup(other, results) if compare else None
    data = {"runs": [r.to_dict() for r in results + other], "speedup": ratio}
    if to_stdout:
        print_json(data)
    elif json_out is not None:
        write_file(json_out, json.dumps(data, indent=2), **file_rule)
    if quiet:
        return
    table = Table(title=f"latency, {runtime} on {device} ({precision})")
    for col in ("target", "graph", "tokens", "batch", "p50 ms", "p90 ms", "p99 ms", "items/s", "tokens/s", "provider"):
        table.add_column(col, justify="left" if col in ("target", "graph", "tokens", "provider") else "right")
    for r in results + other:
        table.add_row(r.target, r.graph, r.tokens or "-", str(r.batch), f"{r.p50_ms:.2f}", f"{r.p90_ms:.2f}",
                      f"{r.p99_ms:.2f}", f"{r.throughput:.1f}",
                      f"{r.tokens_per_s:.1f}" if r.tokens_per_s is not None else "-", r.provider or "-")
    con = console(stderr=to_stdout)
    con.print(table)
    if ratio is not None:
        con.print(f"speedup of {target} over {compare}: {ratio:.2f}×", soft_wrap=True)


def profiles_list() -> None:
    from upop.profiles import available, load

    table = Table(title="hardware profiles")
    for col in ("name", "runtime", "device", "precision", "MLP ×", "head_dim ×", "latency model", "description"):
        table.add_column(col, no_wrap=col == "name")
    for name in available():
        p = load(name)
        table.add_row(name, p.runtime, p.device, p.precision, str(p.alignment.mlp_multiple),
                      "whole heads" if p.alignment.whole_heads else
                      f"{p.alignment.head_dim_multiple} in {p.alignment.head_dim_min}..{p.alignment.head_dim_max}",
                      p.latency_model, p.description)
    console().print(table)


def profiles_show(name: str) -> None:
    import dataclasses

    from upop.profiles import load

    console().print_json(json.dumps(dataclasses.asdict(load(name))))


def profiles_validate(path: Path) -> None:
    from upop.exporters import backends
    from upop.profiles import read_file

    p = read_file(path, runtimes=[b.name for b in backends()])  # the runtimes registered here
    console().print(f"{path}: valid profile {p.name!r} ({p.runtime}, {p.device}, {p.precision})")


def profiles_calibrate(model: str, out: Path, runtime: str, device: str, base: str, granularity: str,
                       quiet: bool, overwrite: bool = False) -> None:
    from upop.api import open_model, resolve_device
    from upop.latency.calibrate import calibrate, to_toml
    from upop.profiles import load, read_file
    from upop.run.safety import check_file, write_file

    runtime = runtime_name(runtime)
    check("--granularity", granularity, "dim or head", lambda v: v in ("dim", "head"))
    file_rule = {"kind": "profile", "overwrite": overwrite, "recognise": _is_calibrated_profile, "sources": [model]}
    check_file(out, **file_rule)
    from upop.exporters import backend
    from upop.exporters.timing import block_timer

    backend(runtime).require()

    from upop.models.hub import network_rule

    network_rule(model)
    src = open_model(model, None)
    log = console(stderr=True, quiet=quiet)
    dev, base_profile = resolve_device(device), load(base)
    prof = calibrate(src.model, src.adapter, base_profile, device=dev, granularity=granularity, runtime=runtime,
                     timer=block_timer(runtime, dev, base_profile.precision), log=lambda m: log.print(m))
    write_file(out, to_toml(prof), verify=read_file, **file_rule)  # what is written loads back as a valid profile
    log.print(f"wrote {out}: {len(prof.table['blocks'])} measured block(s), rest of the model "
                  f"{prof.table['rest_ms']:.3f} ms")
