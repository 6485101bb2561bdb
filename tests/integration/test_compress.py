import pytest
import torch

import upop

from ..conftest import batches_for


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.9])
def test_every_family_compresses_and_still_runs(tiny, ratio):
    adapter, model = tiny
    gran = "head" if ratio == 0.5 else "dim"
    cfg = upop.CompressConfig(ratio=ratio, granularity=gran,
                              search=upop.SearchConfig(steps=4, update_every=2, lr=1e-4),
                              retrain=upop.RetrainConfig(epochs=1, steps_per_epoch=2, lr=1e-4))
    calls = []
    res = upop.compress(model, cfg, batches=batches_for(adapter, model, n=2), eval_fn=lambda m: 0.0,
                        progress=lambda stage, rec: calls.append(stage))
    r = res.report.to_dict()
    assert r["family"] == adapter.family and r["ratio"] == ratio and r["granularity"] == gran
    assert r["params"]["after"]["total"] < r["params"]["before"]["total"]
    assert r["flops"]["after"]["total"] < r["flops"]["before"]["total"]
    assert {"before", "val_after_search", "after"} <= set(r["metrics"])
    assert len(r["modules"]) == len(adapter.modules(res.model))
    assert "search" in calls and "retrain" in calls
    batch = batches_for(adapter, res.model, n=1, seed=4)[0]
    with torch.no_grad():
        out = adapter.forward_outputs(res.model.eval(), batch)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_cuda_asked_for_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(upop.ConfigError, match="no CUDA GPU is available"):
        upop.compress("vit", upop.CompressConfig(device="cuda"), batches=[])
