"""Validated, serialisable settings for a compression run.

Every config carries ``config_version`` so that a file written by a newer upop is refused
rather than half-understood.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .options import (  # noqa: F401  (the constants: where the fields are)
    COST_WEIGHTS,
    DEFAULT_CHECKPOINT_EVERY,
    DISTILL_MODES,
    GRANULARITIES,
    RETRAIN_SCHEDULES,
    RUN_OPTIONS,
    SEARCH_LR_SCHEDULES,
    Rule,
    at_least,
    compress_options,
)

CONFIG_VERSION = 1
#: upop: unified + progressive (the method). The other two are the ablation baselines:
#: unified ranking applied once at the end, and uniform per-module pruning by weight magnitude.
SEARCH_METHODS = ("upop", "unified-once", "uniform-magnitude")


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _rule(option: str) -> Rule:
    """The rule of ``upop compress``'s option of that name (``upop.run.options``): one rule for flag and field."""
    return next(o.rule for o in RUN_OPTIONS if o.name == option)


def _check(fields: tuple[tuple[str, str, Any], ...], optional: tuple[str, ...] = ()) -> None:
    """(label in the error, option whose rule applies, value); a value may be None only for ``optional`` options."""
    for label, option, value in fields:
        _rule(option).check(label, value, required=option not in optional)


@dataclass
class SearchConfig:
    """UPop search (docs/method.md). ``steps`` None means one pass over the batches given."""

    ratio: float = 0.5
    granularity: str = "dim"
    epochs: int = 1  # passes over the batches, when ``steps`` is not given
    steps: int | None = None
    update_every: int | None = None  # K; None: about 50 mask updates over the search

    lambda_attn: float = 6.4e-3
    lambda_mlp: float = 2e-4
    lr: float = 1e-5
    lr_schedule: str = "constant"  # one of SEARCH_LR_SCHEDULES
    weight_decay: float = 0.05
    amp: bool = True
    seed: int = 0
    method: str = "upop"
    grad_accum: int = 1  # batches per optimizer step (and per mask-gradient sum)
    max_steps: int | None = None  # cap on the steps (a smoke run of a full-size setup)
    cost_weights: str = "true"  # one of COST_WEIGHTS
    towers: str | None = None  # "vision,language": the towers whose units are searched; None: all
    drop_path: float = 0.0  # stochastic depth at the last block (``upop.training.drop_path``); 0: off

    def validate(self) -> None:
        _check((("towers", "towers", self.towers), ("cost weights", "cost_weights", self.cost_weights),
                ("ratio", "ratio", self.ratio),
                ("search lr schedule", "search_lr_schedule", self.lr_schedule),
                ("granularity", "granularity", self.granularity), ("search epochs", "search_epochs", self.epochs),
                ("update_every", "update_every", self.update_every), ("grad_accum", "grad_accum", self.grad_accum),
                ("max_steps", "max_steps", self.max_steps), ("lambda_attn", "lambda_attn", self.lambda_attn),
                ("lambda_mlp", "lambda_mlp", self.lambda_mlp), ("search lr", "lr", self.lr),
                ("weight_decay", "weight_decay", self.weight_decay), ("drop_path", "drop_path", self.drop_path)),
               optional=("update_every", "max_steps", "towers"))
        if self.method not in SEARCH_METHODS:
            raise ConfigError(f"search method must be one of {', '.join(SEARCH_METHODS)}, got {self.method!r}")
        at_least(1).check("search steps", self.steps)


@dataclass
class RetrainConfig:
    """Retrain of the slim model: AdamW; ``schedule`` warmup-cosine (linear warm-up then cosine to 0, gradient
    clipping) or epoch-cosine (the reference's: no warm-up, no clipping; ``warmup_ratio``, ``max_grad_norm`` unused)."""

    epochs: int = 1
    steps_per_epoch: int | None = None
    lr: float = 1e-5
    weight_decay: float = 0.05
    schedule: str = "warmup-cosine"  # one of RETRAIN_SCHEDULES
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    amp: bool = True
    seed: int = 0
    grad_accum: int = 1  # batches per optimizer step
    max_steps: int | None = None  # cap on the steps over all epochs (a smoke run)
    drop_path: float = 0.0  # stochastic depth at the last block (``upop.training.drop_path``); 0: off

    def validate(self) -> None:
        _check((("grad_accum", "grad_accum", self.grad_accum), ("max_steps", "max_steps", self.max_steps),
                ("retrain epochs", "retrain_epochs", self.epochs), ("retrain lr", "lr", self.lr),
                ("weight_decay", "weight_decay", self.weight_decay), ("drop_path", "drop_path", self.drop_path),
                ("retrain schedule", "retrain_schedule", self.schedule)),
               optional=("max_steps",))
        at_least(1).check("steps_per_epoch", self.steps_per_epoch)
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        _check_positive("max_grad_norm", self.max_grad_norm)




