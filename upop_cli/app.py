"""``upop``: compress, evaluate, inspect and ship vision-language Transformers."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer
from typer.core import TyperCommand

from upop.errors import ConfigError

from .errors import guarded, run_guarded
from .options import compress_table, typer_option, with_options

app = typer.Typer(
    name="upop",
    help="UPop structured pruning for vision-language Transformers: search, slim, retrain, export, profile.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
datasets_app = typer.Typer(help="Build datasets.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
recipes_app = typer.Typer(help="Reference hyperparameters per model family, task and dataset.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")
profiles_app = typer.Typer(help="Hardware profiles: list, show, validate.", no_args_is_help=True)
app.add_typer(profiles_app, name="profiles")
convert_app = typer.Typer(help="Convert checkpoints that transformers cannot read.", no_args_is_help=True)
app.add_typer(convert_app, name="convert")

_RUN = {o.name: o for o in compress_table()}
TaskOpt, DataOpt = typer_option(_RUN["task"]), typer_option(_RUN["data"])  # upop eval and export share them
QuietOpt = typer.Option(False, "--quiet", "-q", help="Print nothing but errors.")
JsonOpt = typer.Option(False, "--json", help="Print only the machine-readable result on stdout (the rest on stderr).")
OutsideOpt = typer.Option(False, "--allow-outside-data",
                          help="Read annotation image paths that leave the data folder (.., absolute paths).")


@app.callback()
def _setup() -> None:
    """Quiet the libraries underneath: upop draws its own progress and reports errors itself."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging

    disable_progress_bars()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    from upop.run.safety import never_prompt_for_remote_code

    never_prompt_for_remote_code()


@app.command()
def version() -> None:
    """Print the upop version."""
    from upop import __version__

    typer.echo(__version__)


