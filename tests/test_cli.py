from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rnnkit.cli import app
from tests.conftest import SAMPLE_TEXT, tiny_lm_config, write_yaml

runner = CliRunner()


@pytest.fixture
def trained(tmp_path, lm_config_file):
    result = runner.invoke(app, ["train", str(lm_config_file), "--set", "train.max_steps=10"])
    assert result.exit_code == 0, result.output
    return tmp_path / "run"


@pytest.mark.parametrize("command", ["train", "generate", "translate", "eval", "predict"])
def test_every_command_has_help_with_an_example(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output and "rnnkit" in result.output


def test_train_writes_run_directory(trained):
    assert (trained / "last.pt").is_file() and (trained / "best.pt").is_file()
    assert "max_steps: 10" in (trained / "config.yaml").read_text()
    kinds = {json.loads(line)["kind"] for line in (trained / "metrics.jsonl").read_text().splitlines()}
    assert kinds == {"train", "eval"}


def test_train_resume_extends_a_run(trained, lm_config_file):
    result = runner.invoke(app, ["train", str(lm_config_file), "--set", "train.max_steps=15", "--resume"])
    assert result.exit_code == 0, result.output
    steps = [json.loads(line)["step"] for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 15


def test_train_bad_config_is_one_line_exit_2(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", tiny_lm_config(tmp_path, model={"hidden": 3}))
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 2
    assert "model.hidden: unknown key (did you mean 'hidden_size'?)" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()   # nothing is created for a rejected config


def test_text_too_short_or_empty_names_its_file(tmp_path, trained):
    short = tmp_path / "short.txt"
    short.write_text("ab\ncd\n")
    cfg = tiny_lm_config(tmp_path, run_dir=str(tmp_path / "s"))
    cfg["data"] = {"train": str(short), "valid": str(SAMPLE_TEXT), "tokenizer": "char", "bptt": 16}
    path = write_yaml(tmp_path / "short.yaml", cfg)
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 2, result.output
    assert f"data.train ({short}): 6 tokens are too few to lay out as 8 streams" in result.output
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    result = runner.invoke(app, ["eval", str(trained / "best.pt"), "--data", str(empty)])
    assert result.exit_code == 2 and f"{empty}: file is empty" in result.output, result.output


def test_generate_streams_text_and_is_seeded(trained):
    args = ["generate", str(trained / "best.pt"), "--prime", "The", "--length", "40", "--seed", "3"]
    first, second = runner.invoke(app, args), runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert first.stdout == second.stdout and first.stdout.startswith("The")
    assert len(first.stdout) == len("The") + 40 + 1
    two = runner.invoke(app, args + ["--num-samples", "2"])
    assert two.stdout.count("\n") >= 2


@pytest.mark.parametrize("bad", [["--temperature", "0"], ["--temperature", "-1"], ["--top-p", "0"]])
def test_generate_rejects_bad_sampling_options(trained, bad):
    result = runner.invoke(app, ["generate", str(trained / "best.pt"), *bad])
    assert result.exit_code == 2
    assert "must be > 0" in result.output or "(0, 1]" in result.output


def test_eval_reports_json_metrics(trained):
    result = runner.invoke(app, ["eval", str(trained / "best.pt"), "--data", str(SAMPLE_TEXT), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert set(metrics) == {"loss", "ppl", "bpc", "tokens"} and metrics["tokens"] > 8000


def test_eval_table_and_missing_data(trained, tmp_path):
    table = runner.invoke(app, ["eval", str(trained / "best.pt"), "--data", str(SAMPLE_TEXT)])
    assert table.exit_code == 0 and "ppl" in table.stdout
    missing = runner.invoke(app, ["eval", str(trained / "best.pt"), "--data", str(tmp_path / "nope.txt")])
    assert missing.exit_code == 2 and "file not found" in missing.output


def _tiny_checkpoint_bytes(tmp_path) -> bytes:
    from rnnkit.training.checkpoint import save_checkpoint

    path = tmp_path / "whole.pt"
    save_checkpoint({"config": {"task": "lm"}, "model": {"w": torch.zeros(64, 64)}, "task": {}}, path)
    return path.read_bytes()


def test_broken_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint at all")
    result = runner.invoke(app, ["generate", str(bad)])
    assert result.exit_code == 2 and "not a readable rnnkit checkpoint" in result.output
    assert "not a PyTorch checkpoint file" in result.output and "torch" not in result.output.replace("PyTorch", "")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((trained_checkpoint_bytes := _tiny_checkpoint_bytes(tmp_path))[: len(trained_checkpoint_bytes) // 2])
    cut = runner.invoke(app, ["info", str(truncated)])
    assert cut.exit_code == 2 and "not a readable rnnkit checkpoint" in cut.output
    assert len(cut.output.strip().splitlines()) == 1 and "Weights only" not in cut.output
    gone = runner.invoke(app, ["eval", str(tmp_path / "none.pt"), "--data", str(SAMPLE_TEXT)])
    assert gone.exit_code == 2 and "checkpoint not found" in gone.output


def test_translate_refuses_a_language_model(trained):
    result = runner.invoke(app, ["translate", str(trained / "best.pt")], input="hello\n")
    assert result.exit_code == 2 and "checkpoint cannot translate" in result.output


def test_too_little_text_is_a_clear_error(trained, tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("a")
    result = runner.invoke(app, ["eval", str(trained / "best.pt"), "--data", str(tiny)])
    assert result.exit_code == 2 and "too few" in result.output


def test_python_dash_m_gives_one_line_usage_errors(tmp_path):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "rnnkit", "train", "--bogus"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "No such option" in res.stderr


def test_the_command_ends_without_teardown_yet_flushes_runs_atexit_and_keeps_the_exit_code(tmp_path):
    """run() ends the process with os._exit (skipping ~0.5 s of interpreter teardown once torch
    is imported); piped output must still arrive whole, atexit handlers run, codes kept."""
    import subprocess
    import sys

    script = ("import atexit, sys; atexit.register(lambda: sys.stdout.write('atexit ran\\n')); "
              "from rnnkit.cli import run; sys.argv = ['rnnkit'] + sys.argv[1:]; run()")
    root = Path(__file__).resolve().parents[1]
    ok = subprocess.run([sys.executable, "-c", script, "--help"], capture_output=True, text=True, cwd=root)
    assert ok.returncode == 0 and "translate" in ok.stdout and ok.stdout.endswith("atexit ran\n"), ok.stderr
    bad = subprocess.run([sys.executable, "-c", script, "translate", str(tmp_path / "none.pt"), "-i", "x"],
                         capture_output=True, text=True, cwd=root)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "checkpoint not found" in bad.stderr
    assert bad.stdout == "atexit ran\n"
