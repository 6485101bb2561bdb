import pytest
import torch
import transformers

import upop
from upop.errors import ModelLoadError, UnsupportedModelError
from upop.models.hub import ALIASES, load_pretrained

from ...conftest import batches_for, build_tiny


@pytest.fixture
def vit_folder(tmp_path):
    model = build_tiny("vit", "ViTForImageClassification")
    path = tmp_path / "vit"
    model.save_pretrained(path)
    transformers.ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    return model, path


def test_a_save_pretrained_folder_loads_by_path(vit_folder):
    model, path = vit_folder
    loaded = load_pretrained(str(path))
    assert type(loaded.model).__name__ == "ViTForImageClassification"
    assert loaded.processor is not None
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k])


def test_compress_by_path_writes_the_processor(vit_folder, tmp_path):
    model, path = vit_folder
    adapter = upop.adapters.get_adapter("vit")
    cfg = upop.CompressConfig(ratio=0.5, search=upop.SearchConfig(steps=2, update_every=1),
                              retrain=upop.RetrainConfig(epochs=0))
    res = upop.compress(str(path), cfg, batches=batches_for(adapter, model, n=1))
    out = res.save(tmp_path / "slim")
    assert (out / "preprocessor_config.json").is_file()
    assert res.report.model == str(path)


def test_every_family_loads_from_a_folder(tiny, tmp_path):
    adapter, model = tiny
    model.save_pretrained(tmp_path / "m")
    loaded = load_pretrained(str(tmp_path / "m"))
    assert type(loaded.model) is type(model)
    assert loaded.adapter is adapter


def test_wrong_task_for_the_model(tmp_path):
    build_tiny("blip", "BlipForConditionalGeneration").save_pretrained(tmp_path / "cap")
    with pytest.raises(UnsupportedModelError, match="cannot do task 'retrieval'"):
        load_pretrained(str(tmp_path / "cap"), task="retrieval")
    build_tiny("vit", "ViTForImageClassification").save_pretrained(tmp_path / "vit")
    with pytest.raises(UnsupportedModelError, match="cannot do task 'caption'; they do: classification"):
        load_pretrained(str(tmp_path / "vit"), task="caption")


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64).save_pretrained(tmp_path / "bert")
    with pytest.raises(UnsupportedModelError, match="'bert' is not supported; supported model types: blip, blip_nlvr, clip"):
        load_pretrained(str(tmp_path / "bert"))


def test_unsupported_class_of_a_supported_family(tmp_path):
    m = transformers.ViTForMaskedImageModeling(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8))
    m.save_pretrained(tmp_path / "mim")
    with pytest.raises(UnsupportedModelError, match="ViTForMaskedImageModeling, which upop does not compress"):
        load_pretrained(str(tmp_path / "mim"))


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pretrained(str(tmp_path / "nope" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_pretrained(str(tmp_path / "empty"))


def test_unknown_hub_id_offline_suggests_demo_or_local(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="demo-\\* model"):
        load_pretrained("nobody-xyz/no-such-model")


def test_alias_resolves_to_its_hub_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert ALIASES["blip"] == "Salesforce/blip-itm-base-coco"
    with pytest.raises(ModelLoadError, match="Salesforce/blip-itm-base-coco"):
        load_pretrained("blip")


def test_corrupt_weights(vit_folder):
    _model, path = vit_folder
    (path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelLoadError, match="could not load the weights"):
        load_pretrained(str(path))
