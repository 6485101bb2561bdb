"""The CUDA / NCCL paths of upop, exercised on a CPU.

What breaks only on a GPU is mostly of two kinds, and both can be seen here:

- a tensor left on the wrong device: ``observe_devices`` checks that every collective of ``Dist``
  returns its rows where they were asked for (or where they came from), and a test may point the place
  where results are assembled at the ``meta`` device, so a row that does not follow shows;
- the host waiting on the GPU: ``SyncCounter`` counts the calls that read a value back from the device
  (``Tensor.item`` / ``tolist`` / ``__bool__`` / ``__int__`` / ``__float__``, and ``all_gather_object``,
  which goes through the host) with where they were made.

``run_ranks`` runs a function in a world of one (in this process) or of several processes joined by gloo,
and returns what each rank returned.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from upop.training.distributed import Dist

READS = ("item", "tolist", "__bool__", "__int__", "__float__")


class SyncCounter:
    """Counts reads of device values by the host: ``calls`` (made in upop's code, each with its line) and
    ``library`` (made inside a library upop calls, e.g. transformers' check whether a padding mask can be
    dropped). Reads by ``torch.optim`` are not counted: its step counters live on the host."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.library: list[str] = []
        self._saved: list[tuple[Any, str, Any]] = []

    def _wrap(self, owner: Any, name: str, what: str) -> None:
        real = getattr(owner, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            origin, where = _caller()
            if origin == "upop":
                self.calls.append(f"{what} at {where}")
            elif origin != "torch.optim":
                self.library.append(f"{what} at {where}")
            return real(*args, **kwargs)

        self._saved.append((owner, name, real))
        setattr(owner, name, counted)

    def __enter__(self) -> "SyncCounter":
        for name in READS:
            self._wrap(torch.Tensor, name, f"Tensor.{name}")
        self._wrap(torch.distributed, "all_gather_object", "all_gather_object")
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, name, real in reversed(self._saved):
            setattr(owner, name, real)
        self._saved.clear()

    def mark(self) -> tuple[int, int]:
        return len(self.calls), len(self.library)


def _caller() -> tuple[str, str]:
    """Who read: ``upop``, ``torch.optim`` or another library, and the line (the frame that called the read)."""
    frame = traceback.extract_stack()[-3]
    path = frame.filename.replace("\\", "/")
    where = f"{Path(path).name}:{frame.lineno}"
    if "/torch/optim/" in path:
        return "torch.optim", where
    if "site-packages/" in path or "/torch/" in path:
        return path.split("site-packages/")[-1].split("/")[0], f"{path.split('site-packages/')[-1]}:{frame.lineno}"
    return "upop", where


@contextlib.contextmanager
def observe_devices() -> Iterator[list[tuple[str, str, str]]]:
    """Every ``Dist`` collective checked: its result must lie on the device asked for (``cat``'s ``device``),
    else on its input's. Yields the calls seen: (method, input device, result device)."""
    seen: list[tuple[str, str, str]] = []
    saved = {name: getattr(Dist, name) for name in ("cat", "cat_same", "cat_with_grad", "cat_padded",
                                                    "all_reduce_mean", "all_reduce_max")}

    def checked(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(self: Dist, t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            out = real(self, t, *args, **kwargs)
            rows = out[0] if isinstance(out, tuple) else out
            asked = kwargs.get("device", args[0] if name == "cat" and args else None)
            want = torch.device(asked) if asked is not None else t.device
            seen.append((name, str(t.device), str(rows.device)))
            assert rows.device == want, f"Dist.{name} returned rows on {rows.device}, not {want}"
            return out

        return call

    for name, real in saved.items():
        setattr(Dist, name, checked(name, real))
    try:
        yield seen
    finally:
        for name, real in saved.items():
            setattr(Dist, name, real)


def _rank_main(rank: int, world: int, folder: str, fn: Callable[..., Any], args: tuple) -> None:
    torch.set_num_threads(1)
    # A short timeout: a rank left out of a collective fails the test instead of hanging it.
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                                         world_size=world, timeout=timedelta(seconds=60))
    try:
        out = fn(*args)
    finally:
        torch.distributed.destroy_process_group()
    torch.save(out, f"{folder}/rank{rank}.pt")


def run_ranks(fn: Callable[..., Any], folder: Path, world: int, *args: Any) -> list[Any]:
    """``fn(*args)`` on each of ``world`` ranks (world 1: in this process, no process group), its results
    in rank order. ``fn`` must be importable (a module-level function) for the spawned processes."""
    if world == 1:
        return [fn(*args)]
    folder.mkdir(parents=True, exist_ok=True)
    mp.spawn(_rank_main, args=(world, str(folder), fn, args), nprocs=world, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world)]


# -- the scenarios: BLIP retrieval's training steps and evaluation, on whatever world runs them -------------

def blip_task(data: str, **options: Any) -> tuple[Any, Any]:
    """A tiny BLIP retrieval model and its task over the shapes set at ``data`` (batches of 2 per rank)."""
    from upop.adapters import get_adapter
    from upop.models.demo import build_tokenizer
    from upop.tasks import Preprocessor, make_task

    from .conftest import build_tiny

    adapter = get_adapter("blip")
    model = build_tiny("blip", "BlipForImageTextRetrieval", vocab=99)
    prep = Preprocessor(build_tokenizer(), adapter.image_processor(32), **adapter.preprocessor_options(model))
    task = make_task(adapter, "retrieval", prep, data, model=model, workers=0, batch_size=2, eval_batch_size=2,
                     **options)
    return model, task


def blip_training_reads(data: str, steps: int, log_every: int) -> dict[str, Any]:
    """BLIP retrieval (momentum on: its gathers and queue too) trained ``steps`` optimizer steps through the
    loop, with host reads counted and collectives observed. Returns the reads made after the first step (which
    also probes DDP once), the logging windows they fall in, and the collectives seen."""
    from upop.training.distributed import current
    from upop.training.loop import LoopSettings, Phase, TrainLoop

    model, task = blip_task(data, momentum=True)
    dist = current()
    batches = task.train_batches().shard(dist.rank, dist.world)
    loop = TrainLoop(model, task.loss, batches, LoopSettings(total=steps, lr=1e-4, weight_decay=0.0, amp=False,
                                                             seed=0, log_every=log_every), Phase())
    marks: list[tuple[int, int]] = []
    flushes: list[int] = []
    real_step, real_flush = loop._train_step, loop.flush_log

    with SyncCounter() as reads, observe_devices() as seen:
        def step(*args: Any) -> None:
            marks.append(reads.mark())
            real_step(*args)

        def flush() -> None:
            if loop._pending:
                flushes.append(loop.step)
            real_flush()

        loop._train_step, loop.flush_log = step, flush  # type: ignore[method-assign]
        loop.run()
    return {"after_first": reads.calls[marks[1][0]:], "library": reads.library[marks[1][1]:],
            "windows": sum(1 for s in flushes if s >= 2),
            "collectives": sorted({name for name, _i, _o in seen}), "steps": loop.step}


def blip_evaluation(data: str, limit: int | None) -> dict[str, float]:
    """BLIP retrieval evaluated (ITC, then ITM re-ranking) with every collective's devices observed."""
    model, task = blip_task(data)
    with observe_devices():
        return task.evaluate(model, "test", limit)
