"""The options of a compression run, declared once: name, type, help, rule and where the value goes.

One table (``compress_options``) yields the flags of ``upop compress`` (``upop_cli`` builds its Typer options
from it), the checks of a ``--config`` TOML file and of a recipe (type, range, choices, unknown keys) and the
typed ``CompressConfig`` the library takes (``CompressConfig.from_values``; the defaults: ``option_defaults``).
The config dataclasses check their fields with the same ``Rule`` objects, so a rule is written in one place. A
task's own options (``Task.task_options``) join the table when the task registers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

#: steps between the run's periodic checkpoints (CLI and API alike; 0: only at the ends of the phases)
DEFAULT_CHECKPOINT_EVERY = 200
GRANULARITIES = ("dim", "head")
#: constant: the search trains at ``lr`` throughout (as the reference UPop code; the weights adapt most while
#: the most is being removed, late in the search); cosine: decays to 0 over the search (upop before 0.2)
SEARCH_LR_SCHEDULES = ("constant", "cosine")
#: warmup-cosine: a 5 % linear warm-up, then cosine to 0 per step, gradients clipped at norm 1 (upop's default);
#: epoch-cosine: the reference's (BLIP's ``cosine_lr_schedule``, DeiT's timm scheduler at --warmup-epochs 0): the
#: rate of epoch e is lr·½(1 + cos(π e / epochs)), held through the epoch, no warm-up, no clipping
RETRAIN_SCHEDULES = ("warmup-cosine", "epoch-cosine")
#: how a unit's cost is counted when the search fills the ratio: its true parameters, or the reference's weighting
#: (an attention unit as a fixed number of MLP neurons per family: ``Adapter.paper_attn_weight``)
COST_WEIGHTS = ("true", "paper")
#: what the slim model learns from the teacher: nothing, its outputs (KL), its hidden states (MSE), or both
DISTILL_MODES = ("off", "logits", "features", "both")
#: Integers beyond these overflow what they feed (a seed: numpy's 32 bits; the rest: C ints in torch).
#: ``upop export --precision``'s choices (the exporters' ``CHOICES``; a test keeps the two equal)
EXPORT_PRECISIONS = ("fp32", "fp16", "int8", "int8-dynamic", "auto")
MAX_SEED = 2**32 - 1
MAX_INT = 2**31 - 1


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _text(v: Any) -> bool:
    return isinstance(v, str) and v.strip() != ""


@dataclass(frozen=True)
class Rule:
    """What a value must be: ``what`` completes "NAME must be ..." in the one-line error."""

    what: str
    ok: Callable[[Any], bool]

    def check(self, label: str, value: Any, required: bool = False) -> None:
        """One line naming ``label`` when ``value`` breaks the rule (None passes unless ``required``)."""
        if (value is None and not required) or self.ok(value):
            return
        what = self.what
        if is_int(value) and value > MAX_INT and what.startswith("an integer >="):
            what = f"at most {MAX_INT}"
        raise ConfigError(f"{label} must be {what}, got {value!r}")


def at_least(lo: int) -> Rule:
    return Rule(f"an integer >= {lo}", lambda v: is_int(v) and lo <= v <= MAX_INT)


def one_of(*choices: str) -> Rule:
    return Rule(f"one of {', '.join(choices)}", lambda v: v in choices)


def number(lo: float, *, strict: bool = False, what: str | None = None) -> Rule:
    op = ">" if strict else ">="
    return Rule(what or f"a number {op} {lo:g}", lambda v: is_num(v) and (v > lo if strict else v >= lo))


TEXT = Rule("a folder", _text)
SWITCH = Rule("true or false", lambda v: isinstance(v, bool))
RATIO = Rule("strictly between 0 and 1", lambda v: is_num(v) and 0 < v < 1)
SEED = Rule(f"an integer in 0..{MAX_SEED}", lambda v: is_int(v) and 0 <= v <= MAX_SEED)
DEVICE = Rule("auto, cpu, cuda or cuda:N", lambda v: isinstance(v, str) and bool(re.fullmatch(r"auto|cpu|cuda(:\d+)?", v)))
GRANULARITY = one_of(*GRANULARITIES)
TOWERS = Rule("tower names separated by commas (e.g. vision,language)",
              lambda v: isinstance(v, str) and bool(re.fullmatch(r"\s*\w+\s*(,\s*\w+\s*)*", v)))


@dataclass(frozen=True)
class Option:
    """One option: a flag of ``upop compress`` and a key of its TOML files.

    ``into``: the ``CompressConfig`` fields it sets (dotted: ``search.lr``), whose dataclass default is the
    option's (unless ``defaulted`` is false: the run must name it); ``default``: a run-level option's default.
    ``task``: the task reads it (``task_options``); given only when set unless ``always``.
    """

    name: str
    rule: Rule
    type: type = str
    help: str | None = None
    short: str | None = None
    switch: bool = False  # a true/false flag: --name/--no-name
    into: tuple[str, ...] = ()
    task: bool = False
    always: bool = False
    flagged: bool = True  # False: a key of TOML files and recipes only, no flag
    default: Any = None
    defaulted: bool = True
    scores: bool = False  # a task option that changes how a model is scored: kept with the slim checkpoint

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def decls(self) -> list[str]:
        if self.switch:
            return [f"{self.flag}/--no-{self.flag[2:]}"]
        return [self.flag, *([self.short] if self.short else [])]


def _named(what: str) -> Rule:
    return Rule(what, _text)


#: ``upop compress``'s own options, in the order of its --help (the tasks' options follow: ``compress_options``).
RUN_OPTIONS: tuple[Option, ...] = (
    Option("model", _named("a model name or folder"), short="-m",
           help="Alias (blip, clip, vit, ...), demo-blip/demo-clip/demo-vit/demo-blip-nlvr, hub id, local folder or "
                "slim checkpoint."),
    Option("ratio", RATIO, float, "Share of compressible cost to remove, in (0,1).", "-p", into=("ratio",),
           defaulted=False),
    Option("task", _named("a task name"),
           help="retrieval | caption | vqa | classification | nlvr (default: the model's)."),
    Option("data", TEXT, help="Data folder (default for demo models: the built-in shapes set)."),
    Option("granularity", GRANULARITY, help="dim (UPop) | head (whole heads).", into=("granularity",)),
    Option("towers", TOWERS, help="Search only these towers (e.g. language); the others keep every unit "
                                  "(default: all).", into=("search.towers",)),
    Option("profile", _named("a profile name or file"), help="Hardware profile name or file.", into=("profile",)),
    Option("target_latency", number(0, strict=True, what="a number of milliseconds > 0"), float,
           "ms under --profile; sets the ratio.", into=("target_latency_ms",)),
    Option("search_epochs", at_least(1), int, into=("search.epochs",)),
    Option("retrain_epochs", at_least(0), int, into=("retrain.epochs",)),
    Option("batch_size", at_least(1), int, default=32),
    Option("lr", number(0), float, into=("search.lr", "retrain.lr")),
    Option("update_every", at_least(1), int, "K: search steps between mask updates.", into=("search.update_every",)),
    Option("search_lr_schedule", one_of(*SEARCH_LR_SCHEDULES),
           help="constant (default, as UPop's reference) | cosine to 0.", into=("search.lr_schedule",)),
    Option("retrain_schedule", one_of(*RETRAIN_SCHEDULES),
           help="warmup-cosine (default: 5 % warm-up, cosine per step, clipping at 1) | epoch-cosine (the "
                "reference's: cosine stepped per epoch, no warm-up or clipping; the recipes').",
           into=("retrain.schedule",)),
    Option("lambda_attn", number(0), float, into=("search.lambda_attn",), flagged=False),
    Option("lambda_mlp", number(0), float, into=("search.lambda_mlp",), flagged=False),
    Option("eval_limit", at_least(1), int, "Evaluate on at most N records."),
    Option("device", DEVICE, help="auto | cpu | cuda", into=("device",)),
    Option("seed", SEED, int, into=("search.seed", "retrain.seed")),
    Option("out", TEXT, help="Output folder (default upop-out/<model>-p<ratio>).", short="-o"),
    Option("checkpoint_every", at_least(0), int,
           "Write the run's state every N steps and after each retrain epoch (default 200; 0: only at the end of "
           "the search and on Ctrl-C).", default=DEFAULT_CHECKPOINT_EVERY),
    Option("grad_accum", at_least(1), int, "Batches per optimizer step: effective batch = processes × batch × K.",
           into=("search.grad_accum", "retrain.grad_accum")),
    Option("grad_checkpointing", SWITCH, bool, "Recompute activations in the backward (models that support "
                                               "it): less memory, about a third more compute.", switch=True,
           into=("grad_checkpointing",)),
    Option("max_steps", at_least(1), int, "Cap the search and the retrain at N steps each (a quick check of a "
                                          "full-size setup).", into=("search.max_steps", "retrain.max_steps")),
    Option("workers", at_least(0), int, "Image-decoding worker processes per GPU (default: a share of the cores; "
                                        "0: in-process).", task=True, always=True),
    Option("cache_gb", number(0, what="a number of GiB >= 0"), float,
           "Cap of the decoded-image cache per process (default: 1 GiB for small sets, else none).",
           task=True, always=True),
    Option("latency", SWITCH, bool, "Measure the latency before and after in the report (default on).", switch=True,
           default=True),
    Option("export", _named("a runtime name (upop export --format)"),
           help="After the run, export the slim model for this runtime (onnxruntime, tensorrt, ...) and put its "
                "deployment table in the report."),
    Option("precision", one_of(*EXPORT_PRECISIONS),
           help="With --export: fp32 | fp16 | int8 | int8-dynamic | auto (the fastest within --max-drop)."),
    Option("max_drop", number(0, what="a number of points >= 0"), float,
           "With --export --precision int8/auto: metric points allowed below FP32 on val (default 1)."),
    Option("calibration_size", at_least(1), int, "With --export --precision int8/auto: train items to calibrate on "
                                                 "(default 128)."),
    Option("weight_decay", number(0), float, "AdamW weight decay of the search and the retrain (default 0.05).",
           into=("search.weight_decay", "retrain.weight_decay")),
    Option("drop_path", Rule("a number in [0, 1)", lambda v: is_num(v) and 0 <= v < 1), float,
           "Stochastic depth of the last block, linear from 0 at the first, in the search and the retrain (ViT/DeiT; "
           "default 0, the DeiT recipe 0.1).", into=("search.drop_path", "retrain.drop_path")),
    Option("augment", one_of("none", "default"), help="Training augmentation: default (the family's reference; the "
                                                      "demos: none) | none.", task=True, always=True,
           default="default"),
    Option("recipe", _named("a recipe name (upop recipes list) or none"),
           help="Reference hyperparameters (upop recipes list); default: chosen from the data's annotation files; "
                "none: no recipe."),
    Option("cost_weights", one_of(*COST_WEIGHTS),
           help="What a unit costs when the search fills the ratio: true (its parameters, default) | paper (the "
                "reference's attention:MLP weights).", into=("search.cost_weights",)),
    Option("distill", one_of(*DISTILL_MODES),
           help="Learn from a frozen teacher: off (default) | logits (KL) | features (hidden states) | both.",
           into=("distill.mode",)),
    Option("distill_weight", number(0), float, "Weight of the distillation terms (default 1).",
           into=("distill.weight",)),
    Option("distill_temperature", number(0, strict=True), float, "Temperature of the logit KL (default 1).",
           into=("distill.temperature",)),
    Option("distill_search", SWITCH, bool, "Distil during the search too, not only the retrain (default off).",
           switch=True, into=("distill.search",)),
    Option("teacher", _named("a model name or folder"),
           help="Teacher model of the same family and task (default: the unpruned input model).",
           into=("distill.teacher",)),
)


#: Options that tasks declare (``Task.task_options``), added as the tasks register (``upop.tasks``).
_TASK_OPTIONS: dict[str, Option] = {}


def add_task_options(options: Iterable[Option]) -> None:
    """A task's own options join the table; one name declared twice must mean the same option."""
    for opt in options:
        if _TASK_OPTIONS.setdefault(opt.name, opt) != opt:
            raise ConfigError(f"task option {opt.name!r} is declared twice, differently")


