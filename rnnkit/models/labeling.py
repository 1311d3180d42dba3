"""Bidirectional recurrent encoders that label: a tag per word, a label per sentence.

Sentences arrive padded (id 0) with their lengths; the recurrent layer reads them as if
packed (:func:`rnnkit.models.rnn.run_padded`), so padding never reaches a state. A word may
also be read letter by letter: a character-level bidirectional LSTM turns its spelling into
a vector, which gives unseen and rare words a representation of their own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.models.crf import CRF
from rnnkit.models.dropout import Dropout
from rnnkit.models.rnn import length_mask, make_rnn, run_padded, stack_groups, state_output


class SentenceEncoder(nn.Module):
    """Word vectors (B, L, D) -> bidirectional recurrent layer -> states (B, L, 2H)."""

    def __init__(self, input_size: int, cell: str, hidden_size: int, num_layers: int, dropout: float,
                 rnn_options: dict | None = None):
        super().__init__()
        self.rnn = make_rnn(cell, input_size, hidden_size, num_layers, dropout, True, **(rnn_options or {}))
        self.output_size = 2 * hidden_size

    def forward(self, x: torch.Tensor, lengths: torch.Tensor):
        """-> states (B, L, 2H) (zero on padding) and the top layer's final states (B, 2H)."""
        out, final = run_padded(self.rnn, x, lengths)
        h = state_output(self.rnn, final)
        return out, torch.cat([h[-2], h[-1]], -1)     # forward's last token, backward's first


