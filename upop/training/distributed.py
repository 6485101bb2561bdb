"""Running under torchrun: the process group, DDP, and the few collectives upop needs.

upop does not launch or coordinate processes itself: ``torchrun`` (torch.distributed.run) starts
them and sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; this module joins that group (NCCL on
GPUs, gloo on CPUs) and gives the library one object, ``current()``, to ask who it is. Outside
torchrun every call here is a no-op on a world of one, so single-process code paths are unchanged.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..errors import MaskDivergenceError, PeerLostError  # noqa: F401  (defined with every error, raised and re-exported here)




@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    grouped: bool = False  # in a process group (torchrun), even of one: its collectives run through the backend

    @property
    def enabled(self) -> bool:
        return self.world > 1 or self.grouped

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _dev(self) -> torch.device:
        # NCCL moves only CUDA tensors; gloo only CPU ones.
        if self.enabled and torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return t
        buf = t.to(self._dev())
        torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
        return (buf / self.world).to(t.device, t.dtype)

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return t
        buf = t.to(self._dev())
        torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.MAX)
        return buf.to(t.device)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def cat(self, t: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """Concatenate each rank's rows (any count per rank) in rank order, on every rank, on ``device``
        (default: where ``t`` is). A rank with nothing passes an empty tensor of any shape.

        The rows travel as tensors (one all-gather into one buffer, on the GPU under NCCL), not as pickles
        through the host, and the buffer becomes the result in place: the peak is the result plus this
        rank's share."""
        if not self.enabled:
            # Moved as asked even alone: a caller that indexes a host tensor with the rows must get host rows.
            return t if device is None else t.to(device)
        # Each rank's row count, row shape and dtype: a few numbers (an empty rank does not know the shape).
        meta = [m for m in self.gather((t.shape[0] if t.numel() else 0, tuple(t.shape[1:]), t.dtype))]
        counts = [m[0] for m in meta]
        shape, dtype = next(((m[1], m[2]) for m in meta if m[0]), (tuple(t.shape[1:]), t.dtype))
        out_dev = torch.device(device) if device is not None else t.device
        per = max(counts)
        if per == 0:
            return torch.empty(0, *shape, dtype=dtype, device=out_dev)
        buf = torch.empty(self.world * per, *shape, dtype=dtype, device=self._dev())
        mine = torch.zeros(per, *shape, dtype=dtype, device=self._dev())
        if counts[self.rank]:
            mine[: counts[self.rank]] = t.detach()
        _all_gather_single(buf, mine)
        del mine
        return _compact(buf, counts, per).to(out_dev)

    def cat_same(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` in rank order, where every rank passes the same shape and dtype (a training
        step's batch: see ``Batches.shard``); no gradient. Unlike ``cat`` it asks nothing of the other ranks
        first, so the host never waits on the device."""
        if not self.enabled:
            return t
        buf = torch.empty(self.world * t.shape[0], *t.shape[1:], dtype=t.dtype, device=self._dev())
        _all_gather_single(buf, t.detach().to(self._dev()).contiguous())
        return buf.to(t.device)

    def cat_with_grad(self, t: torch.Tensor, same_rows: bool = False) -> tuple[torch.Tensor, int]:
        """Every rank's rows of ``t`` in rank order, and where this rank's rows start in them. Unlike ``cat``,
        the gradient flows back: each rank receives the sum over the ranks of the gradients that reach its
        own rows, so the ranks' losses over the gathered rows average (as DDP does) to the whole batch's.
        The rows must have the same shape on every rank; their counts may differ, unless ``same_rows``
        promises they do not (a training step's batch: see ``Batches.shard``), which spares the exchange of
        the counts and with it a wait of the host on the device."""
        if not self.enabled:
            return t, 0
        counts = [t.shape[0]] * self.world if same_rows else self._counts(t.shape[0], t.device)
        return _GatherRows.apply(t, self, counts), sum(counts[: self.rank])

    def cat_padded(self, t: torch.Tensor, value: int = 0, width: int | None = None,
                   same_rows: bool = False) -> torch.Tensor:
        """Every rank's rows of a 2-D tensor (token ids, attention masks) in rank order, each padded on the
        right with ``value`` to ``width`` (a bound every rank knows, e.g. the tokenizer's maximum length), else
        to the longest row length of any rank (asked of the ranks: the host waits); no gradient. ``same_rows``
        as in ``cat_with_grad``."""
        if not self.enabled:
            return t
        if width is None:
            width = int(self.all_reduce_max(torch.tensor([float(t.shape[1])])).item())
        if t.shape[1] > width:
            raise ConfigError(f"rows of {t.shape[1]} tokens do not fit the width {width} they are gathered at")
        padded = torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)
        return self.cat_same(padded) if same_rows else self.cat(padded)

    def _counts(self, n: int, device: torch.device) -> list[int]:
        buf = torch.zeros(self.world, dtype=torch.long, device=self._dev())
        _all_gather_single(buf, torch.tensor([n], dtype=torch.long, device=self._dev()))
        return buf.tolist()

    def concat(self, items: list[Any]) -> list[Any]:
        if not self.enabled:
            return items
        return [x for part in self.gather(items) for x in part]

    def shard(self, n: int) -> range:
        """This rank's contiguous share of ``n`` items (so gathering in rank order keeps the order)."""
        per, extra = divmod(n, self.world)
        start = self.rank * per + min(self.rank, extra)
        return range(start, start + per + (1 if self.rank < extra else 0))

    def share(self, items: list[Any]) -> list[Any]:
        """This rank's items of ``items`` (see ``shard``)."""
        return [items[i] for i in self.shard(len(items))]

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def check_same(self, digest: str, what: str) -> None:
        """Raise on every rank if the ranks' digests differ."""
        if not self.enabled:
            return
        seen = self.gather(digest)
        if len(set(seen)) > 1:
            groups: dict[str, list[int]] = {}
            for r, d in enumerate(seen):
                groups.setdefault(d, []).append(r)
            parts = "; ".join(f"ranks {', '.join(map(str, rs))}: {d[:12]}" for d, rs in groups.items())
            raise MaskDivergenceError(f"{what}: the masks differ across ranks ({parts}); every rank must rank the same "
                                      "reduced importance — run the same upop, torch and data on every node")


def _all_gather_single(out: torch.Tensor, mine: torch.Tensor) -> None:
    """All-gather straight into ``out`` (``all_gather`` with a list of outputs stages them in a flat copy)."""
    gather = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor
    gather(out, mine)


class _GatherRows(torch.autograd.Function):
    """All-gather of rows whose backward sums the ranks' gradients and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, dist: "Dist", counts: list[int]) -> torch.Tensor:  # type: ignore[override]
        ctx.dist, ctx.counts, ctx.device = dist, counts, t.device
        per = max(counts)
        dev = dist._dev()
        mine = torch.zeros(per, *t.shape[1:], dtype=t.dtype, device=dev)
        mine[: t.shape[0]] = t.detach()
        buf = torch.empty(dist.world * per, *t.shape[1:], dtype=t.dtype, device=dev)
        _all_gather_single(buf, mine)
        return _compact(buf, counts, per).to(t.device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        dist, counts = ctx.dist, ctx.counts
        total = grad.to(dist._dev(), copy=True).contiguous()  # reduced in place: not autograd's own buffer
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
        start = sum(counts[: dist.rank])
        return total[start : start + counts[dist.rank]].to(ctx.device), None, None


def _compact(buf: torch.Tensor, counts: list[int], per: int) -> torch.Tensor:
    """Rank r's ``counts[r]`` rows, found at ``r * per``, moved down to follow the earlier ranks' rows, in
    place. Each move copies blocks no longer than its shift, so a block never overlaps its destination."""
    dst = 0
    for r, n in enumerate(counts):
        src, shift = r * per, r * per - dst
        for i in range(0, n if shift else 0, max(shift, 1)):
            k = min(shift, n - i)
            buf[dst + i : dst + i + k] = buf[src + i : src + i + k]
        dst += n
    return buf[:dst]


def mask_digest(marked: torch.Tensor, value: float) -> str:
    """A hash of the mask state: which units are pushed down, and the value they hold."""
    h = hashlib.sha256(marked.to(torch.uint8).cpu().numpy().tobytes())
    h.update(repr(float(value)).encode())
    return h.hexdigest()


def current() -> Dist:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return Dist()
    return Dist(rank=torch.distributed.get_rank(), world=torch.distributed.get_world_size(),
                local_rank=int(os.environ.get("LOCAL_RANK", "0")), grouped=True)


def env_rank() -> int:
    """This process's global rank as torchrun set it (0 outside torchrun); known before the group is joined."""
    return int(os.environ.get("RANK", "0"))


#: what torchrun sets for each worker to find the group
_RENDEZVOUS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """torchrun started this process: several workers, or one that its elastic agent named (a run id and the
    rendezvous; a variable merely inherited does not count), whose group of one runs every collective through
    the backend, NCCL on a GPU: the check a one-GPU machine can make."""
    return has_peers() or ("TORCHELASTIC_RUN_ID" in os.environ and all(k in os.environ for k in _RENDEZVOUS))


def has_peers() -> bool:
    """Other workers share this run (a failed collective may mean one of them is gone)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def restart_count() -> int:
    """How many times torchrun's elastic agent restarted this worker group (0 on the first start)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def init(device: str) -> Dist:
    """Join torchrun's process group when launched by it; a world of one otherwise.

    The backend follows the device: NCCL for CUDA, gloo for CPU. Each rank takes the GPU numbered
    by its LOCAL_RANK.
    """
    if not launched_by_torchrun():
        return Dist()
    if torch.distributed.is_initialized():
        return current()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise ConfigError("device cuda was asked for, but no CUDA GPU is available (use --device cpu or auto)")
        local = _gpu(device, local)
        if local >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local} has no GPU: this node has {torch.cuda.device_count()}; "
                              "lower --nproc-per-node")
        torch.cuda.set_device(local)
    backend, timeout = ("nccl" if cuda else "gloo"), timedelta(minutes=30)
    # The rank's GPU named to the group: NCCL's barrier otherwise guesses it (and says so on every rank)
    bind = {"device_id": torch.device("cuda", local)} if cuda else {}
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # The agent's store outlives a restart and still holds the failed attempt's addresses: a
        # restarted rank could read a dead peer's port before the new one is written. Each attempt
        # gets keys of its own.
        store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                           int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
        torch.distributed.init_process_group(
            backend=backend, store=torch.distributed.PrefixStore(f"upop/attempt_{restart_count()}", store),
            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout, **bind)
    else:
        torch.distributed.init_process_group(backend=backend, timeout=timeout, **bind)
    return current()


def _gpu(device: str, local: int) -> int:
    """The GPU a torchrun worker takes: its LOCAL_RANK's, or the one named (``cuda:1``) when it is alone."""
    named = torch.device(device).index if device.startswith("cuda:") else None
    return named if named is not None and not has_peers() else local


def device_for(dist: Dist, device: torch.device) -> torch.device:
    """Under torchrun, rank r uses GPU LOCAL_RANK rather than whichever one was named (a worker alone keeps
    the one it named)."""
    if dist.enabled and device.type == "cuda" and not (dist.world == 1 and device.index is not None):
        return torch.device("cuda", dist.local_rank)
    return device


class _LossModule(nn.Module):
    """Makes ``loss_fn(model, batch)`` a module forward, so DDP sees (and syncs) every call."""

    def __init__(self, model: nn.Module, loss_fn: Any):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def _graph_params(loss: torch.Tensor) -> set[int]:
    """Ids of the leaf tensors the loss's autograd graph reaches."""
    seen, ids, stack = set(), set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None:
            ids.add(id(var))
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return ids


class _DDPRunner:
    """``batch -> loss`` through DistributedDataParallel, which averages the gradients.

    DDP must be told whether the loss leaves some parameters unused (BLIP retrieval never runs
    the text pooler; a classifier uses everything), and guessing wrong costs an error or a graph
    walk each step. So the first batch is run once outside DDP to find out, then again through it.
    """

    def __init__(self, model: nn.Module, loss_fn: Any, dist: Dist):
        self.model, self.loss_fn, self.dist = model, loss_fn, dist
        self.ddp: nn.Module | None = None

    def __call__(self, batch: Any) -> torch.Tensor:
        if self.ddp is None:
            dev = next(self.model.parameters()).device
            # The probe must not advance the RNG (dropout): a resumed run probes at another step than a fresh one.
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                probe = self.loss_fn(self.model, batch)
                used = _graph_params(probe)
                del probe
            unused = any(id(p) not in used for p in self.model.parameters() if p.requires_grad)
            unused = bool(self.dist.all_reduce_max(torch.tensor([float(unused)])).item())
            # No device_ids: DDP would copy the batch to the GPU itself, so the loss would meet device tensors
            # where it reads host values (a batch's image ids) and the host would wait; the loss moves it.
            self.ddp = nn.parallel.DistributedDataParallel(_LossModule(self.model, self.loss_fn), device_ids=None,
                                                           find_unused_parameters=unused)
        return self.ddp(batch)


def loss_runner(model: nn.Module, loss_fn: Any) -> Any:
    """``batch -> loss``; under torchrun through DDP (see ``_DDPRunner``)."""
    dist = current()
    if not dist.enabled:
        return lambda batch: loss_fn(model, batch)
    return _DDPRunner(model, loss_fn, dist)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any] | torch.Tensor) -> None:
    if isinstance(state, torch.Tensor):
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


