"""``upop convert nlvr``: the original BLIP NLVR2 checkpoint as an HF-style folder."""

from __future__ import annotations

import json
from pathlib import Path

from .options import at_least, check
from .out import console


def run_convert_nlvr(checkpoint: str, out: str, processor: str | None, head_dim: int, enc_token_id: int | None,
                     overwrite: bool) -> None:
    from upop.run.checkpoint import atomic_dir
    from upop.errors import ModelLoadError
    from upop.models.convert import convert_nlvr_checkpoint
    from upop.run.safety import CONVERT_MARKER, check_replace
    from upop.tasks import Preprocessor

    out_dir = Path(out)
    check("--head-dim", head_dim, "an integer >= 1", at_least(1))
    check_replace(out_dir, overwrite=overwrite, sources=[checkpoint], kind="convert")
    model = convert_nlvr_checkpoint(checkpoint, head_dim=head_dim, enc_token_id=enc_token_id)
    model.config.architectures = [type(model).__name__]
    proc = None
    if processor is not None:
        from upop.models.hub import network_rule

        network_rule(processor)
        proc = Preprocessor.from_pretrained(processor)  # its image processor and tokenizer, each checked
        if proc.tokenizer is None:
            raise ModelLoadError(f"{processor} has no tokenizer to copy")
    with atomic_dir(out_dir, kind="convert") as tmp:
        model.save_pretrained(tmp)
        if proc is not None:
            proc.save_pretrained(tmp)
        # upop's mark: this folder may be replaced by a later convert --overwrite
        (tmp / CONVERT_MARKER).write_text(json.dumps({"converted_from": str(checkpoint), "head_dim": head_dim}))
    n = sum(p.numel() for p in model.parameters())
    note = "" if proc is not None else " (no processor copied: pass --processor with a BLIP folder or hub id)"
    console().print(f"converted {checkpoint} → {out_dir}: {n:,} parameters{note}")

