import json

import pytest

from upop.datasets import read_classification, read_retrieval, read_vqa, shapes
from upop.datasets.readers import DataError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shapes(tmp_path_factory.mktemp("d") / "shapes", train=6, val=3, test=3, classification_per_class=(2, 1, 1))


def test_readers_round_trip_the_shapes_set(data):
    train = read_retrieval(data / "retrieval_train.json")
    assert len(train) == 6 and all(len(r.captions) == 3 and r.image.is_file() for r in train)
    val = read_retrieval(data / "retrieval_val.json")
    assert len(val) == 3 and all(len(r.captions) == 3 for r in val)
    vqa = read_vqa(data / "vqa_test.json")
    assert len(vqa) == 12 and all(r.answers and r.image.is_file() for r in vqa)
    items, classes = read_classification(data / "classification" / "train")
    assert len(classes) == 12 and len(items) == 24


def _write(path, text):
    path.write_text(text)
    return path


def test_malformed_inputs_name_the_file_and_record(data, tmp_path):
    import shutil

    img = "a.png"  # relative to the data folder (image_root)
    shutil.copy(data / "images" / "train" / "00000.png", tmp_path / img)
    cases = [
        ('[{"image": "%s", "caption": "x"}, {"image": ' % img, "broken JSON at line 1"),
        ('{"image": "%s", "caption": "x"}\n{"image": "%s", caption}\n' % (img, img), "broken JSON on line 2"),
        ('[{"image": "nope.png", "caption": "x"}]', "record 0: image .*nope.png does not exist"),
        ('[{"caption": "x"}]', 'record 0 has no "image"'),
        ('[{"image": "%s"}]' % img, "record 0 has no caption"),
        ('[{"image": "%s", "caption": []}]' % img, "record 0 has no caption"),
        ("[]", "the split is empty"),
        ('["just a string"]', "record 0 is not an object"),
    ]
    for i, (text, match) in enumerate(cases):
        path = _write(tmp_path / f"bad{i}.json", text)
        with pytest.raises(DataError, match=match) as exc:
            read_retrieval(path, image_root=tmp_path)
        assert str(path) in str(exc.value)
    with pytest.raises(DataError, match="does not exist"):
        read_retrieval(tmp_path / "missing.json")
    path = _write(tmp_path / "q.json", json.dumps([{"image": img, "answer": ["a"]}]))
    with pytest.raises(DataError, match="record 0 has no question"):
        read_vqa(path)


def test_a_latin1_annotation_file_is_one_clear_error(tmp_path):
    path = tmp_path / "retrieval_train.json"
    path.write_bytes('[{"image": "a.png", "caption": "un caf\u00e9"}]'.encode("latin-1"))
    with pytest.raises(DataError, match=r"is not UTF-8 text \(byte 38 is 0xe9\); save it as UTF-8"):
        read_retrieval(path)


def _outside_cases(data, tmp_path):
    """Annotation files in tmp_path/d naming an image outside it, by .. and by absolute path."""
    import shutil

    (tmp_path / "d").mkdir()
    shutil.copy(data / "images" / "train" / "00000.png", tmp_path / "secret.png")
    for name in ("../secret.png", str(tmp_path / "secret.png"), "sub/../../secret.png"):
        yield _write(tmp_path / "d" / "ann.json", json.dumps([{"image": name, "caption": "x", "question": "q?",
                                                                  "images": [name, name], "sentence": "s",
                                                                  "label": True}]))


@pytest.mark.parametrize("reader", ["retrieval", "vqa", "nlvr"])
def test_image_paths_outside_the_data_folder_are_refused_unless_allowed(data, tmp_path, reader):
    from upop.datasets.readers import outside_data_allowed, read_nlvr

    read = {"retrieval": read_retrieval, "vqa": read_vqa, "nlvr": read_nlvr}[reader]
    for path in _outside_cases(data, tmp_path):
        with pytest.raises(DataError, match="is outside the data folder .*--allow-outside-data"):
            read(path)
        assert read(path, allow_outside=True)
        with outside_data_allowed():
            assert read(path)
        with pytest.raises(DataError, match="outside the data folder"):
            read(path)  # the block ended: refused again


def test_inside_paths_with_dots_are_fine(data, tmp_path):
    import shutil

    (tmp_path / "img").mkdir()
    shutil.copy(data / "images" / "train" / "00000.png", tmp_path / "img" / "a.png")
    path = _write(tmp_path / "ann.json", json.dumps([{"image": "img/../img/./a.png", "caption": "x"}]))
    assert read_retrieval(path)[0].image.is_file()


def test_a_decompression_bomb_is_refused_without_decoding(tmp_path):
    from PIL import Image

    from upop.datasets.readers import check_images, open_image

    bomb = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(bomb)  # 144 M pixels in a file of a few KB
    assert bomb.stat().st_size < 100_000
    for fn in (lambda: open_image(bomb), lambda: check_images([bomb])):
        with pytest.raises(DataError, match="bomb.png is refused: .*decompression bomb"):
            fn()


