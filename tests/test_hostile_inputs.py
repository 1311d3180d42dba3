"""Malformed input of every kind: each gives exit code 2, one line on stderr, no traceback,
and leaves every file as it was. Property-based tests then throw arbitrary config values,
YAML documents and data files at the loaders: they load or raise rnnkit's own errors."""
from __future__ import annotations

import hashlib
import pickle
import shutil
import string
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rnnkit.cli import main
from rnnkit.config import ConfigError, load_config
from rnnkit.data.labeled import read_labeled, read_tagged
from rnnkit.data.vocab import read_parallel
from rnnkit.data.series import read_series
from rnnkit.data.vocab import DataError, read_text
from tests.conftest import ROOT, tiny_lm_config
from tests.test_translation_task import translation_config

SAMPLE = ROOT / "data" / "parallel"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A directory with a trained LM and translation model, good configs and data."""
    d = tmp_path_factory.mktemp("hostile")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RNNKIT_CACHE", str(d / "cache"))
        lm = tiny_lm_config(d, run_dir=str(d / "lm_run"), train={"max_steps": 4, "eval_every": 4})
        (d / "lm.yaml").write_text(yaml.safe_dump(lm))
        tr = translation_config(d)
        tr["run_dir"] = str(d / "tr_run")
        tr["train"].update(max_steps=2, eval_every=2)
        (d / "tr.yaml").write_text(yaml.safe_dump(tr))
        for cfg in ("lm.yaml", "tr.yaml"):
            with pytest.raises(SystemExit) as done:
                main(["train", str(d / cfg)])
            assert done.value.code == 0
    (d / "text.txt").write_text("a few words\nof text\n")
    return d


def write(name: str, content: str | bytes):
    def setup(d: Path) -> None:
        path = d / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def config(name: str, change=None, task: str = "lm"):
    """A config file derived from the good LM (or translation) config."""
    def setup(d: Path) -> None:
        cfg = yaml.safe_load((d / ("lm.yaml" if task == "lm" else "tr.yaml")).read_text())
        cfg["run_dir"] = str(d / f"run_{name}")
        if change:
            change(cfg, d)
        (d / name).write_text(yaml.safe_dump(cfg))
    return setup


def put(path: str, value):
    def change(cfg: dict, d: Path) -> None:
        node = cfg
        *parents, last = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value.format(d=d) if isinstance(value, str) else value
    return change


def ckpt(name: str, make):
    def setup(d: Path) -> None:
        make(d, d / name)
    return setup


def truncated(d, path):
    raw = (d / "lm_run" / "best.pt").read_bytes()
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(raw[: len(raw) // 2])


def foreign(d, path):
    torch.save({"weights": torch.ones(3)}, path)


class CreatesAFile:
    """A pickle whose loading would call ``open(...)``: weights_only loading must refuse it."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def crafted(d, path):
    with open(path, "wb") as fh:
        pickle.dump({"format": "rnnkit-checkpoint-1", "x": CreatesAFile(str(d / "PWNED"))}, fh)


def versioned(version: str, task: str = "lm"):
    def make(d, path):
        c = torch.load(d / "lm_run" / "best.pt", weights_only=True)
        c["format"] = f"rnnkit-checkpoint-{version}"
        c["config"]["task"] = task
        torch.save(c, path)
    return make


def with_task(task: str):
    def make(d, path):
        c = torch.load(d / "lm_run" / "best.pt", weights_only=True)
        c["config"]["task"] = task
        torch.save(c, path)
    return make


def nothing(d: Path) -> None:
    pass


