"""benchmarks/step_profile.py profiles each training phase between two progress reports, and counts per step what
happened inside that window only."""

import torch

from benchmarks.step_profile import Window, summary


def test_each_phase_is_profiled_from_its_first_report_for_the_span_and_counts_only_inside():
    window = Window(span=2, cuda=False)
    torch.tensor(1.0).item()  # before any report: not counted
    window("evaluate", {"step": 0.0})  # not a training phase
    assert window.active is None
    window("search", {"step": 1.0})
    for _ in range(6):
        torch.tensor(2.0).item()
    window("search", {"step": 2.0})  # one step in: still profiling
    assert window.active is not None
    window("search", {"step": 3.0})
    assert window.active is None and set(window.done) == {"search"}
    torch.tensor(3.0).item()  # between phases: not counted
    window("search", {"step": 4.0})  # a phase is profiled once
    assert window.active is None
    window("retrain", {"step": 10.0})
    window("retrain", {"step": 12.0})
    steps, wall, prof = window.done["search"]
    got = summary(steps, wall, prof)
    assert steps == 2 and got["reads"] == 3.0  # the six .item() calls over two steps
    assert got["launches"] == 0 and got["busy"] == 0.0  # no GPU here
    assert window.done["retrain"][0] == 2 and summary(*window.done["retrain"])["reads"] == 0.0
