"""The adapter's contract as typed capabilities: every family fulfils each, and the tasks call nothing undeclared."""

import ast
from pathlib import Path

import pytest

from upop.adapters import all_adapters, get_adapter
from upop.adapters.base import all_aliases
from upop.adapters.capabilities import ModelBuilding, PruningContract, TaskHooks
from upop.errors import UnsupportedModelError

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("adapter", all_adapters(), ids=lambda a: a.family)
def test_every_family_fulfils_every_capability(adapter):
    for cap in (PruningContract, ModelBuilding, TaskHooks):
        assert isinstance(adapter, cap), (adapter.family, cap.__name__)


def _protocol_members(proto) -> set[str]:
    names = set()
    for klass in proto.__mro__:
        if klass.__module__ == proto.__module__:
            names |= {n for n in vars(klass) if not n.startswith("_")} | set(getattr(klass, "__annotations__", {}))
    return names


def test_the_tasks_call_only_what_task_hooks_declares():
    """Every ``adapter.X`` / ``self.adapter.X`` in ``upop/tasks`` is a TaskHooks member: the Protocol is complete."""
    declared = _protocol_members(TaskHooks)
    called = set()
    for path in (ROOT / "upop" / "tasks").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                base = node.value
                name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else ""
                if name == "adapter":
                    called.add(node.attr)
    assert {"pair_logits", "pair_loss", "itc_temperature", "encode_image"} <= called
    assert called <= declared, sorted(called - declared)


def test_a_family_without_a_hook_says_so_in_one_line():
    vit = get_adapter("vit")
    with pytest.raises(UnsupportedModelError, match="vit has no image-text pair logits"):
        vit.pair_logits(None, None, None)
    with pytest.raises(UnsupportedModelError, match="vit has no image-text temperature"):
        vit.itc_temperature(None, 0.07)


def test_aliases_come_from_the_families():
    aliases = all_aliases()
    assert aliases["clip"] == "openai/clip-vit-base-patch16" and aliases["blip-vqa"] == "Salesforce/blip-vqa-base"
    assert set(get_adapter("deit").aliases) == {"deit"}
