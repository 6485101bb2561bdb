"""Unified progressive search (docs/method.md), family-agnostic.

The search sees ``ModuleSpec`` lists, a loss closure and batches. It trains the model
while accumulating the gradient of the loss with respect to every mask ζ, ranks all
units of the whole model in one list (z-scored per structure type), and every K steps
pushes the units above the cumulative-cost threshold toward zero along the cosine
schedule π_t. At the last step π_T = p and the marked units sit at exactly 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..training.distributed import current, mask_digest
from ..training.loop import CheckpointFn, LoopSettings, LossFn, Phase, ProgressFn, TrainLoop
from ..run.config import SearchConfig
from ..errors import ConfigError
from .kinds import ATTENTION, MLP
from .masks import MaskSet
from .units import ModuleSpec

__all__ = ["LossFn", "ProgressFn", "SearchResult", "search", "pi_schedule"]


def pi_schedule(step: int, total_steps: int, ratio: float) -> float:
    """π_t = p · sqrt((1 − cos(π·t/T)) / 2); exactly p at t = T."""
    if step >= total_steps:
        return float(ratio)
    return float(ratio * math.sqrt((1.0 - math.cos(math.pi * step / total_steps)) / 2.0))


@dataclass
class UnitTable:
    """Every unit of the model, flattened in module order."""

    specs: list[ModuleSpec]
    granularity: str
    module_of_unit: torch.Tensor  # long [N]
    cost: torch.Tensor  # float64 [N]
    is_attn: torch.Tensor  # bool [N]
    offsets: list[int]  # start of each module's units

    @classmethod
    def build(
        cls,
        model: nn.Module,
        specs: Sequence[ModuleSpec],
        granularity: str,
        unit_costs: Mapping[str, Sequence[float] | float] | None = None,
    ) -> "UnitTable":
        mod, cost, attn, offsets = [], [], [], []
        start = 0
        for i, spec in enumerate(specs):
            n = spec.num_units(granularity)
            offsets.append(start)
            start += n
            mod.extend([i] * n)
            attn.extend([spec.group == ATTENTION] * n)
            if unit_costs is not None and spec.name in unit_costs:
                c = unit_costs[spec.name]
                cost.extend([float(c)] * n if isinstance(c, (int, float)) else [float(x) for x in c])
            else:
                cost.extend([spec.unit_cost(model, granularity)] * n)
        if len(cost) != start:
            raise ValueError("unit_costs gave a cost list whose length differs from the module's unit count")
        return cls(
            specs=list(specs),
            granularity=granularity,
            module_of_unit=torch.tensor(mod, dtype=torch.long),
            cost=torch.tensor(cost, dtype=torch.float64),
            is_attn=torch.tensor(attn, dtype=torch.bool),
            offsets=offsets,
        )

    @property
    def total_cost(self) -> float:
        return float(self.cost.sum())

    def max_share(self) -> float:
        """The largest share that can be removed while every module keeps its cheapest unit."""
        keep = 0.0
        for i, spec in enumerate(self.specs):
            s = self.offsets[i]
            keep += float(self.cost[s : s + spec.num_units(self.granularity)].min())
        return 1.0 - keep / self.total_cost

    def units_per_module(self) -> torch.Tensor:
        return torch.bincount(self.module_of_unit, minlength=len(self.specs))


def _zscore(x: torch.Tensor) -> torch.Tensor:
    if x.numel() < 2:
        return torch.zeros_like(x)
    std = x.std()
    if not torch.isfinite(std) or std <= 0:
        return torch.zeros_like(x)
    return (x - x.mean()) / std


def unified_scores(importance: torch.Tensor, table: UnitTable) -> torch.Tensor:
    """Z-score attention units together and MLP units together, over all towers."""
    imp = importance.to(torch.float64)
    scores = torch.empty_like(imp)
    for sel in (table.is_attn, ~table.is_attn):
        if sel.any():
            scores[sel] = _zscore(imp[sel])
    return scores


def select_units(scores: torch.Tensor, table: UnitTable, share: float) -> torch.Tensor:
    """Mark units from the top of the ranking until their cost reaches ``share`` of the total.

    A unit whose removal would leave its module empty is skipped: every module keeps at
    least one unit (an empty attention breaks every ``view(..., -1, head_dim)`` reshape).
    Returns a bool mask over units.
    """
    n = scores.numel()
    marked = torch.zeros(n, dtype=torch.bool)
    target = share * table.total_cost
    if target <= 0 or n == 0:
        return marked
    # Stable sort: ties keep module order, so the result is deterministic.
    order = torch.sort(scores, descending=True, stable=True).indices
    csum = torch.cumsum(table.cost[order], 0)
    reach = int(torch.searchsorted(csum, torch.tensor([target], dtype=torch.float64)).item())
    cand = order[: min(reach + 1, n)]
    marked[cand] = True
    per_module = torch.bincount(table.module_of_unit[marked], minlength=len(table.specs))
    if not bool((per_module >= table.units_per_module()).any()):
        return marked
    # Some module would be emptied: walk the ranking one unit at a time.
    marked.zero_()
    left = table.units_per_module().tolist()
    acc = 0.0
    cost = table.cost.tolist()
    mods = table.module_of_unit.tolist()
    for u in order.tolist():
        if acc >= target:
            break
        if left[mods[u]] <= 1:
            continue
        marked[u] = True
        left[mods[u]] -= 1
        acc += cost[u]
    return marked


def magnitude_marks(model: nn.Module, table: UnitTable, ratio: float) -> torch.Tensor:
    """Uniform baseline: every module loses ``ratio`` of its units, those with the smallest L1 weight
    (their q/k/v rows and out-projection columns, or fc1 row and fc2 column)."""
    marked = torch.zeros(table.cost.numel(), dtype=torch.bool)
    for i, spec in enumerate(table.specs):
        n = spec.num_units(table.granularity)
        score = spec.magnitude(model, table.granularity)
        k = min(n - 1, int(round(ratio * n)))
        if k > 0:
            drop = torch.argsort(score, stable=True)[:k]
            marked[table.offsets[i] + drop] = True
    return marked


def select_units_aligned(scores: torch.Tensor, table: UnitTable, share: float,
                         allowed: Sequence[Sequence[int]]) -> torch.Tensor:
    """Like ``select_units``, but every module keeps one of its ``allowed`` sizes.

    The ranking is walked in aligned steps: a module shrinks from one allowed size to the next
    smaller one by dropping its highest-ranked remaining units, and the step whose units rank
    highest on average goes first, until the removed cost reaches the share. The budget is thus
    met after rounding, within one aligned step.
    """
    import heapq

    marked = torch.zeros(scores.numel(), dtype=torch.bool)
    target = share * table.total_cost
    if target <= 0:
        return marked
    orders, sizes, kept = [], [], []
    heap: list[tuple[float, int, int]] = []
    for i, spec in enumerate(table.specs):
        n = spec.num_units(table.granularity)
        s = table.offsets[i]
        local = scores[s : s + n]
        orders.append((torch.sort(local, descending=True, stable=True).indices + s).tolist())
        sz = sorted({k for k in allowed[i] if 1 <= k <= n} | {n}, reverse=True)
        sizes.append(sz)
        kept.append(0)  # index into sz

    def push(i: int) -> None:
        j = kept[i]
        if j + 1 < len(sizes[i]):
            n = len(orders[i])
            units = orders[i][n - sizes[i][j] : n - sizes[i][j + 1]]
            heapq.heappush(heap, (-float(scores[units].mean()), i, j))

    for i in range(len(table.specs)):
        push(i)
    removed = 0.0
    while heap and removed < target:
        _neg, i, j = heapq.heappop(heap)
        n = len(orders[i])
        units = orders[i][n - sizes[i][j] : n - sizes[i][j + 1]]
        marked[units] = True
        removed += float(table.cost[units].sum())
        kept[i] = j + 1
        push(i)
    return marked


@dataclass
class SearchResult:
    granularity: str
    ratio: float
    kept: dict[str, list[int]]
    zeta: dict[str, list[float]]
    importance: dict[str, list[float]]
    removed_share: float
    max_share: float  # below the ratio when keeping one unit per module binds (tiny models, head granularity)
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    skipped_steps: int = 0  # steps whose mask gradient was not finite (fp16 overflow): left out of the importance
    throughput: dict[str, float] = field(default_factory=dict)  # images/s, step time, data-wait share


def _split(values: torch.Tensor, table: UnitTable) -> dict[str, list[float]]:
    out = {}
    for i, spec in enumerate(table.specs):
        s = table.offsets[i]
        out[spec.name] = values[s : s + spec.num_units(table.granularity)].tolist()
    return out


class SearchPhase(Phase):
    """The search's hooks on the training loop: the sparsity term, the mask gradients (the
    importance), and every ``every`` steps the move of the top-ranked units along π_t.

    Mask gradients are summed on the device each step and reduced across ranks (one
    all-reduce) only when the masks move or a state is taken; a step whose mask gradient is not
    finite (an fp16 overflow) adds nothing to the importance and is counted.
    """

    logs_task_loss = True

    def __init__(self, model: nn.Module, specs: Sequence[ModuleSpec], config: SearchConfig, total: int,
                 unit_costs: Mapping[str, Sequence[float] | float] | None,
                 allowed_sizes: Mapping[str, Sequence[int]] | None, resume: dict[str, Any] | None):
        self.model, self.config, self.total = model, config, total
        self.every = config.update_every or max(1, total // 50)
        self.table = UnitTable.build(model, specs, config.granularity, unit_costs)
        self.masks = MaskSet(model, specs, config.granularity)
        self.allowed = [list(allowed_sizes[s.name]) for s in specs] if allowed_sizes is not None else None
        n = self.table.cost.numel()
        self.importance = torch.zeros(n, dtype=torch.float64)
        self.marked = torch.zeros(n, dtype=torch.bool)
        self.pi, self.skipped = 0.0, 0
        device = next(model.parameters()).device
        self._pending = torch.zeros(n + 1, dtype=torch.float64, device=device)  # gradient sums, skipped steps
        if resume is not None:
            self.importance, self.marked = resume["importance"].clone(), resume["marked"].clone()
            self.pi, self.skipped = float(resume["pi"]), int(resume.get("skipped", 0))
            with torch.no_grad():
                for spec, z in self.masks.items():
                    z.copy_(resume["zeta"][spec.name])

    def loss(self, task_loss: torch.Tensor) -> torch.Tensor:
        c = self.config
        return task_loss.float() + c.lambda_attn * self.masks.sparsity(ATTENTION) + c.lambda_mlp * self.masks.sparsity(MLP)

    def after_backward(self, scaler: torch.amp.GradScaler | None) -> None:
        grads = []
        for _spec, z in self.masks.items():
            grads.append(z.grad if z.grad is not None else torch.zeros_like(z))
            z.grad = None
        g = torch.cat(grads).to(torch.float64)
        if scaler is not None:
            # The scale as a device tensor: ``get_scale()`` would wait for the GPU every step.
            scale = scaler._get_scale_async() if hasattr(scaler, "_get_scale_async") else scaler.get_scale()
            g = g / scale
        finite = torch.isfinite(g).all()
        dist = current()
        if dist.enabled and scaler is not None:
            # fp16 overflows differ between ranks: a step counts only where every rank's gradient is finite,
            # so every rank adds (and skips) the same steps.
            finite = -dist.all_reduce_max(-finite.to(torch.float32)) > 0  # the minimum over the ranks
        self._pending[:-1] += torch.where(finite, g, torch.zeros_like(g))
        self._pending[-1] += (~finite).to(torch.float64)

    def sync(self) -> None:
        """Add the ranks' mean of the pending gradient sums to the importance."""
        dist = current()
        reduced = dist.all_reduce_mean(self._pending).cpu()
        self.importance += reduced[:-1]
        self.skipped += int(round(float(reduced[-1])))  # the ranks' mean: under fp16 they skip the same steps
        self._pending.zero_()

    def after_step(self, step: int) -> dict[str, float]:
        if (self.config.method == "upop" and step % self.every == 0) or step == self.total:
            self.sync()
            self._move_masks(step)
        return {"pi": self.pi}

    def _move_masks(self, step: int) -> None:
        c, table = self.config, self.table
        self.pi = pi_schedule(step, self.total, c.ratio)
        if c.method == "uniform-magnitude":
            self.marked = magnitude_marks(self.model, table, c.ratio)
        elif self.allowed is not None:
            self.marked = select_units_aligned(unified_scores(self.importance, table), table, self.pi, self.allowed)
        else:
            self.marked = select_units(unified_scores(self.importance, table), table, self.pi)
        value = 1.0 - self.pi / c.ratio
        with torch.no_grad():
            for i, (_spec, z) in enumerate(self.masks.items()):
                s = table.offsets[i]
                sel = self.marked[s : s + z.numel()].to(z.device)
                z.fill_(1.0)
                z[sel] = value
        current().check_same(mask_digest(self.marked, value), f"search step {step}")

    def state(self) -> dict[str, Any]:
        return {"importance": self.importance.clone(), "marked": self.marked.clone(), "pi": self.pi,
                "zeta": {s.name: z.detach().cpu().clone() for s, z in self.masks.items()}, "total": self.total,
                "skipped": self.skipped}

    def result(self, history: list[dict[str, float]]) -> SearchResult:
        table, g = self.table, self.config.granularity
        kept = {}
        for i, spec in enumerate(table.specs):
            s = table.offsets[i]
            kept[spec.name] = [j for j in range(spec.num_units(g)) if not bool(self.marked[s + j])]
        return SearchResult(granularity=g, ratio=self.config.ratio, kept=kept, zeta=self.masks.values(),
                            importance=_split(self.importance, table),
                            removed_share=float(table.cost[self.marked].sum()) / table.total_cost,
                            max_share=table.max_share(), steps=self.total, history=history,
                            skipped_steps=self.skipped)


