"""The run report as files: ``report.json``, ``report.md`` and ``compression.png``.

The picture shows where the compression went (kept share of every module, by tower, the way
the UPop paper draws it) next to the search's π schedule and loss.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..pruning.kinds import GROUPS, MLP, kind_named

REPORT_VERSION = 1
#: plot marker per sparsity group
_MARKERS = {GROUPS[0]: "o", MLP: "s"}


def _group_order(kind: str) -> int:
    return GROUPS.index(kind_named(kind).group)


@dataclass
class Report:
    """What a compress run did and measured: built once, written once (``report.json``), and read by
    ``report.md``, the picture and the CLI summary through these fields."""

    model: str
    family: str
    model_class: str
    task: str | None
    ratio: float
    granularity: str
    profile: str | None
    removed_cost_share: float
    metrics: dict[str, Any]  # primary, before/after (test), val_before, val_after_search, val_after, best_epoch
    params: dict[str, dict[str, int]]  # before/after, per tower
    flops: dict[str, Any]  # before/after per tower, and the inputs they were counted on
    modules: list[dict[str, Any]]  # kept units per module
    search: dict[str, Any]  # steps, history, skipped_steps
    retrain: dict[str, Any]  # history, evals
    seconds: float
    upop_version: str = ""
    hardware: dict[str, Any] | None = None  # profile, predicted latency before/after, target
    distributed: dict[str, Any] | None = None  # processes × batch × accumulation
    resumed_from: dict[str, Any] | None = None
    performance: dict[str, Any] = field(default_factory=dict)  # per-phase seconds, throughput, peak memory
    latency: list[dict[str, Any]] | None = None  # measured: runtime, device, batch, before/after ms (p50, p90), speedup
    distill: dict[str, Any] | None = None  # mode, weight, temperature, search, the teacher's source and dtype
    deployment: dict[str, Any] | None = None  # compress --export: the export folder(s), precision, table, choice
    report_version: int = REPORT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Report":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def module_rows(specs: Any, kept: dict[str, list[int]], granularity: str) -> list[dict[str, Any]]:
    """One row per compressible module: its units and how many the search kept (and the kept shape)."""
    rows = []
    for s in specs:
        n_kept = len(kept[s.name])
        rows.append({"module": s.name, "tower": s.tower, "kind": s.kind, "role": s.role,
                     "units": s.num_units(granularity), "kept": n_kept, **s.kept_fields(n_kept, granularity)})
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def summary_rows(report: Report) -> list[tuple[str, str, str, str]]:
    """(quantity, before, after, after/before) rows shared by report.md and the CLI table."""
    rows = []
    m = report.metrics
    before, after = m.get("before"), m.get("after")
    if isinstance(before, dict) and isinstance(after, dict):
        for k in before:
            if k == "primary":
                continue
            star = " (primary)" if k == m.get("primary") else ""
            rows.append((f"{k}{star}", _fmt(before[k]), _fmt(after.get(k)), ""))
    elif before is not None or after is not None:
        rows.append(("metric", _fmt(before), _fmt(after), ""))
    for what in ("params", "flops"):
        b, a = getattr(report, what)["before"], getattr(report, what)["after"]
        for tower in b:
            ratio = f"{a.get(tower, 0) / b[tower]:.1%}" if b[tower] else ""
            rows.append((f"{what} {tower}", _fmt(b[tower]), _fmt(a.get(tower)), ratio))
    for r in report.latency or []:
        what = f"{r['stage']}{' at ' + r['tokens'] if r.get('tokens') else ''}, " if "stage" in r else ""
        rows.append((f"latency ms, {what}{r['runtime']} {r['device']} batch {r['batch']} (p50)", f"{r['before_ms']:.3f}",
                     f"{r['after_ms']:.3f}", f"{r['after_ms'] / r['before_ms']:.1%} (speedup {r['speedup']:.2f}×)"))
        if "after_tokens_per_s" in r:
            b, a = r["before_tokens_per_s"], r["after_tokens_per_s"]
            rows.append((f"tokens/s, {what}{r['runtime']} {r['device']}", f"{b:.1f}", f"{a:.1f}", f"{a / b:.1%}"))
    hw = report.hardware
    if hw and hw.get("predicted_ms_after") is not None:
        b, a = hw["predicted_ms_before"], hw["predicted_ms_after"]
        rows.append((f"latency ms, predicted by profile {hw['profile']}", f"{b:.3f}", f"{a:.3f}",
                     f"{a / b:.1%}" if b else ""))
    return rows


def deployment_rows(report: Report) -> list[tuple[str, ...]]:
    """The deployment table of ``compress --export --precision`` (header first): per precision the metric on val
    and test, size, latency p50 at each batch and the speedups; empty without one."""
    dep = (report.deployment or {}).get("deployment")
    if not dep:
        return []
    batches = [str(b) for b in dep["batches"]]
    chosen = report.deployment.get("precision") if report.deployment else None
    original = any("speedup_vs_original" in r for r in dep["rows"])
    head = ("precision", "val", "test", "size MB", *(f"p50 ms @{b}" for b in batches), f"vs fp32 @{batches[-1]}",
            *([f"vs original @{batches[-1]}"] if original else []))
    rows: list[tuple[str, ...]] = [head]
    for r in dep["rows"]:
        cells = [r["precision"] + (" (chosen)" if r["precision"] == chosen else ""),
                 *(_fmt(r.get(k)) for k in ("metric_val", "metric_test")), f"{r['size_bytes'] / 1e6:.2f}",
                 *(f"{r['latency'][b]['p50_ms']:.2f}" for b in batches), f"{r['speedup_vs_fp32'][batches[-1]]:.2f}×"]
        cells += [f"{r['speedup_vs_original'][batches[-1]]:.2f}×"] if original else []
        rows.append(tuple(cells))
    return rows


def deployment_lines(report: Report) -> list[str]:
    """Where the export went and, for ``auto``, what it chose and why the others lost."""
    d = report.deployment
    if not d:
        return []
    lines = [f"export ({d['runtime']}): {d['export']}" + (f", precision {d['precision']}" if d.get("precision") else "")]
    if d.get("choice"):
        lines.append(f"auto chose {d['choice']['chosen']} ({d['choice']['rule']})")
        lines += [f"  {why}" for why in d["choice"]["reasons"].values()]
    return lines


def target_missed(report: Report) -> str | None:
    """A latency target the run could not meet, said plainly (the run still ends with exit 0); None when
    there is no target or it was met (``hardware.target_met``, as the plan judged it)."""
    hw = report.hardware or {}
    target, after = hw.get("target_ms"), hw.get("predicted_ms_after")
    if not isinstance(target, (int, float)) or not isinstance(after, (int, float)):
        return None
    if hw.get("target_met", after <= target):
        return None
    return (f"target latency missed: predicted {after:.3f} ms on {hw.get('profile')}, target {target:g} ms "
            f"(+{after - target:.3f} ms, +{(after / target - 1) * 100:.1f} %)")


def run_lines(report: Report) -> list[str]:
    lines = []
    d = report.distributed
    if d:
        lines.append(f"- processes: {d['world_size']} × batch {d['per_rank_batch']} = effective batch "
                     f"{d['effective_batch']}" + (f" ({d['backend']})" if d.get("backend") else ""))
    hw = report.hardware or {}
    if isinstance(hw.get("target_ms"), (int, float)) and isinstance(hw.get("predicted_ms_after"), (int, float)):
        missed = target_missed(report)
        lines.append(f"- {missed}" if missed else f"- latency target {hw['target_ms']:g} ms on {hw.get('profile')}: "
                     f"met (predicted {hw['predicted_ms_after']:.3f} ms)")
    kd = report.distill
    if kd:
        lines.append(f"- distilled ({kd['mode']}, weight {kd['weight']:g}, temperature {kd['temperature']:g}, "
                     f"{'search and retrain' if kd['search'] else 'retrain only'}) from {kd['teacher']}")
    r = report.resumed_from
    if r:
        lines.append(f"- resumed from the {r['phase']} checkpoint at step {r['step']}")
    return lines


def to_markdown(report: Report) -> str:
    lines = [f"# upop report: {report.model}", "",
             f"- task: {report.task} ({report.model_class}, family {report.family})",
             f"- ratio: {report.ratio} ({report.granularity} granularity), removed share of compressible cost: "
             f"{report.removed_cost_share:.3f}", f"- profile: {report.profile or 'none (parameter cost)'}",
             f"- time: {report.seconds:.0f} s", *run_lines(report),
             "", "| | before | after | after/before |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in summary_rows(report)]
    lines += ["", "## Kept units per module", "", "| tower | module | kind | kept / units | shape |", "|---|---|---|---|---|"]
    for r in report.modules:
        shape = kind_named(r["kind"]).shape_text(r)
        lines.append(f"| {r['tower']} | {r['module']} | {r['kind']} ({r['role']}) | {r['kept']} / {r['units']} | {shape} |")
    dep = deployment_rows(report)
    if report.deployment:
        lines += ["", "## Deployment", "", *(f"- {line.strip()}" for line in deployment_lines(report))]
    if dep:
        lines += ["", "| " + " | ".join(dep[0]) + " |", "|" + "---|" * len(dep[0])]
        lines += ["| " + " | ".join(r) + " |" for r in dep[1:]]
    lines += ["", "![where the compression went](compression.png)", ""]
    return "\n".join(lines)


def plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mods = report.modules
    towers = list(dict.fromkeys(r["tower"] for r in mods))
    fig, axes = plt.subplots(1, len(towers) + 1, figsize=(4.5 * (len(towers) + 1), 4.2))
    for ax, tower in zip(axes, towers):
        rows = [r for r in mods if r["tower"] == tower]
        for kind, role in sorted({(r["kind"], r["role"]) for r in rows}, key=lambda kr: (_group_order(kr[0]), kr)):
            sel = [r for r in rows if r["kind"] == kind and r["role"] == role]
            ax.plot(range(len(sel)), [100 * r["kept"] / r["units"] for r in sel], marker=_MARKERS[kind_named(kind).group],
                    label=f"{kind}" if role in ("self", MLP) else f"{kind} ({role})")
        ax.set_xticks(range(max(len([r for r in rows if kind_named(r["kind"]).group == MLP]), 1)))
        ax.set_title(f"{tower}: kept share per layer")
        ax.set_xlabel("layer")
        ax.set_ylabel("% of units kept")
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[-1]
    hist = report.search["history"]
    steps = [h["step"] for h in hist]
    ax.plot(steps, [h["pi"] for h in hist], color="C3", label="π (share marked)")
    ax.set_xlabel("search step")
    ax.set_ylabel("π")
    ax.set_ylim(0, 1)
    ax2 = ax.twinx()
    ax2.plot(steps, [h["task_loss"] for h in hist], color="C0", alpha=0.6, label="task loss")
    ax2.set_ylabel("task loss")
    ax.set_title("search: π schedule and loss")
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)
    fig.suptitle(f"{report.model} at ratio {report.ratio} ({report.granularity})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: Report, out_dir: str | Path) -> None:
    out = Path(out_dir)
    _write_text(out / "report.json", json.dumps(report.to_dict(), indent=2, default=float))
    _write_text(out / "report.md", to_markdown(report))
    plot(report, out / "compression.png")


def _write_text(path: Path, text: str) -> None:
    """A temporary name, then the rename: a report rewritten after the run (``--export``) is never half there."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
