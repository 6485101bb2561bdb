from __future__ import annotations

from pathlib import Path

from rich.table import Table

from .latest import source_or_latest
from .out import console, print_json


def run(source: str | None, fmt: str, out: str | None, fp16: bool, batch: str, opset: int, overwrite: bool,
        quiet: bool, as_json: bool = False) -> None:
    import json

    from upop.exporters import get
    from upop.hub import network_rule

    exporter = get(fmt)
    source = source_or_latest(source, "export")
    network_rule(source)
    out_dir = Path(out) if out else Path("upop-export") / f"{Path(source.rstrip('/')).name}-{fmt}"
    log = console(stderr=True, quiet=quiet)
    kwargs = {"fp16": fp16, "opset": opset, "overwrite": overwrite, "progress": lambda m: log.print(m)}
    if fmt == "trt":
        kwargs["batch"] = batch
    manifest = exporter(source, out_dir, **kwargs)
    if as_json:
        record = out_dir / "export.json"
        data = json.loads(record.read_text()) if record.is_file() else manifest
        print_json({**data, "out": str(out_dir.resolve())})
    if quiet:
        return
    con = console(stderr=as_json)
    if fmt == "onnx":
        table = Table(title=f"{source} → {out_dir} (ONNX opset {opset}, parity vs PyTorch)")
        for col in ("graph", "output", "batch", "max abs", "max rel", "tolerance", "fp16 max abs"):
            table.add_column(col, justify="left" if col in ("graph", "output") else "right")
        for g in manifest["graphs"]:
            half = {(p["batch"], p["output"]): p for p in g.get("fp16", {}).get("parity", [])}
            for p in g["parity"]:
                h = half.get((p["batch"], p["output"]))
                table.add_row(g["name"], p["output"], str(p["batch"]), f"{p['max_abs']:.2e}", f"{p['max_rel']:.2e}",
                              f"{p['tolerance']:.0e}", f"{h['max_abs']:.2e}" if h else "–")
        con.print(table)
        con.print(f"export: {out_dir}", soft_wrap=True)
    else:
        con.print(f"wrote {len(manifest['engines'])} TensorRT engine(s) to {out_dir}", soft_wrap=True)


def run_predict(export_dir: str, images: list[str], texts: list[str], fp16: bool) -> None:
    import numpy as np

    from upop.datasets.readers import open_image
    from upop.exporters.runtime import OrtModel
    from upop.tasks import Preprocessor

    from upop.errors import ConfigError

    from upop.hub import network_rule

    network_rule(export_dir)
    m = OrtModel(export_dir, fp16=fp16)
    prep = Preprocessor.from_pretrained(export_dir)
    task, graphs, con = m.manifest["task"], {g["name"] for g in m.manifest["graphs"]}, console()
    wanted = 2 if task == "nlvr" else 1
    if len(images) != wanted:
        raise ConfigError(f"a {task} model takes {wanted} --image, not {len(images)}")
    px = prep.pixels([open_image(Path(i)) for i in images]).numpy()
    tokens = m.manifest.get("tokens", {})

    def enc(t: list[str]) -> dict[str, np.ndarray]:
        e = prep.text(t)
        return {k: v.numpy() for k, v in e.items()}

    if task == "classification":
        (logits,) = m.run("classifier", pixel_values=px)
        probs = np.exp(logits[0] - logits[0].max())
        probs /= probs.sum()
        labels = m.manifest.get("labels", {})
        for i in np.argsort(-probs)[:5]:
            con.print(f"{labels.get(str(i), str(i))}: {probs[i]:.3f}")
    elif task == "caption":
        ids = m.greedy_caption(px, tokens["bos_token_id"], tokens["sep_token_id"])
        con.print(prep.decode(__import__("torch").from_numpy(ids))[0])
    elif task == "nlvr":
        if len(texts) != 1:
            raise ConfigError("a reasoning model judges one statement: --text 'both images contain a red circle'")
        (logits,) = m.run("reasoning", pixel_values=px[None], **enc(texts))
        p = np.exp(logits[0] - logits[0].max())
        p /= p.sum()
        con.print(f"{'true' if p[1] > p[0] else 'false'} (p(true) = {p[1]:.3f})  {texts[0]}")
    elif task == "vqa":
        if not texts:
            raise ConfigError("a VQA model needs a question: --text 'what color is the circle?'")
        q = enc(texts[:1])
        ids = m.greedy_answer(px, q["input_ids"], q["attention_mask"], tokens["bos_token_id"], tokens["sep_token_id"])
        con.print(prep.decode(__import__("torch").from_numpy(ids))[0])
    else:
        if not texts:
            raise ConfigError("image-text scoring needs at least one --text")
        t = enc(texts)
        if "itm" in graphs:
            emb, feat = m.run("image_encoder", pixel_values=px)
            (tf,) = m.run("text_encoder", **t)
            itc = (feat @ tf.T)[0]
            (itm,) = m.run("itm", image_embeds=np.repeat(emb, len(texts), 0), **t)
            p = np.exp(itm - itm.max(1, keepdims=True))
            p = (p / p.sum(1, keepdims=True))[:, 1]
            rows = [(txt, f"ITC {itc[i]:.3f}  ITM {p[i]:.3f}") for i, txt in enumerate(texts)]
        else:
            (img,) = m.run("image_encoder", pixel_values=px)
            (tf,) = m.run("text_encoder", **t)
            sim = (img @ tf.T)[0]
            rows = [(txt, f"cosine {sim[i]:.3f}") for i, txt in enumerate(texts)]
        for txt, score in rows:
            con.print(f"{score}  {txt}")
    con.print(f"[dim]providers: {sorted({p for v in m.providers_used().values() for p in v[:1]})}[/dim]")
