"""Config loading: every wrong key, type or range stops with an error naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest

from lxmert.core.config import Config, load_config, parse_overrides
from lxmert.core.errors import ConfigError
from lxmert.core.paths import Experiment

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "run" / "configs").glob("*.yaml"))


def _error(overrides: list[str], path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_unknown_nested_key_is_named():
    msg = _error(["train.lrr=0.1"])
    assert "'train.lrr'" in msg and "unknown key" in msg
    assert "lr" in msg.split("known here:")[1]


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("data:\n  embedded:\n    sed: 3\n")
    msg = _error([], path)
    assert str(path) in msg and "'data.embedded.sed'" in msg


@pytest.mark.parametrize("override, key", [
    ("train.epochs=x", "train.epochs"),
    ("train.epochs=2.5", "train.epochs"),
    ("train.compile=3", "train.compile"),
    ("seeds=3", "seeds"),
    ("lottery.levels=0.5", "lottery.levels"),
])
def test_wrong_type_is_named(override, key):
    msg = _error([override])
    assert f"'{key}'" in msg and "must be" in msg


@pytest.mark.parametrize("override, key", [
    ("lottery.levels=[0.5,1.2]", "lottery.levels"),
    ("lottery.levels=[0.6,0.3]", "lottery.levels"),
    ("train.warmup=1.5", "train.warmup"),
    ("train.epochs=0", "train.epochs"),
    ("model.dropout=1.0", "model.dropout"),
    ("model.answer_prior=1.0", "model.answer_prior"),
    ("model.answer_prior=0", "model.answer_prior"),
    ("lottery.modes=[low_magnitude,biggest]", "lottery.modes"),
    ("data.embedded.cp_skew=0.2", "data.embedded.cp_skew"),
])
def test_out_of_range_is_named(override, key):
    msg = _error([override])
    assert f"'{key}'" in msg and "out of range" in msg


def test_cross_checks_name_the_keys():
    msg = _error(["data.embedded.min_objects=5", "data.embedded.max_objects=3"])
    assert "'data.embedded.min_objects'" in msg and "'data.embedded.max_objects'" in msg
    assert "'data.embedded.max_objects'" in _error(["data.embedded.max_objects=20"])
    assert "'model.hidden_size'" in _error(["model.hidden_size=30", "model.num_attention_heads=4"])
    assert "'seeds'" in _error(["seeds=[1,1]"])


def test_overrides_are_parsed_as_yaml():
    assert parse_overrides(["a.b=2", "a.c=[0, 1]", "d=null", "e=yes", "f=0.5", "g=x=y"]) == \
        {"a": {"b": 2, "c": [0, 1]}, "d": None, "e": True, "f": 0.5, "g": "x=y"}
    cfg = load_config(None, ["train.epochs=7", "seeds=[3,4]", "train.lr=0.001", "model.pretrained=null",
                             "lottery.levels=[0.1,0.9]", "train.compile=true"])
    assert cfg.train.epochs == 7 and cfg.seeds == [3, 4] and cfg.train.lr == 0.001
    assert cfg.model.pretrained is None and cfg.lottery.levels == [0.1, 0.9] and cfg.train.compile is True
    assert isinstance(load_config(None, ["train.lr=1"]).train.lr, float)
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["train.epochs"])


def test_overrides_merge_into_yaml(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("experiment: mine\ntrain:\n  epochs: 3\n  lr: 0.01\n")
    cfg = load_config(path, ["train.epochs=5"])
    assert (cfg.experiment, cfg.train.epochs, cfg.train.lr) == ("mine", 5, 0.01)
    assert cfg.train.batch_size == Config().train.batch_size
    paths = Experiment(cfg)
    assert paths.models == Path("models/mine") and paths.results == Path("result/mine")
    assert paths.log == Path("logs/mine.log") and paths.metrics == Path("logs/mine.jsonl")


def test_unreadable_or_invalid_yaml_names_the_file(tmp_path):
    assert "missing.yaml" in _error([], tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    assert "bad.yaml" in _error([], bad) and "YAML" in _error([], bad)
    top = tmp_path / "top.yaml"
    top.write_text("train: 3\n")
    assert "'train'" in _error([], top)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.experiment
    assert cfg.data.valid not in cfg.data.test, "models must never be selected on a test split"


def test_shipped_configs_exist():
    assert {p.stem for p in CONFIGS} >= {"embedded", "vqa_v2", "vqa_cp_v2", "vqa_vs"}


def test_exponent_floats_and_bad_list_elements():
    assert load_config(None, ["train.lr=1e-3"]).train.lr == 0.001
    assert load_config(None, ["train.weight_decay=0"]).train.weight_decay == 0.0
    assert "'lottery.levels'" in _error(["lottery.levels=[0.1,x]"])
    assert "'debias.modality_sparsities'" in _error(["debias.modality_sparsities=[[0.1,0.2]]"])


@pytest.mark.parametrize("text, words", [
    ("train:\n  epochs: 2\n  epochs: 3\n", "line 3, column 3: key 'epochs' is given twice"),
    ("experiment: a\nexperiment: b\n", "line 2, column 1: key 'experiment' is given twice"),
    ("seeds: &a [*a]\n", "nested more than 20 levels deep (or an anchor that contains itself)"),
    ("seeds: " + "[" * 3000 + "]" * 3000 + "\n", "nested more than 20 levels deep"),
])
def test_yaml_that_would_be_read_wrongly_is_one_error(tmp_path, text, words):
    """A key given twice (PyYAML keeps the last silently), an anchor that contains itself and a 3,000-deep
    nesting (RecursionError) are one ConfigError naming the file."""
    path = tmp_path / "x.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="^" + str(path).replace(".", r"\.") + ": .*" + words.replace("(", r"\(")
                       .replace(")", r"\)")):
        load_config(path)
