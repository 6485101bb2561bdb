"""The option table of ``upop.run.options``: one declaration gives the flag, the TOML key, the rule and the config
field; the ratio is stored once."""

import dataclasses

import pytest

import upop.tasks  # noqa: F401  (the tasks' own options join the table)
from upop.run.config import CompressConfig, RetrainConfig, SearchConfig
from upop.errors import ConfigError
from upop.run.options import RATIO, compress_options
from upop_cli.options import compress_keys, read_toml

#: a valid value per type, unlike every default, to see where it lands
SAMPLE = {int: 3, float: 0.25, bool: True}
CHOICE = {"granularity": "head", "search_lr_schedule": "cosine", "retrain_schedule": "epoch-cosine", "device": "cpu",
          "cost_weights": "paper",
          "distill": "logits", "profile": "t4", "teacher": "demo-vit", "towers": "language"}


def _sample(opt):
    return CHOICE.get(opt.name, SAMPLE.get(opt.type))


def _at(cfg, path):
    value = cfg
    for part in path.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("opt", [o for o in compress_options() if o.into], ids=lambda o: o.name)
def test_each_value_lands_in_the_config_fields_its_option_names(opt):
    values = {opt.name: _sample(opt)}
    if opt.name == "teacher":
        values["distill"] = "logits"  # a teacher needs distillation on
    if opt.name == "target_latency":
        values["profile"] = "t4"
    cfg = CompressConfig.from_values(values)
    assert all(_at(cfg, path) == values[opt.name] for path in opt.into)


def test_every_flag_of_compress_is_the_tables_and_every_flagged_option_is_a_flag():
    import typer

    from upop_cli.app import app

    cmd = typer.main.get_command(app).commands["compress"]
    names = {p.name for p in cmd.params}
    cli_only = {"overwrite", "resume", "nproc", "nnodes", "rdzv_endpoint", "rdzv_id", "max_restarts", "config",
                "allow_outside_data", "quiet", "as_json"}
    table = {o.name for o in compress_options() if o.flagged}
    assert names - cli_only == table
    helps = {p.name: p.help for p in cmd.params}
    assert all(helps[o.name] == o.help for o in compress_options() if o.flagged)


def test_a_toml_file_knows_exactly_the_tables_keys(tmp_path):
    assert compress_keys() == {o.name for o in compress_options()}
    f = tmp_path / "run.toml"
    f.write_text("[compress]\nlambda-attn = 0.01\nk_test = 4\n")
    assert read_toml(f) == {"lambda_attn": 0.01, "k_test": 4}
    f.write_text("[compress]\nspeed = 1\n")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) speed; known: augment, batch_size"):
        read_toml(f)


def test_the_ratio_is_stored_once_and_checked_by_one_rule():
    assert "ratio" not in {f.name for f in dataclasses.fields(CompressConfig)}
    cfg = CompressConfig(ratio=0.3, granularity="head")
    assert cfg.search.ratio == 0.3 and cfg.search.granularity == "head"
    cfg.ratio = 0.6
    assert cfg.search.ratio == 0.6 and cfg.to_dict()["ratio"] == cfg.to_dict()["search"]["ratio"] == 0.6
    assert CompressConfig(search=SearchConfig(ratio=0.2)).ratio == 0.2
    with pytest.raises(ConfigError) as lib:
        CompressConfig(ratio=1.5)
    with pytest.raises(ConfigError) as rule:
        RATIO.check("ratio", 1.5)
    assert str(lib.value) == str(rule.value) == "ratio must be strictly between 0 and 1, got 1.5"


def test_defaults_come_from_the_config_dataclasses():
    d = CompressConfig.option_defaults()
    s, r = SearchConfig(), RetrainConfig()
    assert (d["search_epochs"], d["retrain_epochs"], d["lr"], d["lambda_attn"]) == (s.epochs, r.epochs, s.lr,
                                                                                   s.lambda_attn)
    assert "ratio" not in d and "target_latency" not in d  # a run names one of them
    assert d["batch_size"] == 32 and d["latency"] is True
