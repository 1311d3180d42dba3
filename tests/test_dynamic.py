"""Dynamic evaluation: a language model that takes a gradient step per segment as it reads
(Krause et al. 2018), from the command line and Python, never changing the checkpoint."""
from __future__ import annotations

import hashlib
import math

import pytest
import torch
from typer.testing import CliRunner

import rnnkit
from rnnkit.cli import app
from rnnkit.tasks import dynamic as dyn
from tests.conftest import SAMPLE_TEXT, tiny_lm_config, write_yaml

runner = CliRunner()
TEXT = SAMPLE_TEXT.read_text(encoding="utf-8")[:2500]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dynamic")
    cfg = tiny_lm_config(tmp, train={"max_steps": 15, "eval_every": 15})
    result = runner.invoke(app, ["train", str(write_yaml(tmp / "lm.yaml", cfg))])
    assert result.exit_code == 0, result.output
    return tmp / "run" / "best.pt"


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_zero_rate_scores_exactly_what_static_evaluation_does(lm):
    m = rnnkit.load(lm)
    bptt = m.task.cfg.data.bptt
    r = m.score(TEXT, streams=1, dynamic=dyn.Dynamic("sgd", 0.0, 0.0, segment=bptt))
    assert r["dynamic_loss"] == r["loss"] and r["dynamic_skipped"] == 0
    r = m.score(TEXT, streams=1, dynamic=dyn.Dynamic("sgd", 0.05, 0.0, segment=bptt))     # and a rate changes it
    assert r["dynamic_loss"] != r["loss"]
    assert m.score(TEXT, streams=1)["loss"] == r["loss"]          # the weights are as loaded again
    # each segment is predicted before the model learns from it: one segment scores as static
    one = TEXT[:bptt + 1]
    ids = torch.tensor([m.task.encode(one)])
    adapter = dyn.Adapter(m.task.model, dyn.Dynamic("sgd", 5.0), None)
    loss, tokens, _ = dyn.dynamic_loss(m.task, ids, adapter, bptt)
    adapter.reset()
    with torch.no_grad():
        static, count = m.task.stream_loss(ids)
    assert tokens == count == bptt and loss == pytest.approx(static, abs=1e-6)


def test_one_step_is_the_rule_computed_by_hand(lm):
    m = rnnkit.load(lm)
    model = m.task.model
    torch.manual_seed(0)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    stats = {n: torch.rand_like(p) * 0.1 + 1e-3 for n, p in model.named_parameters() if p.requires_grad}
    stats[names[0]] *= 50                                  # some ratios past 1/lambda: the clip applies
    settings = dyn.Dynamic("rms", lr=0.01, decay=0.3, eps=0.001, segment=6)
    adapter = dyn.Adapter(model, settings, stats)          # theta_0: the weights as loaded
    with torch.no_grad():                                  # away from theta_0, so the pull back shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.tensor([m.task.encode(TEXT[:7])])
    model.eval()
    model.zero_grad()
    out, _, _, _ = model.features(ids[:, :6])
    (model.loss(out, ids[:, 1:7], reduction="sum") / 6).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    adapter.update()
    mean = sum(float(s.sum()) for s in stats.values()) / sum(s.numel() for s in stats.values())
    for n, p in model.named_parameters():
        rms = stats[n]
        pull = settings.decay * torch.clamp(rms / mean, max=1 / settings.decay)
        want = before[n] - 0.01 * grads[n] / (rms + 0.001) + pull * (adapter.start[n] - before[n])
        assert torch.allclose(p.detach(), want, atol=1e-7), n
    assert names and any((rms / mean > 1 / settings.decay).any() for rms in stats.values())   # the clip is exercised
    # sgd: theta - eta * g + lambda * (theta_0 - theta)
    adapter.reset()
    sgd = dyn.Adapter(model, dyn.Dynamic("sgd", lr=0.5, decay=0.1), None)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
            p.grad = torch.full_like(p, 2.0)
    sgd.update()
    for n, p in model.named_parameters():
        assert torch.allclose(p.detach(), sgd.start[n] + 0.05 - 0.5 * 2.0 + 0.1 * -0.05, atol=1e-6), n