BIG_LINE = "word " * 30_000
LM, TR = "{d}/lm_run/best.pt", "{d}/tr_run/best.pt"
CASES = [
    # ------------------------------------------------ configs
    ("yaml syntax", write("c.yaml", "task: lm\nmodel: [1, 2\n"), ["train", "{d}/c.yaml"]),
    ("yaml is a list", write("c.yaml", "- 1\n- 2\n"), ["train", "{d}/c.yaml"]),
    ("yaml tab indentation", write("c.yaml", "model:\n\thidden_size: 3\n"), ["train", "{d}/c.yaml"]),
    ("config not utf-8", write("c.yaml", b"task: lm\nrun_dir: \xff\xfe\n"), ["train", "{d}/c.yaml"]),
    ("config missing", nothing, ["train", "{d}/nope.yaml"]),
    ("config is a directory", nothing, ["train", "{d}/lm_run"]),
    ("unknown top key", config("c.yaml", put("epochs", 3)), ["train", "{d}/c.yaml"]),
    ("unknown model key", config("c.yaml", put("model.hiden_size", 3)), ["train", "{d}/c.yaml"]),
    ("section is a value", config("c.yaml", put("model", 5)), ["train", "{d}/c.yaml"]),
    ("wrong type int", config("c.yaml", put("model.hidden_size", "big")), ["train", "{d}/c.yaml"]),
    ("float for int", config("c.yaml", put("model.hidden_size", 3.5)), ["train", "{d}/c.yaml"]),
    ("wrong type bool", config("c.yaml", put("model.tie_weights", 3)), ["train", "{d}/c.yaml"]),
    ("negative lr", config("c.yaml", put("train.lr", -1.0)), ["train", "{d}/c.yaml"]),
    ("nan lr", config("c.yaml", put("train.lr", float("nan"))), ["train", "{d}/c.yaml"]),
    ("dropout above 1", config("c.yaml", put("model.dropout", 1.5)), ["train", "{d}/c.yaml"]),
    ("huge hidden size", config("c.yaml", put("model.hidden_size", 10 ** 9)), ["train", "{d}/c.yaml"]),
    ("huge vocabulary", config("c.yaml", put("data.max_vocab", 10 ** 12)), ["train", "{d}/c.yaml"]),
    ("unknown task", config("c.yaml", put("task", "speech")), ["train", "{d}/c.yaml"]),
    ("unknown cell", config("c.yaml", put("model.cell", "transformer")), ["train", "{d}/c.yaml"]),
    ("eval_every zero", config("c.yaml", put("train.eval_every", 0)), ["train", "{d}/c.yaml"]),
    ("betas wrong length", config("c.yaml", put("train.betas", [0.9])), ["train", "{d}/c.yaml"]),
    ("metric of another task", config("c.yaml", put("train.metric", "valid_bleu")), ["train", "{d}/c.yaml"]),
    ("layer norm with fused", config("c.yaml", put("model.layer_norm", True)), ["train", "{d}/c.yaml"]),
    ("residual with one layer", config("c.yaml", lambda c, d: c["model"].update(
        impl="explicit", residual=True, num_layers=1)), ["train", "{d}/c.yaml"]),
    ("cosine warmup beyond steps", config("c.yaml", lambda c, d: c["train"].update(
        lr_schedule="cosine", warmup_steps=100, max_steps=10)), ["train", "{d}/c.yaml"]),
    ("cuda on a cpu machine", config("c.yaml", put("train.device", "cuda:7")), ["train", "{d}/c.yaml"]),
    ("fp16 on cpu", config("c.yaml", lambda c, d: c["train"].update(precision="fp16", device="cpu")),
     ["train", "{d}/c.yaml"]),
    ("missing data file", config("c.yaml", put("data.path", "{d}/absent.txt")), ["train", "{d}/c.yaml"]),
    ("missing parallel file", config("c.yaml", put("data.train_src", "{d}/absent.en"), task="translation"),
     ["train", "{d}/c.yaml"]),
    ("--set without =", nothing, ["train", "{d}/lm.yaml", "--set", "train.lr"]),
    ("--set into a value", nothing, ["train", "{d}/lm.yaml", "--set", "train.lr.x=1"]),
    ("--set unknown key", nothing, ["train", "{d}/lm.yaml", "--set", "train.learning_rate=1"]),
    ("run_dir holds a run", nothing, ["train", "{d}/lm.yaml"]),
    ("resume without a run", config("c.yaml"), ["train", "{d}/c.yaml", "--resume"]),
    ("resume with another model", nothing, ["train", "{d}/lm.yaml", "--resume", "--set", "model.hidden_size=8"]),
    # ------------------------------------------------ data
    ("empty text", write("empty.txt", ""), ["train", "{d}/c.yaml"]),
    ("text not utf-8", write("bad.txt", b"fine\n\xff\xfe broken\n"), ["train", "{d}/c.yaml"]),
    ("binary as text", write("bin.txt", bytes(range(256)) * 8), ["train", "{d}/c.yaml"]),
    ("eval data not utf-8", write("bad.txt", b"\xc3\x28"), ["eval", LM, "--data", "{d}/bad.txt"]),
    ("eval data missing", nothing, ["eval", LM, "--data", "{d}/absent.txt"]),
    ("mismatched parallel files", write("short.en", "one line\n"), ["eval", TR, "--src", "{d}/short.en",
                                                                     "--ref", str(SAMPLE / "valid.fr")]),
    ("empty parallel file", write("empty.en", ""), ["eval", TR, "--src", "{d}/empty.en", "--ref", "{d}/empty.en"]),
    ("enormous line to translate", write("big.en", "hello\n" + BIG_LINE + "\n"),
     ["translate", TR, "-i", "{d}/big.en"]),
    ("binary to translate", write("bin.en", b"\x00\x01\x02abc\n"), ["translate", TR, "-i", "{d}/bin.en"]),
    ("enormous line in training data", write("big.fr", BIG_LINE + "\n"),
     ["train", "{d}/tr.yaml", "--set", "run_dir={d}/r2", "--set", "data.train_tgt={d}/big.fr",
      "--set", "data.train_src={d}/big.fr"]),
    ("classification line without tab", write("s.tsv", "pos\tgood\nno tab\n"),
     ["train", "{d}/c.yaml"]),
    ("conllu wrong columns", write("t.conllu", "1\tword\tNOUN\n"), ["train", "{d}/c.yaml"]),
    ("csv missing value", write("s.csv", "date,x\n2020-01-01 00:00:00,1\n2020-01-01 01:00:00,\n"),
     ["train", "{d}/c.yaml"]),
    ("csv unsorted", write("s.csv", "date,x\n2020-01-02 00:00:00,1\n2020-01-01 01:00:00,2\n"),
     ["train", "{d}/c.yaml"]),
    # ------------------------------------------------ checkpoints
    ("truncated checkpoint", ckpt("c.pt", truncated), ["generate", "{d}/c.pt"]),
    ("zero-byte checkpoint", write("c.pt", b""), ["generate", "{d}/c.pt"]),
    ("text as checkpoint", write("c.pt", "not a checkpoint\n"), ["generate", "{d}/c.pt"]),
    ("foreign torch file", ckpt("c.pt", foreign), ["generate", "{d}/c.pt"]),
    ("crafted pickle", ckpt("c.pt", crafted), ["generate", "{d}/c.pt"]),
    ("newer format version", ckpt("c.pt", versioned("2")), ["generate", "{d}/c.pt"]),
    ("unknown task checkpoint", ckpt("c.pt", with_task("speech")), ["eval", "{d}/c.pt", "--data", "{d}/text.txt"]),
    ("checkpoint is a directory", nothing, ["generate", "{d}/lm_run"]),
    ("checkpoint missing", nothing, ["translate", "{d}/absent.pt"]),
    ("resume from a truncated last.pt", ckpt("lm_run2/last.pt", truncated),
     ["train", "{d}/lm.yaml", "--resume", "--set", "run_dir={d}/lm_run2"]),
    # ------------------------------------------------ command-line arguments
    ("temperature 0", nothing, ["generate", LM, "--temperature", "0"]),
    ("temperature negative", nothing, ["generate", LM, "--temperature", "-1"]),
    ("temperature text", nothing, ["generate", LM, "--temperature", "hot"]),
    ("length negative", nothing, ["generate", LM, "--length", "-5"]),
    ("length enormous", nothing, ["generate", LM, "--length", "10000000000"]),
    ("top-p zero", nothing, ["generate", LM, "--top-p", "0"]),
    ("beam 0", nothing, ["translate", TR, "--beam", "0"]),
    ("n-best above beam", nothing, ["translate", TR, "--beam", "2", "--n-best", "3"]),
    ("output in a missing directory", nothing, ["translate", TR, "-i", str(SAMPLE / "test.en"), "-o",
                                                "{d}/no/such/dir/out.fr"]),
    ("output is a directory", nothing, ["translate", TR, "-i", str(SAMPLE / "test.en"), "-o", "{d}/lm_run"]),
    ("generate from a translator", nothing, ["generate", TR]),
    ("translate with a language model", nothing, ["translate", LM, "-i", str(SAMPLE / "test.en")]),
    ("predict with a language model", nothing, ["predict", LM, "-i", "{d}/text.txt"]),
    ("eval lm without data", nothing, ["eval", LM]),
    ("eval translation without ref", nothing, ["eval", TR, "--src", str(SAMPLE / "test.en")]),
    ("plot without gradient flow", nothing, ["eval", LM, "--data", "{d}/text.txt", "--plot", "{d}/p.png"]),
    ("split for a language model", nothing, ["eval", LM, "--data", "{d}/text.txt", "--split", "test"]),
    ("unknown option", nothing, ["train", "{d}/lm.yaml", "--epochs", "3"]),
    ("unknown command", nothing, ["fit", "{d}/lm.yaml"]),
    ("missing argument", nothing, ["eval"]),
    ("bad device", nothing, ["generate", LM, "--device", "tpu"]),
]

