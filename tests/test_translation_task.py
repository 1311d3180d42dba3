from __future__ import annotations

import random

import pytest
from typer.testing import CliRunner

from rnnkit.cli import app
from tests.conftest import ROOT, write_yaml

runner = CliRunner()
SAMPLE = ROOT / "data" / "parallel"


def translation_config(tmp_path, **changes) -> dict:
    cfg = {
        "task": "translation", "run_dir": str(tmp_path / "run"), "seed": 3,
        "data": {"train_src": str(SAMPLE / "train.en"), "train_tgt": str(SAMPLE / "train.fr"),
                 "valid_src": str(SAMPLE / "valid.en"), "valid_tgt": str(SAMPLE / "valid.fr")},
        "model": {"embedding_dim": 16,
                  "encoder": {"cell": "gru", "hidden_size": 16, "dropout": 0.0},
                  "decoder": {"cell": "gru", "hidden_size": 32, "dropout": 0.0, "input_feeding": True}},
        "train": {"batch_size": 32, "eval_batch_size": 50, "max_steps": 6, "log_every": 2, "eval_every": 6,
                  "metric": "valid_bleu", "metric_mode": "max"},
    }
    for section, values in changes.items():
        cfg[section].update(values)
    return cfg


def train(tmp_path, **changes):
    path = write_yaml(tmp_path / "t.yaml", translation_config(tmp_path, **changes))
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    return tmp_path / "run" / "last.pt"


def reversal_files(tmp_path, n: int, seed: int, name: str):
    rng = random.Random(seed)
    letters = "abcdefghij"
    src = [" ".join(rng.choice(letters) for _ in range(rng.randint(2, 6))) for _ in range(n)]
    (tmp_path / f"{name}.src").write_text("".join(s + "\n" for s in src))
    (tmp_path / f"{name}.tgt").write_text("".join(" ".join(s.split()[::-1]) + "\n" for s in src))
    return src


def test_tiny_reversal_task_reaches_exact_match(tmp_path):
    reversal_files(tmp_path, 3000, 1, "train")
    valid = reversal_files(tmp_path, 100, 2, "valid")
    cfg = translation_config(tmp_path)
    cfg["data"] = {"train_src": str(tmp_path / "train.src"), "train_tgt": str(tmp_path / "train.tgt"),
                   "valid_src": str(tmp_path / "valid.src"), "valid_tgt": str(tmp_path / "valid.tgt")}
    cfg["model"] = {"embedding_dim": 32, "encoder": {"cell": "gru", "hidden_size": 64, "dropout": 0.0},
                    "decoder": {"cell": "gru", "hidden_size": 64, "dropout": 0.0, "attention": "additive",
                                "input_feeding": False}}
    cfg["train"].update({"max_steps": 1000, "eval_every": 250, "lr": 0.005, "batch_size": 64,
                         "metric": "valid_loss", "metric_mode": "min"})
    result = runner.invoke(app, ["train", str(write_yaml(tmp_path / "rev.yaml", cfg))])
    assert result.exit_code == 0, result.output
    out = runner.invoke(app, ["translate", str(tmp_path / "run" / "best.pt"), "-i", str(tmp_path / "valid.src")])
    hyps = out.stdout.splitlines()
    exact = sum(h == " ".join(s.split()[::-1]) for h, s in zip(hyps, valid))
    assert exact == len(valid), f"{exact}/{len(valid)} exact"


def test_translate_keeps_line_order_and_empty_lines(tmp_path):
    ckpt = train(tmp_path)
    lines = ["A man is walking in the park .", "", "The children are singing on a bench at night .",
             "   ", "A dog is sleeping .", ""]
    src = tmp_path / "in.en"
    src.write_text("\n".join(lines) + "\n")
    together = runner.invoke(app, ["translate", str(ckpt), "-i", str(src), "--batch-size", "2", "--beam", "3"])
    assert together.exit_code == 0, together.output
    out = together.stdout.split("\n")[:-1]
    assert len(out) == len(lines)
    assert [o == "" for o in out] == [not line.strip() for line in lines]
    for line, o in zip(lines, out):
        if line.strip():
            alone = runner.invoke(app, ["translate", str(ckpt), "--beam", "3"], input=line + "\n")
            assert alone.stdout == o + "\n"
    nbest = runner.invoke(app, ["translate", str(ckpt), "--beam", "3", "--n-best", "2"], input="\n".join(lines) + "\n")
    rows = nbest.stdout.split("\n")[:-1]
    assert len(rows) == len(lines) and rows[1] == "" and rows[0].count(" ||| ") == 1


