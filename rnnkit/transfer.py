"""Transfer from pretrained language models (ULMFiT-style initialisation).

``model.init_from: LM.pt`` starts a tagger's or classifier's word vectors and recurrent
layers from a word-level LM: each word of the task's vocabulary gets the LM's vector for the
same word (else the same word lowercased; words the LM lacks keep their fresh vectors), and
the LM's layers become the forward direction of the encoder's lowest layers
(``model.init_from_backward``: a backward LM's, ``data.reverse: true``, the backward
direction). An LM's own ``init_from`` copies the whole model and takes its vocabulary.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from rnnkit.config import ConfigError, load_config
from rnnkit.models.language_model import RNNLanguageModel, build_language_model
from rnnkit.models.lm_features import LMFeatures
from rnnkit.training.checkpoint import CheckpointError, load_checkpoint


def read_language_model(path: str, key: str, backward: bool | None = False,
                        tokenizer: str | None = "word") -> dict[str, Any]:
    """An LM checkpoint, checked for what ``key`` needs (its level and direction, where given);
    its config, vocabulary and model."""
    if not Path(path).is_file():
        raise ConfigError(key, f"file not found: {path!r}")
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as err:
        raise ConfigError(key, str(err)) from None
    cfg = ckpt["config"]
    if cfg.get("task") != "lm":
        raise ConfigError(key, f"{path} is a '{cfg.get('task')}' checkpoint; expected a language model (task lm)")
    if tokenizer is not None and cfg["data"].get("tokenizer") != tokenizer:
        need = "word vectors need a word-level one" if tokenizer == "word" else f"this LM is {tokenizer}-level"
        raise ConfigError(key, f"{path} is a {cfg['data'].get('tokenizer')}-level LM; {need} "
                               f"(data.tokenizer: {tokenizer})")
    if backward is not None and bool(cfg["data"].get("reverse")) != backward:
        want, got = ("backward", "forward") if backward else ("forward", "backward")
        raise ConfigError(key, f"{path} is a {got} LM (data.reverse: {str(not backward).lower()}); "
                               f"{key} needs a {want} one")
    return {"path": path, "config": cfg, "vocab": ckpt["task"]["vocab"], "model": ckpt["model"]}


SIZES = ("cell", "embedding_dim", "hidden_size")     # what an LM and the model it starts must share


def check_sizes(lm: dict[str, Any], path: str, key: str, section: Any, prefix: str = "model",
                names: tuple[str, ...] = SIZES) -> None:
    """The LM's cell, embedding and hidden sizes (``names``) must be the model's: one error naming both."""
    theirs = lm["config"]["model"]
    for name in names:
        if theirs.get(name) != getattr(section, name):
            raise ConfigError(key, f"{path} has {name} {theirs.get(name)!r}, this model {prefix}.{name} "
                                   f"{getattr(section, name)!r}; set {prefix}.{name}: {theirs.get(name)!r}")


def language_model(spec: dict[str, Any]) -> RNNLanguageModel:
    """The LM of a checkpoint's ``config`` and ``vocab``, with its weights where ``spec`` has them
    (a saved run's features carry theirs in the run's own weights)."""
    cfg = load_config(None, base=spec["config"])
    model = build_language_model(cfg.model, len(spec["vocab"]))
    if "model" in spec:
        model.load_state_dict(spec["model"])
    return model


def lm_word_vectors(lm: dict[str, Any]) -> torch.Tensor:
    """The LM's input vector of every word of its vocabulary (V, E)."""
    model = language_model(lm)
    with torch.no_grad():
        return model.embed(torch.arange(len(lm["vocab"]))).detach()


def copy_word_vectors(embedding: nn.Embedding, words: list[str], lm: dict[str, Any]) -> int:
    """Rows of ``embedding`` for ``words`` from the LM, matched by word, else lowercased. Returns
    how many words were found."""
    vectors = lm_word_vectors(lm)
    index = {w: i for i, w in enumerate(lm["vocab"])}
    lower: dict[str, int] = {}
    for i, w in enumerate(lm["vocab"]):     # most frequent form first
        lower.setdefault(w.lower(), i)
    found = 0
    with torch.no_grad():
        for row, word in enumerate(words):
            if word.startswith("<") and word.endswith(">"):     # <pad>, <unk>: the task's own
                continue
            i = index.get(word, lower.get(word.lower()))
            if i is not None:
                embedding.weight[row] = vectors[i]
                found += 1
    return found