DATA_CONFIGS = {   # the data-file cases train from a config that points at them
    "empty text": ("lm", "data.path", "empty.txt"),
    "text not utf-8": ("lm", "data.path", "bad.txt"),
    "binary as text": ("lm", "data.path", "bin.txt"),
    "classification line without tab": ("classification", None, "s.tsv"),
    "conllu wrong columns": ("tagging", None, "t.conllu"),
    "csv missing value": ("forecast", None, "s.csv"),
    "csv unsorted": ("forecast", None, "s.csv"),
}


def data_config(name: str, d: Path) -> None:
    task, key, file = DATA_CONFIGS[name]
    path = str(d / file)
    if task == "lm":
        cfg = yaml.safe_load((d / "lm.yaml").read_text())
        cfg["data"] = {"path": path, "split": [0.5, 0.5, 0.0]}
    elif task == "forecast":
        cfg = {"task": "forecast", "data": {"path": path, "input_length": 1, "horizon": 1, "season": 1}}
    else:
        cfg = {"task": task, "data": {"train": path, "valid": path}}
    cfg["run_dir"] = str(d / "run_data")
    (d / "c.yaml").write_text(yaml.safe_dump(cfg))


def snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and "cache" not in p.parts}


def test_there_are_at_least_fifty_cases():
    assert len(CASES) >= 50 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name,setup,argv", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_is_one_line_exit_2_and_changes_nothing(world, tmp_path, capsys, monkeypatch,
                                                                  name, setup, argv):
    d = tmp_path / "w"
    shutil.copytree(world, d, ignore=shutil.ignore_patterns("cache"))
    monkeypatch.setenv("RNNKIT_CACHE", str(tmp_path / "cache"))
    setup(d)
    if name in DATA_CONFIGS:
        data_config(name, d)
    before = snapshot(d)
    args = [a.format(d=d) for a in argv]
    with pytest.raises(SystemExit) as done:
        main(args)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert done.value.code == 2, f"exit {done.value.code}: {err}"
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err + out
    assert snapshot(d) == before, "files changed"
    assert not (d / "PWNED").exists()