@dataclass
class DistillConfig:
    """Distillation from a frozen teacher (default: the unpruned input model) during the retrain, and during the
    search when ``search`` is true. The loss is the task's plus ``weight`` × the distillation terms."""

    mode: str = "off"  # one of DISTILL_MODES
    weight: float = 1.0
    temperature: float = 1.0  # of the logit KL (scaled by T²)
    #: the search's loss (and so its importance) includes the match with the teacher. Off by default: on demo-vit
    #: (seed 0) it helped a little at 0.75 (logits +1.3, features +0.4 points) and at 0.9 with logits (+0.4), but
    #: features during the search at 0.9 ended 7.5 points below the same run without (10 below plain UPop)
    search: bool = False
    teacher: str | None = None  # a model of the same family and task; None: the unpruned input model

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def validate(self) -> None:
        _check((("distill", "distill", self.mode), ("distill weight", "distill_weight", self.weight),
                ("distill temperature", "distill_temperature", self.temperature),
                ("distill search", "distill_search", self.search), ("teacher", "teacher", self.teacher)),
               optional=("teacher",))
        if self.teacher is not None and not self.enabled:
            raise ConfigError("a teacher is given (--teacher) but distillation is off; add --distill logits|features|both")


@dataclass(init=False)
class CompressConfig:
    """One run of ``upop.compress``: search, slim, retrain.

    ``ratio`` and ``granularity`` are the search's (stored once, in ``search``); they are given here too since they
    are the two settings users set.
    """

    profile: str | None = None
    target_latency_ms: float | None = None  # with a profile: the ratio is chosen to meet it
    search: SearchConfig = field(default_factory=SearchConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    device: str = "auto"
    distill: DistillConfig = field(default_factory=DistillConfig)
    grad_checkpointing: bool = False  # search and retrain recompute activations in the backward
    config_version: int = CONFIG_VERSION

    def __init__(self, ratio: float | None = None, granularity: str | None = None, profile: str | None = None,
                 target_latency_ms: float | None = None, search: SearchConfig | None = None,
                 retrain: RetrainConfig | None = None, device: str = "auto", distill: DistillConfig | None = None,
                 grad_checkpointing: bool = False, config_version: int = CONFIG_VERSION) -> None:
        self.search = search if search is not None else SearchConfig()
        self.retrain = retrain if retrain is not None else RetrainConfig()
        self.distill = distill if distill is not None else DistillConfig()
        self.profile, self.target_latency_ms, self.device = profile, target_latency_ms, device
        self.grad_checkpointing = grad_checkpointing
        self.config_version = config_version
        if ratio is not None:
            self.search.ratio = ratio
        if granularity is not None:
            self.search.granularity = granularity
        self.validate()

    @property
    def ratio(self) -> float:
        return self.search.ratio

    @ratio.setter
    def ratio(self, value: float) -> None:
        self.search.ratio = value

    @property
    def granularity(self) -> str:
        return self.search.granularity

    def validate(self) -> None:
        if self.config_version > CONFIG_VERSION:
            raise ConfigError(
                f"config_version {self.config_version} is newer than this upop understands ({CONFIG_VERSION}); upgrade upop"
            )
        if self.target_latency_ms is not None:
            _check((("target latency", "target_latency", self.target_latency_ms),))
            if self.profile is None:
                raise ConfigError("--target-latency needs a hardware profile (--profile) to predict latency")
        _check((("device", "device", self.device), ("grad checkpointing", "grad_checkpointing", self.grad_checkpointing)))
        self.search.validate()
        self.retrain.validate()
        self.distill.validate()

    def to_dict(self) -> dict[str, Any]:
        """The files' layout: ratio and granularity at the top too (as upop has always written them)."""
        return {**dataclasses.asdict(self), "ratio": self.ratio, "granularity": self.granularity}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CompressConfig":
        if not isinstance(data, dict):
            raise ConfigError("a compress config must be a mapping")
        data = dict(data)
        try:
            search = SearchConfig(**data.pop("search", {}))
            retrain = RetrainConfig(**data.pop("retrain", {}))
            distill = DistillConfig(**data.pop("distill", {}))
            return cls(search=search, retrain=retrain, distill=distill, **data)
        except TypeError as exc:  # unknown or missing keys
            raise ConfigError(f"invalid compress config: {exc}") from None

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> "CompressConfig":
        """The config of ``upop compress``'s option values (``upop.run.options``): each set where its option's
        ``into`` says; a value left unset keeps the dataclass default."""
        nested: dict[str, Any] = {"search": {}, "retrain": {}, "distill": {}}
        for opt in compress_options():
            for path in opt.into if values.get(opt.name) is not None else ():
                head, _, leaf = path.partition(".")
                if leaf:
                    nested[head][leaf] = values[opt.name]
                else:
                    nested[head] = values[opt.name]
        return cls.from_dict(nested)

    @staticmethod
    def option_defaults() -> dict[str, Any]:
        """Each option's default: a run-level option's own, else the dataclass default of the field it sets
        (declared once, there); None ones left out."""
        fields, out = CompressConfig().to_dict(), {}
        for opt in compress_options():
            value = opt.default
            if value is None and opt.into and opt.defaulted:
                value = fields
                for part in opt.into[0].split("."):
                    value = value[part]
            if value is not None:
                out[opt.name] = value
        return out

    @classmethod
    def from_json(cls, text: str) -> "CompressConfig":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"compress config is not valid JSON: {exc}") from None
