"""The ONNX graphs of each exportable task, written with torch.onnx (its TorchScript exporter,
which keeps torch.nn's fused recurrent layers as ONNX LSTM, GRU and RNN operators)."""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from rnnkit.models.rnn import state_size


@contextlib.contextmanager
def exporting() -> Iterator[None]:
    """No gradients, and none of the exporter's notes on its own internals: its Python
    warnings, and the lines its C++ side writes straight to the process's stderr (about
    shape inference of packed sequences, which the graphs do not need)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


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
    layers, hidden = task.cfg.model.num_layers, state_size(model.rnn)   # a cell's memory rides beside h
    names = ["h", "c"] if lstm else ["h"]
    tokens = torch.zeros(2, 5, dtype=torch.long)
    state = tuple(torch.zeros(layers, 2, hidden) for _ in names)
    axes = {"tokens": {0: "batch", 1: "time"}, "log_probs": {0: "batch", 1: "time"}, "hidden": {0: "batch", 1: "time"},
            **{n: {1: "batch"} for n in names}, **{f"{n}_out": {1: "batch"} for n in names}}
    with exporting():
        torch.onnx.export(LanguageModelStep(model, lstm), (tokens, *state), str(folder / "lm_step.onnx"),
                          input_names=["tokens", *names], output_names=["log_probs", "hidden", *(f"{n}_out" for n in names)],
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
    return {"step": {"file": "lm_step.onnx", "inputs": ["tokens", *names],
                     "outputs": ["log_probs", "hidden", *(f"{n}_out" for n in names)],
                     "state_shape": [layers, hidden]}}


class ClassifierProbabilities(nn.Module):
    """words (B, L) and lengths (B,) -> label probabilities (B, C) (and attention weights (B, L),
    or (B, hops, L))."""

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
            **({"weights": {0: "batch", (2 if task.cfg.model.attention_hops > 1 else 1): "time"}} if attention else {})}
    with exporting():
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
    with exporting():
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
    with exporting():
        torch.onnx.export(Forecasts(task.model.eval()), (x,), str(folder / "forecaster.onnx"), input_names=["x"],
                          output_names=["forecasts"], dynamic_axes={"x": {0: "batch"}, "forecasts": {0: "batch"}},
                          opset_version=opset, dynamo=False)
    return {"forecast": {"file": "forecaster.onnx", "inputs": ["x"], "outputs": ["forecasts"]}}


def translator_state(cfg: Any) -> dict[str, int]:
    """The decoder state's arrays of a translation model, each with its batch axis: the
    recurrent state, the fed-back attentional vector, and what the decoder reads of the source."""
    d = cfg.model.decoder
    names = {"h": 1, **({"c": 1} if d.cell == "lstm" else {})}
    if d.attention == "none":
        return {**names, "context": 0}
    # several heads read their projected values from ``keys``: the states themselves are not needed
    memory = {"memory": 0} if d.attention_heads == 1 else {}
    return {**names, **({"feed": 0} if d.input_feeding else {}), **memory, "keys": 0, "mask": 0}


class TranslationEncoder(nn.Module):
    """Source ids (B, S) and lengths (B,) -> the decoder's first state (without ``feed``,
    which starts at zeros, and ``mask``, which the lengths give)."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, src: torch.Tensor, lengths: torch.Tensor):
        st = self.model.encode(src, lengths)
        h, c = st.rnn if isinstance(st.rnn, tuple) else (st.rnn, None)
        arrays = {"h": h, "c": c, "memory": st.memory, "keys": st.keys, "context": st.context}
        return tuple(arrays[n] for n in self.names)