def test_check_images_names_the_first_bad_file(data, tmp_path):
    from upop.datasets.readers import check_images

    good = sorted((data / "images" / "train").glob("*.png"))[:3]
    assert check_images(good + good) == 3
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good[0].read_bytes()[:60])
    text = tmp_path / "text.png"
    text.write_text("not an image")
    with pytest.raises(DataError, match="cut.png cannot be read"):
        check_images([good[0], truncated, text])
    with pytest.raises(DataError, match="text.png cannot be read"):
        check_images([text, truncated])


def test_classification_errors(tmp_path, data):
    with pytest.raises(DataError, match="does not exist"):
        read_classification(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        read_classification(tmp_path / "empty")
    (tmp_path / "empty" / "cats").mkdir()
    with pytest.raises(DataError, match="the split is empty"):
        read_classification(tmp_path / "empty")
    with pytest.raises(DataError, match="not among the model's classes"):
        read_classification(data / "classification" / "train", classes=["red_circle"])


@pytest.mark.parametrize("record,message", [
    ({"images": ["a.png"], "sentence": "x", "label": "True"}, "list of two image paths"),
    ({"images": ["images/train/00000.png", "images/train/00001.png"], "label": "True"}, "no \"sentence\""),
    ({"images": ["images/train/00000.png", "images/train/00001.png"], "sentence": "x", "label": "maybe"},
     "must be True or False"),
    ({"images": ["images/train/00000.png", "nowhere.png"], "sentence": "x", "label": "False"}, "does not exist"),
])
def test_nlvr_reader_names_file_and_record(data, tmp_path, record, message):
    import json

    from upop.datasets.readers import read_nlvr

    good = {"images": ["images/train/00000.png", "images/train/00001.png"], "sentence": "s", "label": True}
    path = data / "nlvr_bad.json"
    path.write_text(json.dumps([good, record]))
    try:
        with pytest.raises(DataError) as info:
            read_nlvr(path)
        assert "nlvr_bad.json: record 1" in str(info.value) and message in str(info.value)
    finally:
        path.unlink()
    ok = data / "nlvr_ok.json"
    ok.write_text(json.dumps([good, dict(good, label="False"), dict(good, label=1), dict(good, label="false")]))
    try:
        assert [r.label for r in read_nlvr(ok)] == [1, 0, 1, 0]
    finally:
        ok.unlink()


def _vqa_folder(root, files):
    """A data folder with the given VQA training files in BLIP's formats: vqa_train / vqa_val (COCO images, ten
    annotator answers, "dataset": "vqa"), vg_qa (Visual Genome images, one answer, "dataset": "vg")."""
    from PIL import Image

    for sub in ("train2014", "val2014", "VG_100K"):
        (root / sub).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / sub / "1.jpg")
    rec = {"vqa_train": lambda i: {"question_id": i, "image": "train2014/1.jpg", "question": f"q{i}?",
                                   "answer": ["yes"] * 10, "dataset": "vqa"},
           "vqa_val": lambda i: {"question_id": 100 + i, "image": "val2014/1.jpg", "question": f"v{i}?",
                                 "answer": ["no"] * 9 + ["yes"], "dataset": "vqa"},
           "vg_qa": lambda i: {"image": "VG_100K/1.jpg", "question": f"g{i}?", "answer": ["red"], "dataset": "vg"}}
    for name, n, lines in files:
        recs = [rec[name](i) for i in range(n)]
        text = "\n".join(json.dumps(r) for r in recs) if lines else json.dumps(recs)
        (root / f"{name}.{'jsonl' if lines else 'json'}").write_text(text)
    return root


@pytest.mark.parametrize("files", [
    [("vqa_train", 2, False), ("vqa_val", 3, False), ("vg_qa", 4, False)],
    [("vqa_train", 2, False), ("vg_qa", 5, True)],
    [("vqa_val", 3, True)],
    [("vqa_train", 4, False)],
], ids=["all", "train+vg", "val-only", "train-only"])
def test_vqa_training_reads_every_training_file_present(tmp_path, files):
    from upop.datasets.readers import read_vqa_training, vqa_training_files

    root = _vqa_folder(tmp_path / "vqa", files)
    assert [p.name.split(".")[0] for p in vqa_training_files(root)] == [f[0] for f in files]
    recs = read_vqa_training(root)
    # the reference's dataset: the concatenation of every train file's annotation list
    reference = [r for name, _n, lines in files
                 for r in ([json.loads(x) for x in (root / f"{name}.jsonl").read_text().splitlines()] if lines
                           else json.loads((root / f"{name}.json").read_text()))]
    assert len(recs) == len(reference) == sum(n for _f, n, _l in files)
    assert [r.question for r in recs] == [r["question"] for r in reference]
    assert [r.image.relative_to(root).as_posix() for r in recs] == [r["image"] for r in reference]
    assert all(r.answers == ref["answer"] for r, ref in zip(recs, reference))


def test_vqa_training_without_a_training_file_is_one_line(tmp_path):
    from upop.datasets.readers import read_vqa_training

    with pytest.raises(DataError, match="has no VQA training file .*vqa_train.json, vqa_val.json, vg_qa.json"):
        read_vqa_training(tmp_path)