def copy_recurrent_layers(rnn: nn.Module, lm: dict[str, Any], backward: bool = False, limit: int | None = None) -> int:
    """The LM's recurrent layers into one direction of ``rnn``'s lowest layers: weights of the
    same shape as they are; an input matrix wider than the LM's (a bidirectional layer's input
    holds both directions, a tagger's first layer also character vectors) takes the LM's
    columns where that direction's input lies. Above the first layer the other direction's
    columns start at zero (random ones would add noise as large as the LM's own signal to
    every pretrained layer); they get gradients and learn. ``limit``: copy at most this many
    layers from the bottom. Returns the number of layers copied."""
    state = {k[len("rnn."):]: v for k, v in lm["model"].items() if k.startswith("rnn.")}
    layers = lm["config"]["model"]["num_layers"]
    suffix = "_reverse" if backward else ""
    params = dict(rnn.named_parameters())
    copied = 0
    with torch.no_grad():
        for layer in range(min(layers, getattr(rnn, "num_layers", layers), layers if limit is None else limit)):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                source, target = state[f"{name}_l{layer}"], params[f"{name}_l{layer}{suffix}"]
                if source.shape == target.shape:
                    target.copy_(source)
                elif name == "weight_ih" and source.size(0) == target.size(0):
                    start = source.size(1) if backward and layer > 0 else 0
                    if layer > 0:      # the other direction's input starts with no say: the layer
                        target.zero_()  # computes what it computed in the LM, and learns the rest
                    target[:, start:start + source.size(1)] = source
                else:
                    raise ConfigError("model.init_from", f"layer {layer}'s {name} is {tuple(source.shape)} in the "
                                                         f"LM and {tuple(target.shape)} here")
            copied += 1
    return copied


def initialise_encoder(section: Any, embedding: nn.Embedding, words: list[str], rnn: nn.Module) -> list[str]:
    """A tagger's or classifier's ``model.init_from`` / ``model.init_from_backward``: word
    vectors (from the forward LM when both are given) and one direction of the recurrent
    layers from each (the lowest ``model.init_layers`` of them, where set; 0: word vectors only).
    Returns a line per LM saying what was copied."""
    notes = []
    limit = getattr(section, "init_layers", None)
    if limit is not None and section.init_from is None and section.init_from_backward is None:
        raise ConfigError("model.init_layers", "there is no model.init_from to copy layers from")
    for key, backward in (("init_from", False), ("init_from_backward", True)):
        path = getattr(section, key, None)
        if path is None:
            continue
        lm = read_language_model(path, f"model.{key}", backward)
        check_sizes(lm, path, f"model.{key}", section, names=("embedding_dim",) if limit == 0 else SIZES)
        found = None
        if not backward or section.init_from is None:
            found = copy_word_vectors(embedding, words, lm)
        layers = copy_recurrent_layers(rnn, lm, backward, limit)
        vectors = f"{found:,} of {len(words):,} word vectors and " if found is not None else ""
        notes.append(f"model.{key}: {vectors}{layers} recurrent layer(s) "
                     f"({'backward' if backward else 'forward'} direction) from {path}")
    return notes


def build_lm_features(section: Any, extras: dict[str, Any] | None, training: bool = False):
    """``model.lm_features`` of ``section`` (a task's model config): the frozen LMs of a new run,
    read from their checkpoints, or of a saved one, rebuilt from its ``extras`` (the weights then
    come with the model). None if unused. A ``training`` task keeps the features of the sentences
    it sees, up to ``lm_features_cache_mb``; inference keeps none."""
    paths, size, layers = section.lm_features, section.lm_features_size, section.lm_features_layers
    if size and not paths and extras is None:
        raise ConfigError("model.lm_features_size", "there are no model.lm_features to project")
    if layers != "top" and not paths and extras is None:
        raise ConfigError("model.lm_features_layers", "there are no model.lm_features to mix")
    if extras is not None:
        specs = extras.get("lm_features") or []
        if not specs:
            return None
        features = LMFeatures(specs, [language_model({k: s[k] for k in ("config", "vocab")}) for s in specs],
                              size, layers)
    elif paths:
        lms = [read_language_model(path, f"model.lm_features[{i}]", backward=None, tokenizer=None)
               for i, path in enumerate(paths)]      # word or character, either direction
        features = LMFeatures(lms, [language_model(lm) for lm in lms], size, layers)
        for i, module in enumerate(features.lms):
            if layers == "all" and not isinstance(module.rnn, nn.RNNBase):
                raise ConfigError(f"model.lm_features[{i}]", f"{paths[i]} has explicit recurrent layers "
                                  "(model.impl: explicit); model.lm_features_layers 'all' needs fused ones")
    else:
        return None
    features.use_cache(section.lm_features_cache_mb if training else 0)
    return features