class TranslationStep(nn.Module):
    """One decoder step for previous tokens (N,) and the state -> the ``k`` best next tokens'
    log-probabilities and ids (N, k; k is the length of the input ``k``), the log-probability
    of ``gold`` (N,; teacher-forced scoring), the attention weights (N, S) and the next state."""

    def __init__(self, model: nn.Module, state: list[str], attention: bool):
        super().__init__()
        self.decoder, self.state, self.attention = model.decoder, state, attention

    def forward(self, tokens: torch.Tensor, k: torch.Tensor, gold: torch.Tensor, *arrays: torch.Tensor):
        from rnnkit.models.seq2seq import DecoderState

        given = dict(zip(self.state, arrays))
        rnn = (given["h"], given["c"]) if "c" in given else given["h"]
        memory = given.get("memory", given.get("context"))
        st = DecoderState(rnn, given.get("feed"), memory, given.get("keys", memory), given.get("mask"),
                          given.get("context", memory))
        logits, st, weights = self.decoder.step(tokens, st)
        logp = torch.log_softmax(logits.float(), -1)
        values, index = logp.topk(k.size(0), -1)
        gold_logp = logp.gather(1, gold.unsqueeze(1)).squeeze(1)
        h, c = st.rnn if isinstance(st.rnn, tuple) else (st.rnn, None)
        new = {"h": h, "c": c, "feed": st.feed}
        return (values, index, gold_logp, *((weights.float(),) if self.attention else ()),
                *(new[n] for n in self.state if n in new))


def translator(task: Any, folder: Path, opset: int) -> dict[str, dict[str, Any]]:
    """``encoder.onnx`` (sources to the decoder's first state) and ``decoder_step.onnx`` (one
    step that takes and returns the state; the search runs outside, in numpy). Batch, source
    length and k are dynamic."""
    model, cfg = task.model.eval(), task.cfg
    d = cfg.model.decoder
    axes_of = translator_state(cfg)
    attention = d.attention != "none"
    enc_out = [n for n in axes_of if n not in ("feed", "mask")]
    if not attention:        # unused by the decoder, but the exporter fails on a packed layer's unused outputs
        enc_out.append("memory")
    src, lengths = torch.ones(2, 5, dtype=torch.long), torch.tensor([5, 3])
    src_axes = {"memory": {0: "batch", 1: "source"}, "keys": {0: "batch", 1: "source"},
                "mask": {0: "batch", 1: "source"}}
    state_axes = {n: {axis: "batch", **({1: "source"} if n in src_axes else {})} for n, axis in axes_of.items()}
    with exporting():
        torch.onnx.export(TranslationEncoder(model, enc_out), (src, lengths), str(folder / "encoder.onnx"),
                          input_names=["src", "lengths"], output_names=enc_out,
                          dynamic_axes={"src": {0: "batch", 1: "source"}, "lengths": {0: "batch"},
                                        **{n: state_axes.get(n, src_axes.get(n)) for n in enc_out}},
                          opset_version=opset, dynamo=False)
        example = dict(zip(enc_out, TranslationEncoder(model, enc_out)(src, lengths)))
        if "feed" in axes_of:
            example["feed"] = torch.zeros(2, d.hidden_size)
        if "mask" in axes_of:
            example["mask"] = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
        state = list(axes_of)
        returned = [n for n in state if n in ("h", "c", "feed")]
        outputs = ["top_logp", "top_ids", "gold_logp", *(["weights"] if attention else []),
                   *(f"{n}_out" for n in returned)]
        inputs = ["tokens", "k", "gold", *state]
        axes = {"tokens": {0: "batch"}, "k": {0: "k"}, "gold": {0: "batch"}, **state_axes,
                "top_logp": {0: "batch", 1: "k"}, "top_ids": {0: "batch", 1: "k"}, "gold_logp": {0: "batch"},
                "weights": {0: "batch", (2 if d.attention_heads > 1 else 1): "source"},   # (N, [heads,] S)
                **{f"{n}_out": state_axes[n] for n in returned}}
        tokens = torch.tensor([2, 2])
        torch.onnx.export(TranslationStep(model, state, attention),
                          (tokens, torch.zeros(3), torch.zeros(2, dtype=torch.long), *(example[n] for n in state)),
                          str(folder / "decoder_step.onnx"), input_names=inputs, output_names=outputs,
                          dynamic_axes={n: a for n, a in axes.items() if n in inputs or n in outputs},
                          opset_version=opset, dynamo=False)
    return {"encoder": {"file": "encoder.onnx", "inputs": ["src", "lengths"], "outputs": enc_out},
            "step": {"file": "decoder_step.onnx", "inputs": inputs, "outputs": outputs,
                     "state": axes_of, "returns": returned}}
