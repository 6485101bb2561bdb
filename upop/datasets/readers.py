"""Readers for the annotation formats users have; every malformed input names its file and record.

- Retrieval / captioning: the BLIP/UPop Karpathy JSON (COCO, Flickr30K). Train: one record per
  caption ``{"image", "caption"}``; val/test: ``{"image", "caption": [...]}``.
- VQA: the BLIP VQA JSON ``{"image", "question", "answer": [...]}``.
- Classification: an ImageFolder tree ``<split>/<class>/<image>``.
A file may be one JSON array, or JSON Lines (one object per line), in UTF-8.
Image paths are relative to the data folder; one that leaves it (``..``, an absolute path) is refused
unless outside data is allowed (``allow_outside=True``, or ``outside_data_allowed()``: the CLI's
``--allow-outside-data``), so an annotation file from elsewhere cannot make upop read any file it names.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import DataError  # noqa: F401  (defined with every error, raised and re-exported here)
from ..run.safety import MAX_JSON_DEPTH, check_depth, say_once

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"}



_ALLOW_OUTSIDE: ContextVar[bool] = ContextVar("upop_allow_outside_data", default=False)


@contextmanager
def outside_data_allowed(allow: bool = True) -> Iterator[None]:
    """Within this block the readers' default is to accept image paths outside the data folder."""
    token = _ALLOW_OUTSIDE.set(allow)
    try:
        yield
    finally:
        _ALLOW_OUTSIDE.reset(token)


@dataclass
class ImageTextRecord:
    image: Path
    captions: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class VQARecord:
    image: Path
    question: str
    answers: list[str]
    question_id: str | None = None


def _load_records(path: Path) -> list[Any]:
    if not path.is_file():
        raise DataError(f"annotation file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x}); "
                        "save it as UTF-8") from None
    except OSError as exc:
        raise DataError(f"annotation file {path} cannot be read: {exc.strerror or exc}") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: broken JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
        except RecursionError:
            raise DataError(f"{path} is nested more than {MAX_JSON_DEPTH} levels deep: not a file upop reads") from None
        return check_depth(data, path, DataError)
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(check_depth(json.loads(line), path, DataError))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: broken JSON on line {lineno}: {exc.msg}") from None
        except RecursionError:
            raise DataError(f"{path} is nested more than {MAX_JSON_DEPTH} levels deep: not a file upop reads") from None
    return records


def _image(root: Path, rec: dict[str, Any], path: Path, i: int, allow_outside: bool | None = None) -> Path:
    name = rec.get("image")
    if not isinstance(name, str) or not name or "\x00" in name:
        raise DataError(f"{path}: record {i} has no \"image\"")
    allow = _ALLOW_OUTSIDE.get() if allow_outside is None else allow_outside
    rel = PurePosixPath(os.path.normpath(name))
    if not allow and (rel.is_absolute() or rel.parts[:1] == ("..",)):
        raise DataError(f"{path}: record {i}: image {name!r} is outside the data folder {root} "
                        "(pass --allow-outside-data to read it)")
    img = root / rel
    if not img.is_file():
        raise DataError(f"{path}: record {i}: image {img} does not exist")
    return img


def _check_record(rec: Any, path: Path, i: int) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise DataError(f"{path}: record {i} is not an object")
    return rec


def read_retrieval(path: str | Path, image_root: str | Path | None = None, *,
                   allow_outside: bool | None = None) -> list[ImageTextRecord]:
    """Image-text pairs, grouped by image (train files have one record per caption)."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    by_image: dict[Path, ImageTextRecord] = {}
    for i, rec in enumerate(_load_records(path)):
        rec = _check_record(rec, path, i)
        img = _image(root, rec, path, i, allow_outside)
        cap = rec.get("caption")
        caps = [cap] if isinstance(cap, str) else cap
        if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
            raise DataError(f"{path}: record {i} has no caption (a string or a non-empty list of strings)")
        entry = by_image.setdefault(img, ImageTextRecord(image=img, captions=[],
                                                         extra={k: v for k, v in rec.items()
                                                                if k not in ("image", "caption")}))
        entry.captions.extend(caps)
    if not by_image:
        raise DataError(f"{path}: the split is empty")
    return list(by_image.values())


def read_vqa(path: str | Path, image_root: str | Path | None = None, *,
             allow_outside: bool | None = None) -> list[VQARecord]:
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    out = []
    for i, rec in enumerate(_load_records(path)):
        rec = _check_record(rec, path, i)
        img = _image(root, rec, path, i, allow_outside)
        q = rec.get("question")
        if not isinstance(q, str) or not q.strip():
            raise DataError(f"{path}: record {i} has no question")
        ans = rec.get("answer", [])
        ans = [ans] if isinstance(ans, str) else ans
        if not isinstance(ans, list) or not all(isinstance(a, str) for a in ans):
            raise DataError(f"{path}: record {i}: answer must be a string or a list of strings")
        out.append(VQARecord(image=img, question=q, answers=ans, question_id=str(rec.get("question_id", i))))
    if not out:
        raise DataError(f"{path}: the split is empty")
    return out


#: the reference's VQA training files (configs/vqa.yaml train_files): VQAv2 train and val, Visual Genome QA
VQA_TRAIN_FILES = ("vqa_train", "vqa_val", "vg_qa")


def vqa_training_files(data_dir: str | Path) -> list[Path]:
    """The VQA training files the data folder holds, in the reference's order (``.json``, else ``.jsonl``)."""
    root, out = Path(data_dir), []
    for name in VQA_TRAIN_FILES:
        found = next((root / f"{name}{ext}" for ext in (".json", ".jsonl") if (root / f"{name}{ext}").is_file()), None)
        if found is not None:
            out.append(found)
    return out


