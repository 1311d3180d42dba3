from __future__ import annotations

import pytest
import yaml

from rnnkit.config import ConfigError, load_config
from tests.conftest import tiny_lm_config, write_yaml

BAD = [
    # (a change to the tiny config, or --set overrides, expected key, expected text in message)
    ({"model": {"hiden_size": 8}}, [], "model.hiden_size", "did you mean 'hidden_size'"),
    ({"model": {"cell": "lstn"}}, [], "model.cell", "expected one of 'rnn_tanh', 'rnn_relu', 'lstm', 'gru'"),
    ({"train": {"lr": -0.1}}, [], "train.lr", "-0.1 is out of range; allowed: > 0"),
    ({"train": {"batch_size": "big"}}, [], "train.batch_size", "expected an integer, got 'big'"),
    ({"model": {"dropout": 1.5}}, [], "model.dropout", "allowed: >= 0 and < 1"),
    ({"data": {"path": "no/such/file.txt"}}, [], "data.path", "file not found: 'no/such/file.txt'"),
    ({"task": "poetry"}, [], "task", "expected one of 'lm', 'translation'"),
    ({"train": {"optimizer": "adagrad"}}, [], "train.optimizer", "expected one of 'sgd', 'adam', 'adamw'"),
    ({"train": {"metric": "valid_bleu"}}, [], "train.metric", "expected one of valid_loss, valid_ppl, valid_bpc"),
    ({"data": {"split": [0.9, 0.2, 0.1]}}, [], "data.split", "summing to at most 1"),
    ({"train": {"device": "gpu"}}, [], "train.device", "expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
    ({"train": {"use_amp": True}}, [], "train.use_amp", "unknown key"),
    ({"model": {"tie_weights": "yes"}}, [], "model.tie_weights", "expected true or false"),
    ({}, ["train.max_steps=0"], "train.max_steps", "0 is out of range; allowed: >= 1"),
    ({}, ["model.num_layers=two"], "model.num_layers", "expected an integer, got 'two'"),
    ({}, ["trian.lr=0.1"], "trian", "did you mean 'train'"),
    ({"train": {"lr_schedule": "cosine", "warmup_steps": 50, "max_steps": 20}}, [], "train.warmup_steps",
     "must be below train.max_steps"),
    ({"data": {"train": "x.txt"}}, [], "data.train", "not both"),
    ({"train": {"lr_schedule": "cosine", "decay_by": "budget"}}, [], "train.decay_by", "needs train.max_time"),
    ({"train": {"decay_by": "budget", "max_time": 60}}, [], "train.decay_by", "lr_schedule is 'constant'"),
]


@pytest.mark.parametrize("change,overrides,key,text", BAD, ids=[b[2] + ("/set" if b[1] else "") for b in BAD])
def test_bad_config_names_file_key_and_what_is_allowed(tmp_path, change, overrides, key, text):
    path = write_yaml(tmp_path / "bad.yaml", tiny_lm_config(tmp_path, **change))
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    msg = str(info.value)
    assert info.value.key == key
    assert msg.startswith(str(path)), msg
    assert f"{key}: " in msg and text in msg, msg
    assert "\n" not in msg
    if overrides:
        assert f"(--set {overrides[0]})" in msg


def test_invalid_yaml_reports_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("task: lm\nmodel:\n  cell: [lstm\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"broken.yaml: is not valid YAML at line \d+"):
        load_config(path)


def test_overrides_are_parsed_to_the_key_type(lm_config_file):
    cfg = load_config(lm_config_file, ["train.lr=3e-4", "model.num_layers=3", "model.tie_weights=true",
                                       "run_dir=123", "train.max_time=null", "data.split=[0.7,0.3,0]"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.model.num_layers == 3 and cfg.model.tie_weights is True
    assert cfg.run_dir == "123"          # a string key keeps the text verbatim
    assert cfg.train.max_time is None
    assert cfg.data.split == [0.7, 0.3, 0.0]


def test_integer_given_for_float_is_accepted(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", tiny_lm_config(tmp_path, train={"lr": 1}))
    assert load_config(path).train.lr == 1.0


def test_resolved_config_round_trips(tmp_path, lm_config_file):
    from rnnkit.config import config_to_dict, save_config
    cfg = load_config(lm_config_file, ["model.cell=gru"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["train"]["clip_grad_norm"] == 5.0


def test_bundled_configs_are_valid(monkeypatch):
    from tests.conftest import ROOT, SHARED_DATA
    monkeypatch.chdir(ROOT)  # configs name paths relative to the project root
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        text = path.read_text()
        if "../shared/data" in text and not SHARED_DATA.exists():
            continue  # the shared corpora are absent on this machine; those configs cannot resolve
        load_config(path)


def test_set_null_unsets_an_optional_path(tmp_path):
    from tests.conftest import tiny_lm_config

    cfg = tiny_lm_config(tmp_path)
    cfg["data"] = {"train": str(tmp_path / "t.txt"), "valid": str(tmp_path / "t.txt"), "test": str(tmp_path / "t.txt")}
    (tmp_path / "t.txt").write_text("some text\n" * 50, encoding="utf-8")
    path = write_yaml(tmp_path / "c.yaml", cfg)
    assert load_config(path, ["data.test=null"]).data.test is None
    assert load_config(path, ["run_dir=runs/x y"]).run_dir == "runs/x y"     # other text stays verbatim
