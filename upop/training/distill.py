"""Distillation from a frozen teacher into the model being compressed.

UPop removes head dimensions and MLP units but never the residual width, so the slim model's hidden
states have the teacher's shapes at every layer: its layers' outputs are compared with the teacher's
directly (no projection). The task defines the logit terms (``Task.forward`` / ``Task.distill_terms``);
the adapter declares which layers carry the residual stream (``Adapter.feature_layers``). The teacher
runs on the same batch in eval mode without gradients, after the student, reusing the student's random
choices (``guide``), so it draws no random numbers and a resumed run stays identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .parts import bf16_native
from ..run.config import DistillConfig
from ..errors import UnsupportedModelError
from .loop import loss_hooks

Features = dict[str, list[torch.Tensor]]


def teacher_dtype(device: torch.device, amp: bool, bf16_supported: bool | None = None) -> torch.dtype:
    """The teacher's weights: on CUDA with AMP in the autocast dtype (bf16 where the GPU has it natively, else fp16),
    halving what it holds; fp32 otherwise (without autocast, half weights would meet fp32 inputs)."""
    if device.type != "cuda" or not amp:
        return torch.float32
    if bf16_supported is None:
        bf16_supported = bf16_native()
    return torch.bfloat16 if bf16_supported else torch.float16


def freeze(teacher: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The teacher on ``device`` in ``dtype``, in eval mode, with no parameter that takes a gradient."""
    teacher = teacher.to(device=device, dtype=dtype).eval()
    teacher.requires_grad_(False)
    return teacher


@contextlib.contextmanager
def tap(model: nn.Module, names: list[str]) -> Iterator[Features]:
    """Records the output hidden state of each named module, call after call (a tower that runs several times
    on one batch, as BLIP's text encoder does for ITC and ITM, gives one entry per call)."""
    seen: Features = {n: [] for n in names}
    handles = []

    def hook_for(name: str):
        def hook(_mod: nn.Module, _args: Any, out: Any) -> None:
            seen[name].append(out[0] if isinstance(out, (tuple, list)) else out)
        return hook

    try:
        for n in names:
            handles.append(model.get_submodule(n).register_forward_hook(hook_for(n)))
        yield seen
    finally:
        for h in handles:
            h.remove()


def feature_loss(student: Features, teacher: Features) -> torch.Tensor:
    """Mean over layers (and calls) of ‖s − t‖² / ‖t‖²: a relative MSE, so that deep layers, whose residual
    stream is larger, do not outweigh the early ones and one weight suits models of every width. 0 when equal."""
    terms = []
    for name, outs in student.items():
        ref = teacher[name]
        if len(ref) != len(outs):
            raise RuntimeError(f"{name} ran {len(outs)} times on the student and {len(ref)} on the teacher")
        for s, t in zip(outs, ref):
            t = t.detach().float()
            terms.append((s.float() - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12))
    if not terms:
        raise RuntimeError("no feature layer ran on the batch")
    return torch.stack(terms).mean()