# ---------------------------------------------------------------- properties
SLOW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
KEYS = ["task", "seed", "run_dir", "model.hidden_size", "model.cell", "model.dropout", "model.impl",
        "model.layer_norm", "train.lr", "train.betas", "train.max_time", "train.device", "train.precision",
        "train.teacher_forcing.schedule", "train.teacher_forcing", "data.split", "data.bptt", "data.tokenizer",
        "model", "train", "data", "model.encoder.cell", "x.y", "train.lr.x"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 12, 10 ** 12), st.floats(allow_nan=True),
                    st.text(max_size=12))
documents = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner,
                                                 max_size=4)), max_leaves=12)


@SLOW
@given(st.lists(st.tuples(st.sampled_from(KEYS), st.text(string.printable, max_size=16)), max_size=4))
def test_any_set_values_load_or_raise_config_error(lm_config_file, overrides):
    try:
        load_config(lm_config_file, [f"{k}={v}" for k, v in overrides])
    except ConfigError:
        pass


@SLOW
@given(documents)
def test_any_yaml_document_loads_or_raises_config_error(tmp_path, doc):
    path = tmp_path / "doc.yaml"
    try:
        path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    except (yaml.YAMLError, UnicodeEncodeError):
        return
    try:
        load_config(path)
    except ConfigError:
        pass


@SLOW
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300).map(lambda s: s.encode("utf-8", "surrogatepass"))))
def test_any_bytes_read_as_data_or_raise_data_error(tmp_path, raw):
    path = tmp_path / "f"
    path.write_bytes(raw)
    readers = [lambda: read_text(str(path)), lambda: read_parallel(str(path), str(path)),
               lambda: read_labeled(str(path)), lambda: read_tagged(str(path), "conllu", 2, 4),
               lambda: read_tagged(str(path), "columns", 1, 2), lambda: read_series(path, "date")]
    for read in readers:
        try:
            read()
        except DataError:
            pass


@SLOW
@given(st.lists(st.lists(st.sampled_from(["2020-01-01 00:00:00", "2020-01-01 01:00:00", "x", "", "1", "nan",
                                          "2.5", "-3e9", '"', ",", "inf", "date"]), min_size=1, max_size=4),
                max_size=8))
def test_any_csv_table_reads_or_raises_data_error(tmp_path, rows):
    path = tmp_path / "s.csv"
    path.write_text("\n".join(",".join(r) for r in rows) + "\n")
    try:
        read_series(path, "date")
    except DataError:
        pass
