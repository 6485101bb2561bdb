"""The run report as files: ``report.json``, ``report.md`` and ``compression.png``.

The picture shows where the compression went (kept share of every module, by tower, the way
the UPop paper draws it) next to the search's π schedule and loss.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(quantity, before, after, after/before) rows shared by report.md and the CLI table."""
    rows = []
    m = report["metrics"]
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
        b, a = report[what]["before"], report[what]["after"]
        for tower in b:
            ratio = f"{a.get(tower, 0) / b[tower]:.1%}" if b[tower] else ""
            rows.append((f"{what} {tower}", _fmt(b[tower]), _fmt(a.get(tower)), ratio))
    return rows


def run_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    d = report.get("distributed")
    if d:
        lines.append(f"- processes: {d['world_size']} × batch {d['per_rank_batch']} = effective batch "
                     f"{d['effective_batch']}" + (f" ({d['backend']})" if d.get("backend") else ""))
    r = report.get("resumed_from")
    if r:
        lines.append(f"- resumed from the {r['phase']} checkpoint at step {r['step']}")
    return lines


def to_markdown(report: dict[str, Any]) -> str:
    lines = [f"# upop report: {report['model']}", "",
             f"- task: {report['task']} ({report['model_class']}, family {report['family']})",
             f"- ratio: {report['ratio']} ({report['granularity']} granularity), removed share of compressible cost: "
             f"{report['removed_cost_share']:.3f}", f"- profile: {report.get('profile') or 'none (parameter cost)'}",
             f"- time: {report['seconds']:.0f} s", *run_lines(report),
             "", "| | before | after | after/before |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in summary_rows(report)]
    lines += ["", "## Kept units per module", "", "| tower | module | kind | kept / units | shape |", "|---|---|---|---|---|"]
    for r in report["modules"]:
        shape = f"{r['num_heads']} × {r['head_dim']}" if r["kind"] == "attn" else f"{r['kept']}"
        lines.append(f"| {r['tower']} | {r['module']} | {r['kind']} ({r['role']}) | {r['kept']} / {r['units']} | {shape} |")
    lines += ["", "![where the compression went](compression.png)", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mods = report["modules"]
    towers = list(dict.fromkeys(r["tower"] for r in mods))
    fig, axes = plt.subplots(1, len(towers) + 1, figsize=(4.5 * (len(towers) + 1), 4.2))
    for ax, tower in zip(axes, towers):
        rows = [r for r in mods if r["tower"] == tower]
        for kind, marker in (("attn", "o"), ("mlp", "s")):
            for role in sorted({r["role"] for r in rows if r["kind"] == kind}):
                sel = [r for r in rows if r["kind"] == kind and r["role"] == role]
                ax.plot(range(len(sel)), [100 * r["kept"] / r["units"] for r in sel], marker=marker,
                        label=f"{kind}" if role in ("self", "mlp") else f"{kind} ({role})")
        ax.set_xticks(range(max(len([r for r in rows if r["kind"] == "mlp"]), 1)))
        ax.set_title(f"{tower}: kept share per layer")
        ax.set_xlabel("layer")
        ax.set_ylabel("% of units kept")
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[-1]
    hist = report["search"]["history"]
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
    fig.suptitle(f"{report['model']} at ratio {report['ratio']} ({report['granularity']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], out_dir: str | Path) -> None:
    out = Path(out_dir)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    (out / "report.md").write_text(to_markdown(report))
    plot(report, out / "compression.png")