def check_teacher(adapter: Any, student: nn.Module, teacher: nn.Module, mode: str, label: str) -> None:
    """One line when ``teacher`` (named ``label``) cannot teach ``student``: another family or class, inputs it
    does not take, outputs (``logits``/``both``) or feature layers (``features``/``both``) of other shapes."""
    from ..adapters import get_adapter

    family = get_adapter(teacher.config).family
    if family != adapter.family:
        raise UnsupportedModelError(f"the teacher {label} is a {family} model and the student a {adapter.family} "
                                    "model; distillation needs a teacher of the same family")
    s_cls, t_cls = type(student).__name__, type(teacher).__name__
    if s_cls != t_cls:
        raise UnsupportedModelError(f"the teacher {label} is a {t_cls} and the student a {s_cls}; distillation "
                                    "needs a teacher of the same class (and task)")
    example = adapter.example_inputs(student, batch_size=1, generator=torch.Generator().manual_seed(0))
    names = adapter.feature_layers(student) if mode in ("features", "both") else []
    if names and adapter.feature_layers(teacher) != names:
        raise UnsupportedModelError(f"the teacher {label} has {len(adapter.feature_layers(teacher))} layers for "
                                    f"feature distillation and the student {len(names)}; feature distillation needs "
                                    "the same layers and widths (use --distill logits)")
    shapes = {}
    for who, model in (("student", student), ("teacher", teacher)):
        was = model.training
        model.eval()
        try:
            with torch.no_grad(), tap(model, names) as feats:
                outs = adapter.forward_outputs(model, {k: v.to(_device(model)) for k, v in example.items()})
        except Exception as exc:  # noqa: BLE001  (any failure of the teacher on the student's inputs says the same)
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise UnsupportedModelError(f"the teacher {label} does not take the student's inputs: {first}") from None
        finally:
            model.train(was)
        shapes[who] = ({k: tuple(v.shape) for k, v in outs.items()},
                       {k: [tuple(t.shape) for t in v] for k, v in feats.items()})
    if mode in ("logits", "both") and shapes["student"][0] != shapes["teacher"][0]:
        raise UnsupportedModelError(f"the teacher {label} has outputs of other shapes than the student's "
                                    f"({_diff(shapes['teacher'][0], shapes['student'][0])}); logit distillation needs "
                                    "the same outputs")
    if names and shapes["student"][1] != shapes["teacher"][1]:
        raise UnsupportedModelError(f"the teacher {label} has hidden states of other shapes or layers than the "
                                    f"student's ({_diff(shapes['teacher'][1], shapes['student'][1])}); feature "
                                    "distillation needs the same layers and widths (use --distill logits)")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _diff(teacher: dict[str, Any], student: dict[str, Any]) -> str:
    for k in sorted(set(teacher) | set(student)):
        if teacher.get(k) != student.get(k):
            return f"{k}: teacher {teacher.get(k, 'absent')}, student {student.get(k, 'absent')}"
    return "same"


class Distiller:
    """The training loss with distillation: the task's loss on the student's outputs plus ``weight`` × (KL of the
    task's distributions and/or the relative MSE of the declared layers' hidden states) against the teacher.

    A plain object, not a module: DDP wraps the student and the loss, never the teacher's weights."""

    def __init__(self, task: Any, teacher: nn.Module, config: DistillConfig, layers: list[str]):
        self.task, self.teacher, self.config = task, teacher, config
        self.layers = layers if config.mode in ("features", "both") else []
        self.logits = config.mode in ("logits", "both")

    def terms(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(task loss, distillation terms before the weight) on one batch."""
        with tap(model, self.layers) as s_feats:
            out = self.task.forward(model, batch)
        task_loss = self.task.loss_from(out, batch)
        teacher = self._teacher_beside(model)
        with torch.no_grad(), tap(teacher, self.layers) as t_feats:
            t_out = self.task.forward(teacher, batch, guide=out)
        kd = task_loss.new_zeros(())
        if self.logits:
            kd = kd + self.task.distill_terms(out, t_out, self.config.temperature)
        if self.layers:
            kd = kd + feature_loss(s_feats, t_feats)
        return task_loss, kd

    def _teacher_beside(self, model: nn.Module) -> nn.Module:
        """The teacher on the student's device, moved there at its first use: a teacher of the retrain alone is
        held on the host through the search, taking no accelerator memory while it is not needed."""
        dev = next(model.parameters()).device
        if next(self.teacher.parameters()).device != dev:
            self.teacher.to(dev)
        return self.teacher

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        task_loss, kd = self.terms(model, batch)
        return task_loss.float() + self.config.weight * kd

    def training_hooks(self) -> Any:
        """The task's per-run training state (BLIP's momentum model and queue), which the training loop drives
        through the loss it is given (``upop.training.loop.loss_hooks``): the task's own, or None where it keeps none."""
        return loss_hooks(self.task)