def test_translate_plots_and_eval(tmp_path):
    ckpt = train(tmp_path, model={"decoder": {"cell": "lstm", "hidden_size": 32, "attention": "additive"}})
    plots = tmp_path / "plots"
    result = runner.invoke(app, ["translate", str(ckpt), "--attention-plots", str(plots), "--replace-unk"],
                           input="A zebra is singing .\n\nA man is eating .\n")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in plots.iterdir()) == ["attention_00001.png", "attention_00003.png"]
    ev = runner.invoke(app, ["eval", str(ckpt), "--src", str(SAMPLE / "test.en"), "--ref", str(SAMPLE / "test.fr"),
                             "--beam", "2", "--json"])
    assert ev.exit_code == 0, ev.output
    import json
    m = json.loads(ev.stdout)
    assert 0 <= m["bleu"] <= 100 and 0 <= m["chrf"] <= 100 and m["ppl"] > 1 and m["sentences"] == 100


def test_replace_unk_copies_the_attended_source_word(tmp_path):
    import numpy as np

    from rnnkit.decoding.search import Hypothesis
    from rnnkit.runs import load_task
    task = load_task(train(tmp_path), "cpu")
    unk = task.tgt_tok.vocab.stoi["<unk>"]
    le = task.tgt_tok.vocab.stoi["Le"]
    attn = np.array([[0.1, 0.8, 0.1], [0.7, 0.2, 0.1], [0.3, 0.3, 0.4]])
    t = task._finish(Hypothesis([unk, le], -1.0, attn), ["Zorro", "sings", "."], replace_unk=True)
    assert t.text == "sings Le"
    kept = task._finish(Hypothesis([unk, le], -1.0, attn), ["Zorro", "sings", "."], replace_unk=False)
    assert kept.text == "<unk> Le"


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_subword_tokenisation_travels_in_the_checkpoint(tmp_path, kind):
    ckpt = train(tmp_path, data={"src_tokenizer": kind, "tgt_tokenizer": kind,
                                 "src_vocab_size": 120, "tgt_vocab_size": 120})
    from rnnkit.runs import load_task
    task = load_task(ckpt, "cpu")
    assert task.src_tok.kind == kind and 20 < len(task.src_tok.vocab) <= 120
    pieces = task.tgt_tok.split("Le vieux pêcheur dort .")
    assert task.tgt_tok.join(pieces) == "Le vieux pêcheur dort ."
    assert task.src_tok.vocab.itos[:4] == ["<pad>", "<unk>", "<s>", "</s>"]
    out = task.translate(["A man is walking in the park ."])
    assert isinstance(out[0].text, str)


def test_scheduled_sampling_logs_its_ratio(tmp_path):
    ckpt = train(tmp_path, train={"teacher_forcing": {"schedule": "linear", "start": 1.0, "end": 0.5, "steps": 4}})
    import json
    rows = [json.loads(x) for x in (ckpt.parent / "metrics.jsonl").read_text().splitlines()]
    ratios = [r["teacher_forcing"] for r in rows if r["kind"] == "train"]
    # records at steps 2, 4, 6 carry the ratio used by the last step of their window (0-based 1, 3, 5)
    assert ratios == pytest.approx([1.0 - 0.5 / 4, 1.0 - 0.5 * 3 / 4, 0.5])


def test_long_pairs_are_filtered_with_a_count(tmp_path):
    path = write_yaml(tmp_path / "t.yaml", translation_config(tmp_path, data={"max_len": 9}))
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 0
    assert "over data.max_len=9 tokens" in result.output


@pytest.mark.parametrize("problem,message", [
    ("unequal", "has 3 lines but"),
    ("empty", "file is empty"),
    ("bytes", "line 2: bytes are not valid UTF-8"),
])
def test_bad_parallel_data_is_a_clear_error(tmp_path, problem, message):
    src, tgt = tmp_path / "s.txt", tmp_path / "t.txt"
    src.write_bytes(b"a b\nc d\ne f\n")
    tgt.write_bytes({"unequal": b"x\ny\n", "empty": b"", "bytes": b"x\n\xff\xfe\nz\n"}[problem])
    cfg = translation_config(tmp_path, data={"train_src": str(src), "train_tgt": str(tgt)})
    result = runner.invoke(app, ["train", str(write_yaml(tmp_path / "t.yaml", cfg))])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run" / "last.pt").exists()


def test_dot_attention_size_mismatch_is_a_config_error(tmp_path):
    cfg = translation_config(tmp_path, model={"decoder": {"attention": "dot", "hidden_size": 20}})
    result = runner.invoke(app, ["train", str(write_yaml(tmp_path / "t.yaml", cfg))])
    assert result.exit_code == 2
    assert "model.decoder.hidden_size: dot attention needs it equal to the encoder's output size (32)" in result.output


def test_init_range_bounds_every_weight_and_keeps_padding_zero(tmp_path):
    from rnnkit.config import load_config
    from rnnkit.tasks.translation import build_model
    cfg = load_config(write_yaml(tmp_path / "t.yaml", translation_config(tmp_path, model={"init_range": 0.05})))
    model = build_model(cfg, 30, 40)
    assert all(p.abs().max() <= 0.05 for p in model.parameters())
    assert model.encoder.embedding.weight[0].abs().sum() == 0 and model.decoder.embedding.weight[0].abs().sum() == 0
    assert model.decoder.output.weight.std() > 0.02   # really drawn from the range, not zeros
