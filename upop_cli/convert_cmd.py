"""``upop convert nlvr``: the original BLIP NLVR2 checkpoint as an HF-style folder."""

from __future__ import annotations

from pathlib import Path


def run_convert_nlvr(checkpoint: str, out: str, processor: str | None, head_dim: int, enc_token_id: int | None,
                     overwrite: bool) -> None:
    from rich.console import Console

    from upop.checkpoint import atomic_dir
    from upop.errors import CheckpointError, ModelLoadError
    from upop.tasks import Preprocessor
    from upop.models.convert import convert_nlvr_checkpoint

    out_dir = Path(out)
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"output folder {out_dir} already exists; pass --overwrite to replace it")
    model = convert_nlvr_checkpoint(checkpoint, head_dim=head_dim, enc_token_id=enc_token_id)
    model.config.architectures = [type(model).__name__]
    proc = None
    if processor is not None:
        proc = Preprocessor.from_pretrained(processor)  # its image processor and tokenizer, each checked
        if proc.tokenizer is None:
            raise ModelLoadError(f"{processor} has no tokenizer to copy")
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        if proc is not None:
            proc.save_pretrained(tmp)
    n = sum(p.numel() for p in model.parameters())
    note = "" if proc is not None else " (no processor copied: pass --processor with a BLIP folder or hub id)"
    Console().print(f"converted {checkpoint} → {out_dir}: {n:,} parameters{note}")