def test_the_cli_keeps_the_checkpoint_and_its_statistics_beside_it(lm, tmp_path):
    before = _digest(lm)
    stats = lm.with_name(lm.name + dyn.STATS_SUFFIX)
    data = tmp_path / "text.txt"
    data.write_text(TEXT, encoding="utf-8")
    args = ["eval", str(lm), "--data", str(data), "--streams", "1", "--dynamic", "--json"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert _digest(lm) == before and stats.is_file()
    import json

    r = json.loads(first.stdout)
    assert {"ppl", "dynamic_ppl", "static_seconds", "dynamic_seconds"} <= set(r) and math.isfinite(r["dynamic_ppl"])
    written = stats.stat().st_mtime_ns
    again = runner.invoke(app, args)                         # reused, not recomputed
    assert again.exit_code == 0 and stats.stat().st_mtime_ns == written
    assert json.loads(again.stdout)["dynamic_ppl"] == r["dynamic_ppl"]
    # generation adapts to its prime and leaves the weights as they were
    m = rnnkit.load(lm)
    weights = {n: p.detach().clone() for n, p in m.task.model.named_parameters()}
    plain = m.generate(TEXT[:200], 40, seed=3)
    with m.adapted(TEXT[:200], dyn.Dynamic("sgd", 0.5)):
        adapted = m.generate(TEXT[:200], 40, seed=3)
    assert adapted != plain
    assert all(torch.equal(p, weights[n]) for n, p in m.task.model.named_parameters())
    assert m.generate(TEXT[:200], 40, seed=3) == plain
    assert _digest(lm) == before


def test_the_statistics_come_from_as_many_streams_as_the_text_is_read_in(lm, monkeypatch):
    """The mean squared gradient depends on how many streams share a segment's gradient:
    statistics from another layout gave steps as large as the weights. Each layout is kept."""
    m = rnnkit.load(lm)
    path = lm.with_name(lm.name + dyn.STATS_SUFFIX)
    path.unlink(missing_ok=True)
    seen, real = [], dyn.gradient_stats
    monkeypatch.setattr(dyn, "gradient_stats", lambda task, stream, *a, **k: seen.append(stream.size(0)) or
                        real(task, stream, *a, **k))
    settings = dyn.Dynamic(stats_tokens=3000)
    one = dyn.stats_beside(m.task, lm, settings, m.task.training_ids, 1)
    three = dyn.stats_beside(m.task, lm, settings, m.task.training_ids, 3)
    assert seen == [1, 3]
    # more rows average more tokens per segment: smaller mean squared gradients
    assert sum(float(s.sum()) for s in three.values()) < sum(float(s.sum()) for s in one.values())
    again = dyn.stats_beside(m.task, lm, settings, m.task.training_ids, 1)      # both kept, neither recomputed
    assert seen == [1, 3] and all(torch.equal(again[n], one[n]) for n in one)
    path.unlink()


@pytest.mark.parametrize("extra,message", [
    (["--dynamic-lr", "-1"], "--dynamic-lr must be a finite number >= 0"),
    (["--dynamic-lr", "nan"], "--dynamic-lr must be a finite number >= 0"),
    (["--dynamic-rule", "adam"], "--dynamic-rule must be one of rms, sgd"),
    (["--dynamic-decay", "inf"], "--dynamic-decay must be a finite number >= 0"),
])
def test_bad_dynamic_options_are_one_line(lm, tmp_path, extra, message):
    data = tmp_path / "text.txt"
    data.write_text(TEXT, encoding="utf-8")
    result = runner.invoke(app, ["eval", str(lm), "--data", str(data), "--dynamic", *extra])
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1


def test_dynamic_on_a_model_that_is_not_a_language_model_is_one_line(tmp_path):
    from tests.test_forecast import seasonal_series, write_csv
    from tests.test_forecast import train as train_forecaster

    series = write_csv(tmp_path / "s.csv", seasonal_series(600))
    train_forecaster(tmp_path, series, train={"max_steps": 2, "eval_every": 2})
    result = runner.invoke(app, ["eval", str(tmp_path / "run" / "best.pt"), "--data", str(series), "--dynamic"])
    assert result.exit_code == 2 and "--dynamic is for language models" in result.output
