"""Multi-head attention in the translation decoder: one head is the model as it was, bit for
bit; several heads each give weights that sum to one over the real source positions."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rnnkit.cli import app
from rnnkit.config import load_config
from rnnkit.models.attention import Attention, MultiHeadAttention, make_attention
from tests.conftest import write_yaml
from tests.test_translation_task import translation_config

runner = CliRunner()


def _model(tmp_path, name: str, decoder: dict):
    from rnnkit.tasks.translation import build_model

    cfg = translation_config(tmp_path)
    cfg["model"]["decoder"].update(decoder)
    cfg = load_config(write_yaml(tmp_path / f"{name}.yaml", cfg))
    torch.manual_seed(0)
    return build_model(cfg, 40, 50)


@pytest.mark.parametrize("kind", ["general", "additive"])
def test_one_head_is_the_model_as_it_was(tmp_path, kind):
    before = _model(tmp_path, "before", {"attention": kind})           # a config that never names heads
    one = _model(tmp_path, "one", {"attention": kind, "attention_heads": 1})
    assert type(one.decoder.attention) is Attention                     # no projection of its own
    a, b = before.state_dict(), one.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    one.load_state_dict(a)                                               # a checkpoint from before loads
    src, lengths = torch.randint(4, 40, (3, 7)), torch.tensor([7, 5, 2])
    tgt = torch.randint(4, 50, (3, 6))
    before.eval(), one.eval()
    assert torch.equal(before(src, lengths, tgt), one(src, lengths, tgt))


@pytest.mark.parametrize("kind", ["dot", "general", "additive"])
def test_each_head_weighs_the_real_source_positions_to_one(kind):
    torch.manual_seed(1)
    att = make_attention(kind, 32, 24, heads=4)
    assert isinstance(att, MultiHeadAttention)
    memory = torch.randn(2, 5, 24)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    context, weights = att(torch.randn(2, 3, 32), att.keys(memory), memory, mask)
    assert context.shape == (2, 3, 24) and weights.shape == (2, 3, 4, 5)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 3, 4), atol=1e-6)
    assert torch.all(weights[1, :, :, 2:] == 0)                          # padding gets nothing
    assert not torch.allclose(weights[0, :, 0], weights[0, :, 1])       # the heads differ


@pytest.mark.parametrize("decoder,words", [
    ({"attention_heads": 3}, "3 heads must divide model.decoder.hidden_size (32)"),
    ({"attention_heads": 2, "attention": "none"}, "2 heads need an attention"),
    ({"attention_heads": 0}, "model.decoder.attention_heads"),
])
def test_heads_that_do_not_fit_are_one_line(tmp_path, decoder, words):
    cfg = translation_config(tmp_path)
    cfg["model"]["decoder"].update(decoder)
    result = runner.invoke(app, ["train", str(write_yaml(tmp_path / "bad.yaml", cfg))])
    assert result.exit_code == 2 and words in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_multi_head_model_translates_with_its_heads_and_plots_them(tmp_path):
    cfg = translation_config(tmp_path, train={"max_steps": 8, "eval_every": 8})
    cfg["model"]["decoder"].update(attention="general", attention_heads=4, cell="lstm")
    assert runner.invoke(app, ["train", str(write_yaml(tmp_path / "h.yaml", cfg))]).exit_code == 0
    import rnnkit

    model = rnnkit.load(tmp_path / "run" / "best.pt")
    for beam in (1, 3):
        t = model.translations(["A man is walking .", "A dog ."], beam=beam)[0]
        rows = len(t.tgt_tokens) + 1
        assert t.attention.shape == (rows, 5) and t.heads.shape == (4, rows, 5)
        assert np.allclose(t.heads.mean(0), t.attention) and np.allclose(t.heads.sum(-1), 1, atol=1e-5)
    plots = tmp_path / "plots"
    result = runner.invoke(app, ["translate", str(tmp_path / "run" / "best.pt"), "--attention-plots", str(plots),
                                 "--beam", "2"], input="A man is walking .\n")
    assert result.exit_code == 0 and [p.name for p in plots.iterdir()] == ["attention_00001.png"], result.output
    from rnnkit.serve.app import _translation

    served = _translation(t, attention=True)["attention"]
    assert np.allclose(served["weights"], t.attention, atol=1e-4)
    assert len(served["heads"]) == 4 and np.allclose(served["heads"], t.heads, atol=1e-4)
