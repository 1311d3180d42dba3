"""Contextual word features from frozen language models (Flair's "contextual string
embeddings", Akbik et al. 2018, generalised to word LMs).

Each LM reads the sentence on its own from a zero state, in its direction (a backward LM,
trained with ``data.reverse``, reads it right to left), and each word gets the LM's top-layer
state where the LM has just read it: for a word LM, after the word; for a character LM,
after the word's last character (forward) or first character (backward). The states of all
LMs are concatenated. With ``layers="all"`` (ELMo's scalar mix, Peters et al. 2018) each LM
gives instead a learned weighted sum of its layers: a word LM's vector for the word and every
recurrent layer's output at that position (a character LM's recurrent layers only), weighted
by a softmax over one learned scalar per layer and scaled by a learned factor; lower layers
hold more syntax, upper ones more of what the LM predicts. The LMs are frozen: no gradient
reaches them and they stay in evaluation mode (no dropout), so a word in the same sentence
always gets the same features.

That makes them worth keeping: with a cache (``cache_mb`` > 0, as training runs set it from
``model.lm_features_cache_mb``) each distinct sentence is read by the LMs once, and every
later epoch and evaluation takes its features from memory (Flair keeps its embeddings the same
way). The least recently used sentences go first when the cache is full.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, NamedTuple, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from rnnkit.data.vocab import EOS
from rnnkit.models.rnn import make_rnn

LMInput = tuple[list[int], list[int]]     # one LM's token ids for a sentence, and each word's position


_TEMPLATES: dict[tuple, nn.Module] = {}    # one-layer recurrent modules whose forward runs an LM's layer


class LMBatch(NamedTuple):
    """A collated batch: per LM, padded ids (B, S) and word positions (B, L); per sentence, its
    key (every LM's ids) and word count; per LM, each sentence's id count."""
    inputs: list[tuple[torch.Tensor, torch.Tensor]]
    keys: list[tuple]
    words: list[int]
    id_lengths: list[list[int]]


class LMFeatures(nn.Module):
    """``specs``: per LM its checkpoint's ``config`` and ``vocab`` (what ``extras`` keeps);
    ``lms``: those LMs, built (by the task layer, which reads checkpoints).
    ``size``: a trained linear map of the concatenated states down to this width (Flair's
    re-projection; the frozen states are kept, their projection computed every time).
    ``layers``: ``top`` (each LM's top layer) or ``all`` (a learned mix of its layers; the
    cache then keeps every layer and the mix is computed every time)."""

    def __init__(self, specs: Sequence[dict[str, Any]], lms: Sequence[nn.Module], size: int | None = None,
                 layers: str = "top"):
        super().__init__()
        self.specs = [{"config": s["config"], "vocab": list(s["vocab"])} for s in specs]
        self.lms = nn.ModuleList(lms)
        self.lms.requires_grad_(False)
        self._index = [{w: i for i, w in enumerate(s["vocab"])} for s in self.specs]
        if layers not in ("top", "all"):
            raise ValueError(f"layers must be 'top' or 'all', not {layers!r}")
        self.layers = layers
        sizes = [s["config"]["model"]["hidden_size"] for s in self.specs]
        # tensors per LM: the top layer's output; or the word vector (a word LM's, where it is as
        # wide as the layers) and every layer's output
        self.depths = [1 if layers == "top" else self._mixable(s) for s in self.specs]
        self.state_size = sum(d * h for d, h in zip(self.depths, sizes))    # what the cache keeps
        if layers == "all":
            self.mix = nn.Parameter(torch.zeros(len(self.specs), max(self.depths)))   # softmax: equal weights first
            self.scale = nn.Parameter(torch.ones(len(self.specs)))
        self.projection = nn.Linear(sum(sizes), size) if size else None
        self.output_size = size or sum(sizes)
        self.cache_mb = 0.0
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._cache_bytes = 0
        self.hits = self.misses = 0

    @staticmethod
    def _mixable(spec: dict[str, Any]) -> int:
        """How many tensors an LM gives with ``layers="all"``."""
        m = spec["config"]["model"]
        word_vector = spec["config"]["data"]["tokenizer"] == "word" and m["embedding_dim"] == m["hidden_size"]
        return m["num_layers"] + word_vector

    def use_cache(self, megabytes: float) -> None:
        """Keep up to ``megabytes`` of features (0: none) for the sentences seen."""
        self.cache_mb = float(megabytes)
        self._evict()

    def _evict(self) -> None:
        limit = self.cache_mb * 2 ** 20
        while self._cache and self._cache_bytes > limit:
            _, t = self._cache.popitem(last=False)
            self._cache_bytes -= t.numel() * t.element_size()

    def train(self, mode: bool = True) -> "LMFeatures":
        super().train(mode)
        self.lms.eval()       # frozen: never dropout
        return self

    def encode(self, words: Sequence[str]) -> list[LMInput]:
        """Every LM's input ids for the sentence ``words`` and each word's position in them."""
        out = []
        for spec, index in zip(self.specs, self._index):
            data = spec["config"]["data"]
            backward, unk = bool(data.get("reverse")), index.get("<unk>", 0)
            if data["tokenizer"] == "word":
                order = list(reversed(words)) if backward else list(words)
                ids = [index.get(EOS, unk)] + [index.get(w, unk) for w in order]
                n = len(words)
                positions = [n - i for i in range(n)] if backward else [i + 1 for i in range(n)]
            else:
                # the sentence as a line of the LM's training text, read from a line break to the
                # next: a backward LM then sees "\n" + the line reversed + "\n", as it was trained
                text, starts, ends, at = "\n" + " ".join(words) + "\n", [], [], 1
                for w in words:
                    starts.append(at)
                    ends.append(at + len(w) - 1)
                    at += len(w) + 1
                ids = [index.get(c, unk) for c in (text[::-1] if backward else text)]
                last = len(text) - 1
                positions = [last - s for s in starts] if backward else ends
            out.append((ids, positions))
        return out

    def collate(self, items: Sequence[list[LMInput]], device: torch.device) -> LMBatch:
        """A batch of encoded sentences (see :class:`LMBatch`)."""
        batch = []
        for k in range(len(self.specs)):
            ids = [item[k][0] for item in items]
            pos = [item[k][1] for item in items]
            x = torch.zeros(len(items), max(map(len, ids)), dtype=torch.long)
            p = torch.zeros(len(items), max(1, max(map(len, pos))), dtype=torch.long)
            for i, (a, b) in enumerate(zip(ids, pos)):
                x[i, :len(a)] = torch.as_tensor(a)
                p[i, :len(b)] = torch.as_tensor(b)
            batch.append((x.to(device), p.to(device)))
        keys = [tuple(tuple(ids) for ids, _ in item) for item in items]
        return LMBatch(batch, keys, [len(item[0][1]) for item in items],
                       [[len(item[k][0]) for item in items] for k in range(len(self.specs))])

    def forward(self, batch: LMBatch, width: int) -> torch.Tensor:
        """Features (B, width, D) of the collated batch (positions past a sentence are zeros,
        before the projection)."""
        states = self.states(batch, width)
        if self.layers == "all":
            mixed, at = [], 0
            for k, (depth, lm) in enumerate(zip(self.depths, self.lms)):
                size = lm.rnn.hidden_size
                stack = states[..., at:at + depth * size].unflatten(-1, (depth, size))
                weights = torch.softmax(self.mix[k, :depth], 0) * self.scale[k]
                mixed.append(torch.einsum("bwdh,d->bwh", stack, weights.to(stack.dtype)))
                at += depth * size
            states = torch.cat(mixed, -1)
        return states if self.projection is None else self.projection(states)

    @torch.no_grad()
    def states(self, batch: LMBatch, width: int) -> torch.Tensor:
        """The LMs' concatenated states (B, width, sum of their sizes), from the cache where kept."""
        if self.cache_mb <= 0:
            return self._compute(batch.inputs, width, batch.words)
        cache = self._cache
        missing = [i for i, key in enumerate(batch.keys) if key not in cache]
        self.misses += len(missing)
        self.hits += len(batch.keys) - len(missing)
        if missing:
            rows = torch.as_tensor(missing, device=batch.inputs[0][0].device)
            inputs = [(ids.index_select(0, rows)[:, :max(lengths[i] for i in missing)], pos.index_select(0, rows))
                      for (ids, pos), lengths in zip(batch.inputs, batch.id_lengths)]
            found = self._compute(inputs, max(batch.words[i] for i in missing), [batch.words[i] for i in missing])
            for j, i in enumerate(missing):
                if batch.keys[i] in cache:           # the same sentence twice in one batch
                    continue
                t = found[j, :batch.words[i]].clone()
                cache[batch.keys[i]] = t
                self._cache_bytes += t.numel() * t.element_size()
        out = torch.zeros(len(batch.keys), width, self.state_size, device=batch.inputs[0][0].device)
        for i, key in enumerate(batch.keys):
            t = cache[key][:width]
            cache.move_to_end(key)
            out[i, :t.size(0)] = t
        self._evict()
        return out

    def _compute(self, batch: list[tuple[torch.Tensor, torch.Tensor]], width: int, words: list[int]) -> torch.Tensor:
        parts = []
        for lm, depth, (ids, positions) in zip(self.lms, self.depths, batch):
            hidden = lm.features(ids).hidden if self.layers == "top" else self._all_layers(lm, depth, ids)
            take = positions[:, :width]
            take = F.pad(take, (0, width - take.size(1))).unsqueeze(-1).expand(-1, -1, hidden.size(-1))
            parts.append(hidden.gather(1, take))
        real = torch.arange(width, device=ids.device) < torch.as_tensor(words, device=ids.device).unsqueeze(1)
        return torch.cat(parts, -1).float() * real.unsqueeze(-1)

    @staticmethod
    def _all_layers(lm: nn.Module, depth: int, ids: torch.Tensor) -> torch.Tensor:
        """(B, S, depth * H): the word vectors (where mixed) and each layer's output, in that order.
        The layers run one at a time with the LM's own weights (a one-layer template of the same
        kind; its own parameters are never used)."""
        from torch.func import functional_call

        rnn = lm.rnn
        if not isinstance(rnn, nn.RNNBase):
            raise ValueError("model.lm_features_layers 'all' needs LMs with fused classic layers (model.impl: fused, "
                             "cell rnn_tanh, rnn_relu, lstm or gru); 'top' reads any LM")
        cell = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}[rnn.mode]
        x = lm.embed(ids)
        outs = [x] if depth > rnn.num_layers else []
        for layer in range(rnn.num_layers):
            key = (cell, x.size(-1), rnn.hidden_size, x.device)
            template = _TEMPLATES.get(key) or _TEMPLATES.setdefault(key, make_rnn(*key[:3]).to(x.device))
            weights = {name.replace(f"_l{layer}", "_l0"): getattr(rnn, name)
                       for name in rnn._flat_weights_names if name.endswith(f"_l{layer}")}
            x, _ = functional_call(template, weights, (x,))
            outs.append(x)
        return torch.cat(outs, -1)