@app.command()
@with_options(compress_table)
def compress(
    values: dict[str, Any],
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    resume: bool = typer.Option(False, "--resume", help="Continue a stopped, crashed or killed run from its last "
                                                         "checkpoint (state in <out>.partial)."),
    nproc: int = typer.Option(1, "--nproc", help="Processes (GPUs) on this node: launches torchrun."),
    nnodes: int = typer.Option(1, "--nnodes", help="Nodes, with --rdzv-endpoint (run the same command on each)."),
    rdzv_endpoint: Optional[str] = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT of the rendezvous."),
    rdzv_id: str = typer.Option("upop", "--rdzv-id", help="Job id shared by the nodes."),
    max_restarts: int = typer.Option(0, "--max-restarts", help="Elastic restarts after a worker fails; the "
                                                                "restarted group resumes from the last checkpoint."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file with the same options; flags win."),
    allow_outside_data: bool = OutsideOpt,
    quiet: bool = QuietOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Search, slim and retrain a model with UPop; write the slim checkpoint and a report.

    Example: upop compress --model demo-blip --ratio 0.5

    Several GPUs: upop compress --nproc 8 ... (or torchrun --nproc-per-node 8 $(which upop) compress ...);
    --batch-size is per process.
    """
    from .compress_cmd import run

    flags = values
    if nproc > 1 or nnodes > 1 or max_restarts > 0:
        from upop.training.distributed import launched_by_torchrun

        from .launch import launch, torchrun_args, worker_args

        def start() -> None:
            if launched_by_torchrun():
                raise ConfigError("this process was already started by torchrun: drop --nproc/--nnodes/--max-restarts")
            worker = worker_args("compress", {**flags, "config": config},
                                 {"overwrite": overwrite, "resume": resume, "quiet": quiet,
                                  "allow_outside_data": allow_outside_data, "json": as_json})
            raise typer.Exit(launch(torchrun_args(nproc, nnodes, rdzv_endpoint, rdzv_id, max_restarts, worker)))

        guarded(start)
        return
    guarded(lambda: run(flags, config, overwrite, quiet, resume, allow_outside_data, as_json))


def _runtimes(exporting: bool = False) -> str:
    """The registered runtimes for --format / --runtime help (older spellings are accepted too)."""
    from upop.exporters import backends

    return " | ".join(f"{b.name}{' (' + ', '.join(b.aliases) + ')' if b.aliases else ''}"
                      f"{'' if b.available() else ' [not installed]'}" for b in backends() if b.exports or not exporting)


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help="Model (alias, demo, hub id, folder), slim checkpoint, or export folder."),
    task: Optional[str] = TaskOpt,
    data: Optional[str] = DataOpt,
    split: str = typer.Option("test", "--split"),
    batch_size: int = typer.Option(64, "--batch-size", help="Records per evaluation batch."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate on at most N records."),
    device: str = typer.Option("auto", "--device"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    allow_outside_data: bool = OutsideOpt,
    runtime: Optional[str] = typer.Option(None, "--runtime", help="An export folder: run it in "
                                          f"{_runtimes(exporting=True)} (default onnxruntime; the folder's format)."),
    k_test: Optional[int] = typer.Option(None, "--k-test", help="Retrieval: ITM re-ranking depth (as upop compress; "
                                                                "default: the data's, or a demo's)."),
    rerank: Optional[str] = typer.Option(None, "--rerank", help="BLIP retrieval: logit (default) | prob, as upop "
                                                                "compress."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Chat VQA/caption: greedy "
                                                                                "decoding's new tokens."),
) -> None:
    """Evaluate a model, slim checkpoint or export folder on a task (an export: every forward by the artifact).

    Example: upop eval demo-blip --split test; upop eval upop-export/demo-blip-onnxruntime --runtime onnxruntime
    """
    from .eval_cmd import run

    scoring = {k: v for k, v in (("k_test", k_test), ("rerank", rerank), ("max_new_tokens", max_new_tokens))
               if v is not None}
    guarded(lambda: run(model, task, data, split, batch_size, limit, device, as_json, allow_outside_data, runtime,
                        scoring))


@app.command()
def inspect(
    slim_dir: str = typer.Argument(..., help="A slim checkpoint folder written by upop."),
    json_out: bool = typer.Option(False, "--json", help="Print the per-module sizes as JSON."),
) -> None:
    """Per-module kept sizes per tower, and parameters and FLOPs per tower, of a slim checkpoint.

    Example: upop inspect upop-out/demo-blip-p0.5
    """
    from .inspect_cmd import run

    guarded(lambda: run(slim_dir, json_out))


@app.command("export")
def export(
    source: Optional[str] = typer.Argument(None, help="Slim checkpoint folder, or a model (folder, hub id, alias) to "
                                                      "export as is (default: the last upop compress output)."),
    fmt: str = typer.Option("onnxruntime", "--format", "-f", help=_runtimes(exporting=True)),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output folder (default upop-export/<name>-<format>)."),
    fp16: bool = typer.Option(False, "--fp16", help="Also FP16 graphs (ONNX) / an FP16 engine (TensorRT): --precision fp16."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32 | fp16 | int8 | int8-dynamic | auto: "
                                            "graphs at this precision beside FP32, and the deployment table."),
    calibration_size: int = typer.Option(128, "--calibration-size", help="int8: train-split items to calibrate on."),
    calibration_method: str = typer.Option("minmax", "--calibration-method", help="int8: minmax | entropy | percentile."),
    calibration_seed: int = typer.Option(0, "--calibration-seed", help="int8: seed of the calibration draw."),
    max_drop: float = typer.Option(1.0, "--max-drop", help="int8 / auto: metric points allowed below FP32 on val."),
    task: Optional[str] = TaskOpt,
    data: Optional[str] = DataOpt,
    original: Optional[str] = typer.Option(None, "--original", help="An export of the original model: the table's "
                                           "speedups against its FP32 graphs."),
    allow_outside_data: bool = OutsideOpt,
    batch: Optional[str] = typer.Option(None, "--batch", help="TensorRT optimization profile MIN:OPT:MAX (default "
                                        "1:8:32); its OPT (or a single N) is the deployment table's latency batch."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset, 14..20."),
    overwrite: bool = typer.Option(False, "--overwrite"),
    quiet: bool = QuietOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Export the graphs a deployment needs, each checked against PyTorch.

    Example: upop export upop-out/demo-blip-p0.5 --format onnxruntime --precision auto (no path: the last compress output)
    """
    from .export_cmd import QuantArgs, run

    quant = QuantArgs(precision, calibration_size, calibration_method, calibration_seed, max_drop, task, data, original,
                      allow_outside_data)
    guarded(lambda: run(source, fmt, out, fp16, batch, opset, overwrite, quiet, as_json, quant))


@app.command()
def predict(
    export_dir: str = typer.Argument(..., help="A folder written by upop export --format onnxruntime."),
    image: list[str] = typer.Option(..., "--image", "-i", help="Image file (twice for nlvr: left, then right)."),
    text: Optional[list[str]] = typer.Option(None, "--text", "-t", help="Caption(s) to score, or the question."),
    fp16: bool = typer.Option(False, "--fp16", help="Use the FP16 graphs."),
) -> None:
    """Run the exported graphs with ONNX Runtime: class, caption, answer or image-text scores.

    Example: upop predict upop-export/demo-blip-p0.5-onnx -i cat.png -t "a red circle on the left"
    """
    from .export_cmd import run_predict

    guarded(lambda: run_predict(export_dir, image, text or [], fp16))


@convert_app.command("nlvr")
def convert_nlvr(
    checkpoint: str = typer.Argument(..., help="BLIP's NLVR2 checkpoint file (model_base_nlvr.pth)."),
    out: str = typer.Option(..., "--out", "-o", help="Folder to write (an HF-style model folder)."),
    processor: Optional[str] = typer.Option(None, "--processor", help="Copy the tokenizer and image processor "
                                                                       "from this BLIP folder or hub id."),
    head_dim: int = typer.Option(64, "--head-dim", help="Attention head width (BLIP: 64)."),
    enc_token_id: Optional[int] = typer.Option(30523, "--enc-token-id",
                                               help="Id of BLIP's [ENC] token, put first in every statement."),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Convert the original BLIP NLVR2 checkpoint (read with weights_only) into a model upop compresses.

    Example: upop convert nlvr model_base_nlvr.pth --out blip-nlvr --processor Salesforce/blip-itm-base-coco
    """
    from .convert_cmd import run_convert_nlvr

    guarded(lambda: run_convert_nlvr(checkpoint, out, processor, head_dim, enc_token_id, overwrite))


class _JsonValueOptional(TyperCommand):
    """``--json`` alone prints the result on stdout (as on every other command); ``--json FILE`` writes
    FILE, as it always did. Typer's parser has no option whose value may be left out, so ``--json`` at
    the end or before another option is given the value ``-`` (stdout) here."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        args = list(args)
        for i, a in enumerate(args):
            if a == "--":
                break
            if a == "--json" and (i + 1 == len(args) or (args[i + 1].startswith("-") and args[i + 1] != "-")):
                args.insert(i + 1, "-")
                break
        return super().parse_args(ctx, args)


@app.command(cls=_JsonValueOptional)
def profile(
    target: Optional[str] = typer.Argument(None, help="Model, slim checkpoint, or ONNX export folder (default: the "
                                                      "last upop compress output)."),
    runtime: str = typer.Option("torch", "--runtime", help=_runtimes()),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda"),
    batch: Optional[list[int]] = typer.Option(None, "--batch", help="Batch size (repeat for several)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | fp16"),
    compare: Optional[str] = typer.Option(None, "--compare", help="Another target; prints the speedup over it."),
    json_out: Optional[str] = typer.Option(None, "--json", metavar="[FILE]",
                                           help="{runs: [...], speedup: x}: alone on stdout (--json), or written "
                                                "to FILE (--json FILE)."),
    warmup: int = typer.Option(5, "--warmup"),
    runs: int = typer.Option(30, "--runs"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the file of --json FILE (a result upop wrote)."),
    quiet: bool = QuietOpt,
) -> None:
    """Measure latency (p50/p90/p99, throughput) of every deployment graph on this machine.

    Example: upop profile upop-out/demo-blip-p0.5 --compare demo-blip --batch 1 --batch 8 (no path: the last
    compress output)
    """
    from .profile_cmd import run

    guarded(lambda: run(target, runtime, device, batch or [1, 8], precision, compare, json_out, warmup, runs, quiet,
                        overwrite))


@recipes_app.command("list")
def recipes_list() -> None:
    """The shipped recipes and their main values."""
    from .recipes_cmd import recipes_list as run

    guarded(run)


@recipes_app.command("show")
def recipes_show(name: str = typer.Argument(..., help="Recipe name (upop recipes list)."),
                 as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Every value of one recipe, and the paper's numbers."""
    from .recipes_cmd import recipes_show as run

    guarded(lambda: run(name, as_json))


@profiles_app.command("list")
def profiles_list() -> None:
    """The shipped hardware profiles."""
    from .profile_cmd import profiles_list as run

    guarded(run)


@profiles_app.command("show")
def profiles_show(name: str = typer.Argument(..., help="Profile name or file.")) -> None:
    """Every field of one profile."""
    from .profile_cmd import profiles_show as run

    guarded(lambda: run(name))


@profiles_app.command("calibrate")
def profiles_calibrate(
    model: str = typer.Option(..., "--model", "-m", help="The model whose blocks to time (alias, demo, folder, slim)."),
    out: Path = typer.Option(..., "--out", "-o", help="Profile file to write."),
    runtime: str = typer.Option("torch", "--runtime", help=_runtimes()),
    device: str = typer.Option("cpu", "--device"),
    base: str = typer.Option("cpu-x86", "--base", help="Profile whose alignment and shapes the result keeps."),
    granularity: str = typer.Option("dim", "--granularity"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing profile file."),
    quiet: bool = QuietOpt,
) -> None:
    """Time the model's attention and MLP blocks over a sweep of widths here; write a measured profile.

    Example: upop profiles calibrate --model demo-blip --out my-cpu.toml
    """
    from .profile_cmd import profiles_calibrate as run

    guarded(lambda: run(model, out, runtime, device, base, granularity, quiet, overwrite))


@profiles_app.command("validate")
def profiles_validate(path: Path = typer.Argument(..., help="A profile TOML file.")) -> None:
    """Check a profile file; every problem is listed."""
    from .profile_cmd import profiles_validate as run

    guarded(lambda: run(path))


@datasets_app.command("shapes")
def datasets_shapes(
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write."),
    train: int = typer.Option(2000, "--train"),
    val: int = typer.Option(200, "--val"),
    test: int = typer.Option(200, "--test"),
    seed: int = typer.Option(0, "--seed"),
    image_size: int = typer.Option(64, "--image-size"),
    quiet: bool = QuietOpt,
) -> None:
    """Write the synthetic shapes set (retrieval, captioning, VQA and classification annotations).

    Example: upop datasets shapes --out data/shapes --train 500
    """
    from .eval_cmd import run_datasets_shapes

    guarded(lambda: run_datasets_shapes(out, train, val, test, seed, image_size, quiet))


def main() -> None:
    # Standalone mode: Click prints usage errors itself; upop errors reach run_guarded.
    sys.exit(run_guarded(app))


if __name__ == "__main__":
    main()
