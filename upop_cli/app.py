"""``upop``: compress, inspect and ship vision-language Transformers."""

from __future__ import annotations

import sys

import typer

from .errors import run_guarded

app = typer.Typer(
    name="upop",
    help="UPop structured pruning for vision-language Transformers: search, slim, retrain, export, profile.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.command()
def version() -> None:
    """Print the upop version."""
    from upop import __version__

    typer.echo(__version__)


@app.command()
def inspect(
    slim_dir: str = typer.Argument(..., help="A slim checkpoint folder written by upop."),
    json_out: bool = typer.Option(False, "--json", help="Print the per-module sizes as JSON."),
) -> None:
    """Per-module kept sizes per tower, and parameters per tower, of a slim checkpoint.

    Example: upop inspect out/blip-0.5
    """
    from .inspect_cmd import run

    run(slim_dir, json_out)


def main() -> None:
    sys.exit(run_guarded(lambda: app(standalone_mode=False)))


if __name__ == "__main__":
    main()
