"""bf16 on CPU (training and inference) and int8 decoding: every task trains and resumes under
bf16; decoding keeps one output line per input line and stays close to fp32."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from rnnkit.cli import app
from rnnkit.config import load_config
from rnnkit.hardware import native_bf16
from rnnkit.runs import prepare_trainer
from tests.conftest import ROOT, write_yaml
from tests.test_crash_safety import task_config
from tests.test_translation_task import translation_config

runner = CliRunner()
SAMPLE = ROOT / "data" / "parallel"


@pytest.mark.parametrize("task", ["lm", "translation", "tagging", "classification", "forecast", "adding", "copy"])
def test_bf16_training_on_cpu_learns_and_resumes(tmp_path, task):
    cfg = task_config(task, tmp_path, "run")
    cfg["train"].update(precision="bf16", device="cpu")
    path = write_yaml(tmp_path / "c.yaml", cfg)
    prepare_trainer(load_config(path, ["train.max_steps=12"])).fit()
    prepare_trainer(load_config(path), resume=True).fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(3, 25, 3))
    assert all(torch.isfinite(torch.tensor(losses)))
    if task != "copy":            # the copy task needs far more than 24 steps to move
        assert losses[-1] < losses[0]
    weights = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    assert all(w.dtype == torch.float32 for w in weights.values() if w.is_floating_point())   # fp32 master weights


@pytest.fixture(scope="module")
def translator(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tr")
    cfg = translation_config(tmp)
    cfg["train"].update(max_steps=60, eval_every=60)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RNNKIT_CACHE", str(tmp / "cache"))
        result = runner.invoke(app, ["train", str(write_yaml(tmp / "t.yaml", cfg))])
    assert result.exit_code == 0, result.output
    return tmp / "run" / "best.pt"


@pytest.mark.parametrize("options", [["--precision", "bf16"], ["--int8"]])
def test_bf16_and_int8_decoding_keep_lines_and_stay_close_to_fp32(translator, options):
    src = (SAMPLE / "test.en").read_text().splitlines()[:60]
    text = "\n".join(src[:20] + [""] + src[20:]) + "\n"
    exact = runner.invoke(app, ["translate", str(translator), "--beam", "3"], input=text).stdout.split("\n")
    other = runner.invoke(app, ["translate", str(translator), "--beam", "3", *options], input=text).stdout.split("\n")
    assert len(other) == len(exact) == 62 and other[20] == "" and all(other[:20] + other[21:61])
    same = sum(a == b for a, b in zip(exact, other)) / len(exact)
    assert same >= 0.8, f"only {same:.0%} of lines agree with fp32"
    args = ["eval", str(translator), "--src", str(SAMPLE / "test.en"), "--ref", str(SAMPLE / "test.fr"), "--json"]
    fp32 = json.loads(runner.invoke(app, args).stdout)
    low = json.loads(runner.invoke(app, [*args, *options]).stdout)
    assert low["loss"] == pytest.approx(fp32["loss"], abs=0.05)     # nats per target token
    assert abs(low["bleu"] - fp32["bleu"]) <= 2.0


def test_int8_needs_a_cpu_and_precision_is_checked(translator):
    result = runner.invoke(app, ["translate", str(translator), "--precision", "fp16"], input="a cat\n")
    assert result.exit_code == 2 and "--precision must be fp32 or bf16" in result.output
    result = runner.invoke(app, ["translate", str(translator), "--precision", "bf16", "--int8"], input="a cat\n")
    assert result.exit_code == 2 and "do not combine" in result.output


def _eval_args(task: str, cfg: dict, ckpt) -> list[str]:
    args = ["eval", str(ckpt), "--json"]
    if task in ("tagging", "classification"):
        args += ["--data", cfg["data"]["valid"]]
    elif task in ("lm", "forecast"):
        args += ["--data", cfg["data"]["path"]]
    return args


@pytest.mark.parametrize("task", ["lm", "tagging", "classification", "forecast", "adding"])
def test_int8_quantises_recurrent_and_linear_layers_of_every_task(tmp_path, task):
    from rnnkit.cli.common import arithmetic as _arithmetic
    from rnnkit.runs import load_task

    cfg = task_config(task, tmp_path, "run")
    cfg["train"].update(max_steps=12, eval_every=12)
    prepare_trainer(load_config(write_yaml(tmp_path / "c.yaml", cfg))).fit()
    ckpt = tmp_path / "run" / "last.pt"
    loaded = load_task(str(ckpt), "cpu")
    with _arithmetic(loaded, "fp32", True):
        kinds = {type(m).__module__ for m in loaded.model.modules()}
    assert "torch.ao.nn.quantized.dynamic.modules.rnn" in kinds           # LSTM/GRU layers
    assert "torch.ao.nn.quantized.dynamic.modules.linear" in kinds
    fp32 = json.loads(runner.invoke(app, _eval_args(task, cfg, ckpt)).stdout)
    result = runner.invoke(app, [*_eval_args(task, cfg, ckpt), "--int8"])
    assert result.exit_code == 0, result.output
    int8 = json.loads(result.stdout)
    assert int8["loss"] == pytest.approx(fp32["loss"], rel=0.01)      # measured: within 0.2%


def test_allocator_tuning_applies_on_glibc_and_yields_to_the_user(monkeypatch):
    import sys

    from rnnkit.hardware import keep_freed_memory
    for key in [k for k in __import__("os").environ if k.startswith("MALLOC_")] + ["LD_PRELOAD"]:
        monkeypatch.delenv(key, raising=False)
    if sys.platform == "linux" and hasattr(__import__("ctypes").CDLL(None), "mallopt"):
        assert keep_freed_memory() is True
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")          # the user tunes malloc: leave it alone
    assert keep_freed_memory() is False



def test_the_kernel_cache_is_bounded_unless_the_user_sets_it(monkeypatch):
    from rnnkit.hardware import KERNEL_CACHE, bound_kernel_cache
    for key in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY"):
        monkeypatch.delenv(key, raising=False)
    assert bound_kernel_cache() is True
    assert __import__("os").environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(KERNEL_CACHE)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "1024")      # the user's choice stays
    assert bound_kernel_cache() is False
    assert __import__("os").environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "1024"


def test_kept_memory_is_handed_back_by_release(monkeypatch):
    """With keep_freed_memory, a freed block below a live one stays resident (a hole in the heap);
    release_freed_memory returns its pages to the system. Where malloc is not glibc's, neither
    applies and release does nothing."""
    import os

    import torch

    from rnnkit.hardware import keep_freed_memory, release_freed_memory
    for key in [k for k in os.environ if k.startswith("MALLOC_")] + ["LD_PRELOAD"]:
        monkeypatch.delenv(key, raising=False)
    if not keep_freed_memory():
        assert release_freed_memory() is False
        return

    def rss_mb() -> float:
        line = next(x for x in open("/proc/self/status") if x.startswith("VmRSS"))
        return int(line.split()[1]) / 1024

    hole = torch.ones(300 * 2**18)            # 300 MB, touched
    pin = torch.ones(1024)                    # allocated after it: the heap cannot shrink past it
    del hole
    kept = rss_mb()
    assert release_freed_memory() is True
    assert kept - rss_mb() > 200              # measured: the 300 MB go back
    del pin


def test_autocast_turns_onednn_off_only_where_its_bf16_lstm_is_missing(monkeypatch):
    """On an AVX2-only CPU oneDNN has no bf16 LSTM; rnnkit's autocast then runs torch's own
    kernels inside (and restores the flag after), elsewhere it is plain autocast."""
    from rnnkit import hardware

    before = torch.backends.mkldnn.enabled
    lstm = torch.nn.LSTM(4, 8, batch_first=True)
    monkeypatch.setattr(hardware, "onednn_bf16_lstm", lambda: False)
    with hardware.autocast("cpu", torch.bfloat16):
        assert torch.is_autocast_enabled("cpu") and not torch.backends.mkldnn.enabled
        out, _ = lstm(torch.randn(2, 3, 4))
        out.sum().backward()
    assert torch.backends.mkldnn.enabled == before and lstm.weight_hh_l0.grad is not None
    monkeypatch.setattr(hardware, "onednn_bf16_lstm", lambda: True)
    with hardware.autocast("cpu", torch.bfloat16):
        assert torch.is_autocast_enabled("cpu") and torch.backends.mkldnn.enabled == before


@pytest.mark.skipif(not native_bf16(),
                    reason="this CPU has no native bf16 (avx512_bf16 or amx_bf16): the probe's True case needs one")
def test_the_onednn_bf16_lstm_probe_is_true_where_the_cpu_has_native_bf16():
    """On a CPU with native bf16, oneDNN's bf16 LSTM builds, so autocast keeps oneDNN on: the
    probe saying otherwise would quietly send every bf16 LSTM to torch's slower kernels."""
    from rnnkit import hardware

    hardware.onednn_bf16_lstm.cache_clear()
    assert hardware.onednn_bf16_lstm() is True
    import torch

    with hardware.autocast("cpu", torch.bfloat16):
        assert torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