class CharEncoder(nn.Module):
    """Each distinct word's characters -> a forward and a backward LSTM -> their final states.

    The backward LSTM reads each word reversed within its own length, so both run on plain
    padded batches (the fused kernels' fast path, no packing) and each final state is read
    at the word's own last character."""

    def __init__(self, num_chars: int, embedding_dim: int, hidden_size: int):
        super().__init__()
        self.embedding = nn.Embedding(num_chars, embedding_dim, padding_idx=0)
        self.forward_rnn = nn.LSTM(embedding_dim, hidden_size, batch_first=True)
        self.backward_rnn = nn.LSTM(embedding_dim, hidden_size, batch_first=True)
        self.output_size = 2 * hidden_size

    def forward(self, chars: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``chars`` (B, L, C) character ids, 0 after each word's end -> (B, L, 2H); only real
        words (``mask``) are read, each distinct spelling once."""
        spellings, which = torch.unique(chars[mask], dim=0, return_inverse=True)
        lengths = (spellings != 0).sum(1).clamp(min=1)
        steps = torch.arange(spellings.size(1), device=chars.device).unsqueeze(0)
        reverse = torch.where(steps < lengths.unsqueeze(1), lengths.unsqueeze(1) - 1 - steps, steps)
        rows, last = torch.arange(spellings.size(0), device=chars.device), lengths - 1
        x = self.embedding(spellings)
        ahead = self.forward_rnn(x)[0][rows, last]
        back = self.backward_rnn(x.gather(1, reverse.unsqueeze(-1).expand_as(x)))[0][rows, last]
        vectors = torch.cat([ahead, back], -1)
        out = vectors.new_zeros(*mask.shape, self.output_size)
        out[mask] = vectors[which]
        return out


class Tagger(nn.Module):
    """Word embeddings (+ character vectors) -> bidirectional RNN -> a score per tag per word,
    read by a softmax per word or by a linear-chain CRF."""

    def __init__(self, num_words: int, num_tags: int, embedding_dim: int, cell: str, hidden_size: int,
                 num_layers: int, dropout: float, chars: tuple[int, int, int] | None, crf: bool,
                 rnn_options: dict | None = None, lm_features: nn.Module | None = None):
        super().__init__()
        self.embedding = nn.Embedding(num_words, embedding_dim, padding_idx=0)
        self.chars = CharEncoder(*chars) if chars else None
        self.lm = lm_features        # frozen LMs' states per word (rnnkit.models.lm_features), if any
        width = embedding_dim + (self.chars.output_size if self.chars else 0) + (self.lm.output_size if self.lm else 0)
        self.encoder = SentenceEncoder(width, cell, hidden_size, num_layers, dropout, rnn_options)
        self.dropout = Dropout(dropout)
        self.output = nn.Linear(self.encoder.output_size, num_tags)
        self.crf = CRF(num_tags) if crf else None

    def forward(self, words: torch.Tensor, lengths: torch.Tensor, chars: torch.Tensor | None = None,
                lm: list | None = None) -> torch.Tensor:
        """Tag scores (B, L, T); ``lm``: the LM features' collated inputs."""
        mask = length_mask(lengths, words.size(1))
        x = self.embedding(words)
        if self.chars is not None:
            x = torch.cat([x, self.chars(chars, mask)], -1)
        if self.lm is not None:
            x = torch.cat([x, self.lm(lm, words.size(1)).to(x.dtype)], -1)
        states, _ = self.encoder(self.dropout(x), lengths)
        return self.output(self.dropout(states))

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Input to output: word and character vectors, each recurrent layer, the tag scorer."""
        return stack_groups([self.embedding, self.chars, self.lm], self.encoder.rnn, [self.output, self.crf])

    def loss(self, scores: torch.Tensor, tags: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Mean loss per word: cross-entropy, or the CRF's negative log-likelihood."""
        mask = length_mask(lengths, tags.size(1))
        if self.crf is not None:
            return self.crf.nll(scores, tags, mask).sum() / mask.sum()
        return F.cross_entropy(scores[mask].float(), tags[mask])

    def decode(self, scores: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
        if self.crf is not None:
            return self.crf.decode(scores, length_mask(lengths, scores.size(1)))
        best = scores.argmax(-1).tolist()
        return [row[:n] for row, n in zip(best, lengths.tolist())]


def hop_penalty(weights: torch.Tensor) -> torch.Tensor:
    """Lin et al.'s penalty on attention hops (B, R, L): the batch mean of ||A A^T - I||_F^2,
    zero when the hops attend to disjoint words with all their weight, larger the more they
    overlap or spread."""
    gram = torch.bmm(weights, weights.transpose(1, 2))
    eye = torch.eye(weights.size(1), device=weights.device, dtype=weights.dtype)
    return ((gram - eye) ** 2).sum((1, 2)).mean()


class AttentionPooling(nn.Sequential):
    """States (B, L, D) -> ``hops`` weighted means concatenated (B, hops * D), and the weights
    (B, L) for one hop, (B, hops, L) for several: ``softmax(W2 tanh(W1 h))`` per hop (Lin et
    al.'s structured self-attention; one hop is the single-vector attention pooling, with the
    parameter names it always had)."""

    def __init__(self, size: int, hops: int = 1):
        super().__init__(nn.Linear(size, size), nn.Tanh(), nn.Linear(size, hops, bias=False))
        self.hops = hops
        self.output_size = size * hops

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self[2](self[1](self[0](states)))                         # (B, L, hops)
        if self.hops == 1:
            weights = torch.softmax(scores.squeeze(-1).masked_fill(~mask, float("-inf")).float(), -1)
            return torch.bmm(weights.unsqueeze(1).to(states.dtype), states).squeeze(1), weights
        scores = scores.transpose(1, 2).masked_fill(~mask.unsqueeze(1), float("-inf"))
        weights = torch.softmax(scores.float(), -1)                          # (B, hops, L)
        return torch.bmm(weights.to(states.dtype), states).flatten(1), weights


class SentenceClassifier(nn.Module):
    """Word embeddings -> bidirectional RNN -> pooled over words -> a score per label.

    Pooling: ``final`` (the forward direction's last state and the backward's first),
    ``mean`` or ``max`` over the words, or ``attention`` (learned weighted means, ``hops``
    of them, whose weights can be shown per word)."""

    def __init__(self, num_words: int, num_labels: int, embedding_dim: int, cell: str, hidden_size: int,
                 num_layers: int, dropout: float, pooling: str, rnn_options: dict | None = None,
                 lm_features: nn.Module | None = None, hops: int = 1):
        super().__init__()
        self.embedding = nn.Embedding(num_words, embedding_dim, padding_idx=0)
        self.lm = lm_features        # frozen LMs' states per word (rnnkit.models.lm_features), if any
        width = embedding_dim + (self.lm.output_size if self.lm else 0)
        self.encoder = SentenceEncoder(width, cell, hidden_size, num_layers, dropout, rnn_options)
        self.dropout = Dropout(dropout)
        self.pooling = pooling
        size = self.encoder.output_size
        self.attention = AttentionPooling(size, hops) if pooling == "attention" else None
        self.output = nn.Linear(self.attention.output_size if self.attention else size, num_labels)

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Input to output: word vectors, each recurrent layer, pooling and the label scorer."""
        return stack_groups([self.embedding, self.lm], self.encoder.rnn, [self.attention, self.output])

    def forward(self, words: torch.Tensor, lengths: torch.Tensor, lm: list | None = None):
        """-> label scores (B, C) and, with attention pooling, the weights (B, L) (several
        hops: (B, hops, L)) (else None); ``lm``: the LM features' collated inputs."""
        mask = length_mask(lengths, words.size(1))
        x = self.embedding(words)
        if self.lm is not None:
            x = torch.cat([x, self.lm(lm, words.size(1)).to(x.dtype)], -1)
        states, final = self.encoder(self.dropout(x), lengths)
        return self.pool(states, final, mask, lengths)

    def pool(self, states: torch.Tensor, final: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor):
        """Word states (B, L, D) -> label scores (B, C) and attention weights (or None)."""
        weights = None
        if self.pooling == "final":
            pooled = final
        elif self.pooling == "mean":
            pooled = states.sum(1) / lengths.unsqueeze(1).to(states.dtype)
        elif self.pooling == "max":
            pooled = states.masked_fill(~mask.unsqueeze(-1), float("-inf")).max(1).values
        else:
            pooled, weights = self.attention(states, mask)
        return self.output(self.dropout(pooled)), weights


class HierarchicalClassifier(nn.Module):
    """Yang et al.'s hierarchical attention network: each sentence's words -> a bidirectional
    word encoder -> word attention -> the sentence's vector; the document's sentence vectors
    -> a bidirectional sentence encoder -> sentence attention -> the document's vector -> a
    score per label.

    Documents arrive padded at both levels: words (B, S, L), the words of each sentence (B, S)
    and the sentences of each document (B,). Real sentences are read together, packed, so
    neither level's padding reaches a state or a weight."""

    def __init__(self, num_words: int, num_labels: int, embedding_dim: int, cell: str, hidden_size: int,
                 num_layers: int, dropout: float, rnn_options: dict | None = None):
        super().__init__()
        self.embedding = nn.Embedding(num_words, embedding_dim, padding_idx=0)
        self.lm = None
        self.encoder = SentenceEncoder(embedding_dim, cell, hidden_size, num_layers, dropout, rnn_options)
        size = self.encoder.output_size
        self.word_attention = AttentionPooling(size)
        self.sentence_encoder = SentenceEncoder(size, cell, hidden_size, 1, dropout, rnn_options)
        self.sentence_attention = AttentionPooling(self.sentence_encoder.output_size)
        self.dropout = Dropout(dropout)
        self.output = nn.Linear(self.sentence_encoder.output_size, num_labels)

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Input to output: word vectors, each word-encoder layer, then the rest."""
        return stack_groups([self.embedding], self.encoder.rnn,
                            [self.word_attention, self.sentence_encoder, self.sentence_attention, self.output])

    def forward(self, words: torch.Tensor, word_counts: torch.Tensor, lengths: torch.Tensor):
        """-> label scores (B, C) and the weights: of each sentence (B, S) and of each word
        within its sentence (B, S, L)."""
        b, s, width = words.shape
        real = length_mask(lengths, s)                                     # (B, S) real sentences
        counts = word_counts[real]
        x = self.dropout(self.embedding(words[real]))                      # (N, L, E)
        states, _ = self.encoder(x, counts)
        vectors, word_weights = self.word_attention(states, length_mask(counts, width))
        sentences = vectors.new_zeros(b, s, vectors.size(-1))
        sentences[real] = vectors
        states, _ = self.sentence_encoder(self.dropout(sentences), lengths)
        document, sentence_weights = self.sentence_attention(states, real)
        within = word_weights.new_zeros(b, s, width)
        within[real] = word_weights
        return self.output(self.dropout(document)), (sentence_weights, within)
