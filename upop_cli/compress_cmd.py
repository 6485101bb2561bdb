from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from .options import merge, read_toml
from .errors import Interrupted
from .progress import Reporter, interactive


def default_out(model: str, value: float, kind: str = "p") -> Path:
    name = Path(model.rstrip("/")).name or "model"
    return Path("upop-out") / (f"{name}-p{value:g}" if kind == "p" else f"{name}-{value:g}ms")


def run(flags: dict[str, Any], config_file: Path | None, overwrite: bool, quiet: bool, resume: bool = False) -> None:
    import upop
    from upop.api import check_profile
    from upop.demo import DEMOS
    from upop.errors import CheckpointError, ConfigError

    opts = read_toml(config_file)
    model = flags.get("model") or opts.get("model")
    if not model:
        raise ConfigError("--model is required (an alias, hub id, local folder, or demo-blip / demo-clip / demo-vit)")
    demo = DEMOS.get(model)
    defaults = {"search_epochs": demo.compress_search_epochs if demo else 1,
                "retrain_epochs": demo.compress_retrain_epochs if demo else 1,
                "lr": demo.compress_lr if demo else 1e-5, "batch_size": demo.batch_size if demo else 32,
                "granularity": "dim", "device": "auto", "seed": 0, "lambda_attn": 6.4e-3, "lambda_mlp": 2e-4,
                "checkpoint_every": 200}
    o = merge(flags, opts, defaults)
    if o.get("ratio") is None and o.get("target_latency") is None:
        raise ConfigError("--ratio is required (the share of compressible cost to remove, between 0 and 1), "
                          "or --target-latency with --profile")
    cfg = upop.CompressConfig(
        ratio=o["ratio"] if o.get("ratio") is not None else 0.5, granularity=o["granularity"],
        profile=o.get("profile"), device=o["device"], target_latency_ms=o.get("target_latency"),
        search=upop.SearchConfig(epochs=o["search_epochs"], update_every=o.get("update_every"), lr=o["lr"],
                                 seed=o["seed"], lambda_attn=o["lambda_attn"], lambda_mlp=o["lambda_mlp"]),
        retrain=upop.RetrainConfig(epochs=o["retrain_epochs"], lr=o["lr"], seed=o["seed"]))
    check_profile(cfg.profile)
    out = Path(o["out"]) if o.get("out") else default_out(model, cfg.ratio if cfg.target_latency_ms is None
                                                              else cfg.target_latency_ms, "ms" if cfg.target_latency_ms else "p")
    if out.exists() and not overwrite:
        raise CheckpointError(f"output folder {out} already exists; pass --overwrite to replace it")
    partial = out.with_name(out.name + ".partial")
    from upop.distributed import env_rank

    main = env_rank() == 0  # under torchrun only rank 0 draws, writes and prints
    try:
        with Reporter(interactive(quiet) and main) as rep:
            result = upop.compress(model, cfg, data=o.get("data"), task=o.get("task"), batch_size=o["batch_size"],
                                   eval_limit=o.get("eval_limit"), progress=rep, state_dir=partial, resume=resume,
                                   checkpoint_every=o["checkpoint_every"])
            if main:
                result.save(out, overwrite=overwrite)
            finish_together()
    except RuntimeError as exc:
        from upop.distributed import PeerLostError, launched_by_torchrun

        if not launched_by_torchrun():
            raise
        # Under torchrun a failed collective means another rank is gone; torchrun restarts the
        # group (--max-restarts) and the restarted ranks resume from the last checkpoint.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PeerLostError(f"rank {env_rank()}: {first[:200]}") from None
    except KeyboardInterrupt:
        if not main:  # rank 0 and the launcher say it once
            raise typer.Exit(130) from None
        if (partial / "state.pt").is_file():
            raise Interrupted(f"interrupted; the run's state is in {partial}: run the same command with --resume "
                              "to continue") from None
        raise
    if main and not quiet and sys.stdout.isatty():
        print_summary(result.report, out)


def finish_together() -> None:
    """Under torchrun every rank waits for rank 0's files, then leaves the group: the workers of all
    nodes end at once, so no node's agent is still polling the rendezvous when another's shuts it down."""
    from upop.distributed import current

    import torch

    dist = current()
    if dist.enabled:
        dist.barrier()
        torch.distributed.destroy_process_group()



def print_summary(report: Any, out: Path) -> None:
    from upop.report import run_lines, summary_rows

    console = Console()
    table = Table(title=f"{report.model} → {out}  (ratio {report.ratio}, {report.granularity}, "
                        f"{report.seconds:.0f} s)")
    for col in ("", "before", "after", "after/before"):
        table.add_column(col, justify="right" if col else "left")
    for row in summary_rows(report):
        table.add_row(*row)
    table.caption = "; ".join(line[2:] for line in run_lines(report)) or None
    console.print(table)
    console.print(f"report: {out / 'report.md'}   picture: {out / 'compression.png'}")
