from __future__ import annotations

import json

from .out import console
from rich.table import Table


def run(slim_dir: str, json_out: bool) -> None:
    import upop
    from upop.adapters import get_adapter
    from upop.run.checkpoint import read_manifest
    from upop.pruning.flops import flops_per_tower, params_per_tower

    from upop.models.hub import network_rule
    from upop.pruning.kinds import kind_named

    network_rule(slim_dir)
    manifest = read_manifest(slim_dir)
    model = upop.load(slim_dir)
    adapter = get_adapter(model)
    rows = []
    for s in adapter.modules(model):
        rows.append({"module": s.name, **s.manifest_row()})
    import torch

    example = adapter.example_inputs(model, batch_size=1, generator=torch.Generator().manual_seed(0))
    params, flops = params_per_tower(model, adapter), flops_per_tower(model, adapter, example)
    if json_out:
        print(json.dumps({"family": manifest["family"], "model_class": manifest["model_class"],
                          "modules": rows, "params": params, "flops": flops}, indent=2))
        return
    con = console()
    table = Table(title=f"{slim_dir}: {manifest['model_class']} ({len(manifest['stages'])} slimming pass(es))")
    for col in ("tower", "module", "kind", "heads × head_dim / width"):
        table.add_column(col)
    for r in rows:
        size = kind_named(r["kind"]).shape_text(r)
        table.add_row(r["tower"], r["module"], f"{r['kind']} ({r['role']})", size)
    con.print(table)
    totals = Table(title="per tower")
    totals.add_column("tower")
    totals.add_column("params", justify="right")
    totals.add_column("FLOPs (batch 1)", justify="right")
    for tower in sorted(set(params) | set(flops)):
        totals.add_row(tower, f"{params.get(tower, 0):,}", f"{flops.get(tower, 0):,}")
    con.print(totals)
