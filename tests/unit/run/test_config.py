import pytest

from upop.run.config import CONFIG_VERSION, CompressConfig, RetrainConfig, SearchConfig
from upop.errors import ConfigError


def test_round_trips_through_json():
    cfg = CompressConfig(ratio=0.3, granularity="head", search=SearchConfig(steps=7, update_every=3),
                         retrain=RetrainConfig(epochs=2, lr=2e-5))
    again = CompressConfig.from_json(cfg.to_json())
    assert again == cfg
    assert again.search.ratio == 0.3 and again.search.granularity == "head"
    assert cfg.to_dict()["config_version"] == CONFIG_VERSION


@pytest.mark.parametrize("ratio", [0, 1, -0.1, 1.5, float("nan"), True, "0.5"])
def test_ratio_outside_0_1_is_refused(ratio):
    with pytest.raises(ConfigError, match="ratio must be strictly between 0 and 1"):
        CompressConfig(ratio=ratio)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(granularity="neuron"), "granularity must be one of dim, head"),
        (dict(device="tpu"), "device must be"),
        (dict(search=SearchConfig(update_every=0)), "update_every"),
        (dict(search=SearchConfig(steps=0)), "search steps"),
        (dict(search=SearchConfig(lambda_attn=-1)), "lambda_attn"),
        (dict(retrain=RetrainConfig(epochs=-1)), "retrain epochs"),
        (dict(retrain=RetrainConfig(warmup_ratio=1.0)), "warmup_ratio"),
        (dict(retrain=RetrainConfig(max_grad_norm=0)), "max_grad_norm"),
    ],
)
def test_bad_settings_are_refused_with_a_message(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CompressConfig(**kwargs)


def test_newer_config_version_and_unknown_keys_are_refused():
    with pytest.raises(ConfigError, match="newer than this upop"):
        CompressConfig.from_dict({"config_version": CONFIG_VERSION + 1})
    with pytest.raises(ConfigError, match="invalid compress config"):
        CompressConfig.from_dict({"ratio": 0.5, "speed": "fast"})
    with pytest.raises(ConfigError, match="not valid JSON"):
        CompressConfig.from_json("{")