def read_vqa_training(data_dir: str | Path, image_root: str | Path | None = None, *,
                      allow_outside: bool | None = None) -> list[VQARecord]:
    """Every question of every VQA training file present (``VQA_TRAIN_FILES``), as the reference trains:
    VQAv2 train + val + Visual Genome QA. Every file's image paths are relative to ``image_root`` (default:
    the data folder), so Visual Genome's images sit where ``vg_qa.json`` names them there."""
    files = vqa_training_files(data_dir)
    if not files:
        raise DataError(f"{data_dir} has no VQA training file (looked for "
                        f"{', '.join(n + '.json' for n in VQA_TRAIN_FILES)})")
    root = image_root if image_root is not None else Path(data_dir)
    return [r for f in files for r in read_vqa(f, root, allow_outside=allow_outside)]


def read_classification(split_dir: str | Path, classes: list[str] | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
    """An ImageFolder split: (image, label) pairs and the class names (sorted folder names)."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DataError(f"classification split {split_dir} does not exist")
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    classes = classes or found
    if not classes:
        raise DataError(f"{split_dir}: no class folders")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{split_dir}: class folders {unknown} are not among the model's classes")
    items = []
    for label, name in enumerate(classes):
        d = split_dir / name
        if not d.is_dir():
            continue
        files = sorted(p for p in d.iterdir() if not p.name.startswith("."))
        items += [(p, label) for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        skipped = [p.name for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
        if skipped:
            say_once(f"{d}: {len(skipped)} file(s) that are not images upop reads ({', '.join(skipped[:3])}"
                     f"{', ...' if len(skipped) > 3 else ''}) are left out; images: {', '.join(sorted(IMAGE_SUFFIXES))}")
    if not items:
        raise DataError(f"{split_dir}: the split is empty")
    return items, classes


@contextmanager
def _image_errors(path: Path) -> Iterator[None]:
    """PIL's errors for one image as one DataError; a decompression bomb (an image whose pixel count
    passes PIL's limit: a small file that would decode to gigabytes) is refused, not decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"image {path} is refused: {str(exc).split('.')[0]} (decompression bomb?)") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DataError(f"image {path} cannot be read: {exc}") from None


def open_image(path: Path):
    from PIL import Image

    with _image_errors(path), Image.open(path) as im:
        return im.convert("RGB")


def check_images(paths: Iterable[Path]) -> int:
    """Open every image's header and verify its structure without decoding the pixels: a corrupt,
    truncated or oversized image is found before a run starts, naming the first bad file.
    Returns the number of distinct images checked."""
    from PIL import Image

    seen = dict.fromkeys(Path(p) for p in paths)
    for path in seen:
        with _image_errors(path), Image.open(path) as im:
            im.verify()
    return len(seen)


@dataclass
class PairRecord:
    images: tuple[Path, Path]
    sentence: str
    label: int  # 1: the sentence is true of the pair


_TRUTH = {"true": 1, "false": 0, "1": 1, "0": 0}


def read_nlvr(path: str | Path, image_root: str | Path | None = None, *,
              allow_outside: bool | None = None) -> list[PairRecord]:
    """The BLIP NLVR2 JSON: ``{"images": [a, b], "sentence": ..., "label": "True" | "False"}``
    (booleans and 0/1 are taken too)."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    out = []
    for i, raw in enumerate(_load_records(path)):
        rec = _check_record(raw, path, i)
        images = rec.get("images")
        if not isinstance(images, list) or len(images) != 2 or not all(isinstance(x, str) and x for x in images):
            raise DataError(f"{path}: record {i}: \"images\" must be a list of two image paths")
        pair = tuple(_image(root, {"image": name}, path, i, allow_outside) for name in images)
        sentence = rec.get("sentence")
        if not isinstance(sentence, str) or not sentence.strip():
            raise DataError(f"{path}: record {i} has no \"sentence\"")
        label = _TRUTH.get(str(rec.get("label")).strip().lower())
        if label is None:
            raise DataError(f"{path}: record {i}: \"label\" must be True or False, not {rec.get('label')!r}")
        out.append(PairRecord(images=pair, sentence=sentence, label=label))  # type: ignore[arg-type]
    if not out:
        raise DataError(f"{path} holds no records")
    return out
