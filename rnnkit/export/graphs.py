"""The ONNX graphs of each exportable task, written with torch.onnx (its TorchScript exporter,
which keeps torch.nn's fused recurrent layers as ONNX LSTM, GRU and RNN operators)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn


class LanguageModelStep(nn.Module):
    """tokens (B, T) and the recurrent state -> log-probabilities (B, T, V), the top layer's
    outputs (B, T, H; what the continuous cache reads) and the new state."""

    def __init__(self, model: nn.Module, lstm: bool):
        super().__init__()
        self.model, self.lstm = model, lstm

    def forward(self, tokens: torch.Tensor, *state: torch.Tensor):
        out, top, _, new = self.model.features(tokens, tuple(state) if self.lstm else state[0])
        new = new if self.lstm else (new,)
        return (self.model.log_probs(out), top.float(), *new)


def language_model(task: Any, folder: Path, opset: int) -> dict[str, dict[str, Any]]:
    """``lm_step.onnx``: one graph for scoring, sampling and incremental feeding; batch and
    length are dynamic."""
    model = task.model.eval()
    lstm = task.cfg.model.cell == "lstm"
    layers, hidden = task.cfg.model.num_layers, task.cfg.model.hidden_size
    names = ["h", "c"] if lstm else ["h"]
    tokens = torch.zeros(2, 5, dtype=torch.long)
    state = tuple(torch.zeros(layers, 2, hidden) for _ in names)
    axes = {"tokens": {0: "batch", 1: "time"}, "log_probs": {0: "batch", 1: "time"}, "hidden": {0: "batch", 1: "time"},
            **{n: {1: "batch"} for n in names}, **{f"{n}_out": {1: "batch"} for n in names}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")      # the exporter's notes on its own internals
        torch.onnx.export(LanguageModelStep(model, lstm), (tokens, *state), str(folder / "lm_step.onnx"),
                          input_names=["tokens", *names], output_names=["log_probs", "hidden", *(f"{n}_out" for n in names)],
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
    return {"step": {"file": "lm_step.onnx", "inputs": ["tokens", *names],
                     "outputs": ["log_probs", "hidden", *(f"{n}_out" for n in names)],
                     "state_shape": [layers, hidden]}}


class ClassifierProbabilities(nn.Module):
    """words (B, L) and lengths (B,) -> label probabilities (B, C) (and attention weights (B, L))."""

    def __init__(self, model: nn.Module, attention: bool):
        super().__init__()
        self.model, self.attention = model, attention

    def forward(self, words: torch.Tensor, lengths: torch.Tensor):
        logits, weights = self.model(words, lengths)
        probs = torch.softmax(logits.float(), -1)
        return (probs, weights) if self.attention else probs


def classifier(task: Any, folder: Path, opset: int) -> dict[str, dict[str, Any]]:
    """``classifier.onnx``: batch and sentence length are dynamic; the packed recurrent layers
    become ONNX recurrent operators with sequence lengths."""
    attention = task.cfg.model.pooling == "attention"
    outputs = ["probs", "weights"] if attention else ["probs"]
    words, lengths = torch.ones(2, 5, dtype=torch.long), torch.tensor([5, 3])
    axes = {"words": {0: "batch", 1: "time"}, "lengths": {0: "batch"}, "probs": {0: "batch"},
            **({"weights": {0: "batch", 1: "time"}} if attention else {})}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(ClassifierProbabilities(task.model.eval(), attention), (words, lengths),
                          str(folder / "classifier.onnx"), input_names=["words", "lengths"], output_names=outputs,
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
    return {"classify": {"file": "classifier.onnx", "inputs": ["words", "lengths"], "outputs": outputs}}


class TagScores(nn.Module):
    """words (B, L), lengths (B,) [and characters (B, L, W)] -> tag scores (B, L, T)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, words: torch.Tensor, lengths: torch.Tensor, chars: torch.Tensor | None = None):
        return self.model(words, lengths, chars).float()


def tagger(task: Any, folder: Path, opset: int) -> dict[str, dict[str, Any]]:
    """``tagger.onnx``: per-word tag scores (emissions of the CRF, which the runtime decodes);
    batch, sentence and word lengths are dynamic."""
    chars = task.cfg.model.char_encoder
    inputs = ["words", "lengths", *(["chars"] if chars else [])]
    example = (torch.ones(2, 5, dtype=torch.long), torch.tensor([5, 3]),
               *([torch.ones(2, 5, 4, dtype=torch.long)] if chars else []))
    axes = {"words": {0: "batch", 1: "time"}, "lengths": {0: "batch"}, "scores": {0: "batch", 1: "time"},
            **({"chars": {0: "batch", 1: "time", 2: "letters"}} if chars else {})}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(TagScores(task.model.eval()), example, str(folder / "tagger.onnx"), input_names=inputs,
                          output_names=["scores"], dynamic_axes=axes, opset_version=opset, dynamo=False)
    spec: dict[str, Any] = {"file": "tagger.onnx", "inputs": inputs, "outputs": ["scores"]}
    crf = task.model.crf
    if crf is not None:       # the CRF's parameters: Viterbi runs outside the graph
        spec["crf"] = {name: getattr(crf, name).detach().tolist() for name in ("transitions", "start", "end")}
    return {"tag": spec}


class Forecasts(nn.Module):
    """Standardised input windows (B, L, C) -> standardised forecasts (B, H, T)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return self.model(x).float()


def forecaster(task: Any, folder: Path, opset: int) -> dict[str, dict[str, Any]]:
    """``forecaster.onnx``: the batch is dynamic; the window's length is the config's."""
    d = task.cfg.data
    x = torch.zeros(2, d.input_length, len(task.columns))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Forecasts(task.model.eval()), (x,), str(folder / "forecaster.onnx"), input_names=["x"],
                          output_names=["forecasts"], dynamic_axes={"x": {0: "batch"}, "forecasts": {0: "batch"}},
                          opset_version=opset, dynamo=False)
    return {"forecast": {"file": "forecaster.onnx", "inputs": ["x"], "outputs": ["forecasts"]}}