def paper_unit_costs(specs: Sequence[ModuleSpec], granularity: str, attn_weight: float | None,
                     family: str = "this model") -> dict[str, float]:
    """The reference's cost weighting (``cost_weights = "paper"``): every MLP neuron weighs 1 and every attention
    dimension ``attn_weight`` (BLIP and CLIP: 36, "12 heads × q, k, v"; DeiT-S: 12), whatever the layer's
    true parameters; a head unit weighs its ``head_dim`` dimensions."""
    if attn_weight is None:
        raise ConfigError(f"cost weights 'paper': the reference has no attention:MLP weighting for {family}")
    return {s.name: s.paper_cost(attn_weight, granularity) for s in specs}


def _paper_costs_for(model: nn.Module, specs: Sequence[ModuleSpec], config: SearchConfig,
                     unit_costs: Mapping[str, Sequence[float] | float] | None) -> dict[str, float]:
    from ..adapters import get_adapter

    if unit_costs is not None:
        raise ConfigError("cost weights 'paper' weigh units as the reference does; a hardware profile weighs them by "
                          "latency: use one of the two")
    adapter = get_adapter(model)
    return paper_unit_costs(specs, config.granularity, adapter.paper_attn_weight, adapter.family)


def search_steps(config: SearchConfig, batches: Iterable[Any]) -> int:
    """Optimizer steps of the search: ``steps``, or ``epochs`` passes of ``grad_accum`` batches per step."""
    if config.steps is not None:
        total = config.steps
    else:
        total = config.epochs * (len(batches) // config.grad_accum)  # type: ignore[arg-type]
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    if total < 1:
        raise ValueError("the search needs at least one step")
    return total


def search(
    model: nn.Module,
    specs: Sequence[ModuleSpec],
    loss_fn: LossFn,
    batches: Iterable[Any],
    config: SearchConfig,
    *,
    unit_costs: Mapping[str, Sequence[float] | float] | None = None,
    progress: ProgressFn | None = None,
    resume: dict[str, Any] | None = None,
    on_interrupt: Callable[[dict[str, Any]], None] | None = None,
    allowed_sizes: Mapping[str, Sequence[int]] | None = None,
    checkpoint: CheckpointFn | None = None,
    checkpoint_every: int = 0,
) -> SearchResult:
    """Run UPop's search on ``model`` (trained in place) and return the units to keep.

    On Ctrl-C, ``on_interrupt`` receives the state after the last finished step (weights,
    optimizer, accumulated importance, marks, π, history, RNG); passing that state back as
    ``resume`` continues the run, π schedule included, where it stopped. ``allowed_sizes`` (kept
    unit counts per module, from a hardware profile) makes every selection an aligned one.
    ``checkpoint`` is called every ``checkpoint_every`` steps with a function returning that state
    (called on every rank; it decides who builds and writes the state).

    Under torchrun the model runs through DDP, the mask gradients are averaged over the ranks (so
    every rank accumulates the same importance), and a hash of the masks is compared across ranks
    at every mask update.
    """
    config.validate()
    if not specs:
        raise ValueError("the model has no compressible modules")
    if config.cost_weights == "paper":
        unit_costs = _paper_costs_for(model, specs, config, unit_costs)
    total = search_steps(config, batches)
    settings = LoopSettings(total=total, lr=config.lr, weight_decay=config.weight_decay, amp=config.amp,
                            seed=config.seed, schedule=search_lr_schedule(config, total),
                            grad_accum=config.grad_accum, checkpoint_every=checkpoint_every)
    phase = SearchPhase(model, specs, config, total, unit_costs, allowed_sizes, resume)
    loop = TrainLoop(model, loss_fn, batches, settings, phase, progress=progress, resume=resume)
    try:
        history = loop.run(checkpoint=checkpoint, on_interrupt=on_interrupt)
    finally:
        phase.masks.remove()
    result = phase.result(history)
    result.throughput = loop.throughput()
    return result


def search_lr_schedule(config: SearchConfig, total: int) -> Callable[[int], float]:
    """The search's learning-rate factor after ``s`` steps: 1 throughout (``constant``, the default), or cosine
    from 1 to 0 over the search (``cosine``)."""
    if config.lr_schedule == "constant":
        return lambda _s: 1.0
    return lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