def task_option(name: str) -> Option | None:
    """A registered task's option by name (None when no task declares it)."""
    return _TASK_OPTIONS.get(name)


def scoring_names() -> list[str]:
    """The task options that change how a model is scored (``Option.scores``), of the tasks registered so far."""
    return sorted(k for k, o in _TASK_OPTIONS.items() if o.scores)


def compress_options() -> tuple[Option, ...]:
    """The run's options and every registered task's own (each name once; import ``upop.tasks`` first)."""
    own = {o.name for o in RUN_OPTIONS}
    return RUN_OPTIONS + tuple(o for o in _TASK_OPTIONS.values() if o.name not in own)


def by_name(options: Iterable[Option] | None = None) -> dict[str, Option]:
    return {o.name: o for o in (compress_options() if options is None else options)}


def check_values(values: dict[str, Any], label: Callable[[str], str] | None = None) -> None:
    """Every value's rule, from a flag, a TOML file or a recipe: one line naming the option (``label(name)``:
    the flag by default, or the file and key); names the table does not hold are left to the caller."""
    table = by_name()
    for name, value in values.items():
        if name in table:
            table[name].rule.check(label(name) if label else table[name].flag, value)


def task_values(values: dict[str, Any]) -> dict[str, Any]:
    """What the task reads: the input pipeline's options always, a task's own only when set (a task that has no
    use for one never sees it)."""
    return {o.name: values.get(o.name) for o in compress_options()
            if o.task and (o.always or values.get(o.name) is not None)}
