"""Export graphs are registered per model class with the exporters; the adapter keeps only pruning and task hooks."""

import pytest
from torch import nn

from upop.adapters import Adapter, all_adapters, get_adapter
from upop.adapters.factories import ModelFactory
from upop.errors import UnsupportedModelError
from upop.exporters.graphs import export_graphs, graph_classes


def test_every_supported_class_has_export_graphs():
    missing = [name for a in all_adapters() for name in a.classes if name not in graph_classes()]
    assert not missing, missing


def test_an_unknown_class_has_no_export_graphs():
    class Unknown(nn.Module):
        pass

    with pytest.raises(NotImplementedError, match="vit: no export graphs"):
        export_graphs(Unknown(), get_adapter("vit"))


def test_the_adapter_base_holds_no_export_graphs_and_no_model_factories():
    for name in ("export_graphs", "random_config", "small_config", "image_processor"):
        assert not hasattr(Adapter, name), name
    assert all(isinstance(a, ModelFactory) for a in all_adapters())


def test_task_hooks_a_family_lacks_are_one_line_errors_naming_it():
    vit = get_adapter("vit")
    with pytest.raises(UnsupportedModelError, match="vit has no image-text matching head"):
        vit.itm_logits(nn.Identity(), None, None, None)
    with pytest.raises(UnsupportedModelError, match="vit models cannot be initialised from a Identity"):
        vit.init_from(nn.Identity())
