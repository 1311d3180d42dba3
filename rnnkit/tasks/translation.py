"""Sequence-to-sequence translation: aligned files in, BLEU out."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from rnnkit.config import (Config, recurrent_options)
from rnnkit.config.translation import DataConfig, ModelConfig  # noqa: F401  (this task's sections)
from rnnkit.data.builders import prepare_pairs
from rnnkit.data.parallel import IGNORE, Batch, make_batch
from rnnkit.data.vocab import read_parallel
from rnnkit.data.prepare import ensure_store
from rnnkit.data.store import Batches, Store, StoreWriter, TokenArray, bucket_batches
from rnnkit.data.tokenizers import tokenizer_from_state
from rnnkit.data.vocab import BOS, EOS
from rnnkit.decoding.torch_steps import TorchSteps
from rnnkit.gradient_flow import GradientFlow, measure
from rnnkit.hardware import LENGTH_MULTIPLE
from rnnkit.metrics import bleu, chrf, perplexity
from rnnkit.models.rnn import state_size
from rnnkit.models.seq2seq import Bridge, Decoder, DecoderState, Encoder, Seq2Seq
from rnnkit.tasks.translation_text import Translation, TranslationStream, TranslationText  # noqa: F401
from rnnkit.training.teacher_forcing import TeacherForcingSchedule
from rnnkit.training.interface import StepResult

Pairs = tuple[TokenArray, TokenArray]   # (sources, targets) of encoded sentence pairs


def build_model(cfg: Config, src_vocab: int, tgt_vocab: int) -> Seq2Seq:
    m = cfg.model
    e, d = m.encoder, m.decoder
    encoder = Encoder(src_vocab, m.embedding_dim, e.cell, e.hidden_size, e.num_layers, e.bidirectional, e.dropout,
                      recurrent_options(e))
    decoder = Decoder(tgt_vocab, m.embedding_dim, d.cell, d.hidden_size, d.num_layers, d.dropout,
                      d.attention, encoder.output_size, d.input_feeding, recurrent_options(d), d.attention_heads)
    bridge = Bridge(m.bridge, encoder.output_size, d.hidden_size, d.num_layers, d.cell == "lstm",
                    state_size(decoder.rnn))
    model = Seq2Seq(encoder, bridge, decoder)
    if m.init_range is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                # layer-norm gains and biases keep their 1 and 0, heads' bilinear matrices their identity
                if ".ln_" not in name and not name.endswith(".bilinear"):
                    p.uniform_(-m.init_range, m.init_range)
            encoder.embedding.weight[0].zero_()   # the padding rows stay zero
            decoder.embedding.weight[0].zero_()
    return model


def prepare_data(cfg: Config, extras: dict[str, Any] | None = None, workers: int | None = None) -> Store:
    """The config's training and validation pairs as a prepared store (found, or made with
    ``workers`` processes), tokenized by fitted tokenizers or, for a resumed run, by its
    checkpoint's (``extras``)."""
    d = cfg.data
    sources = [d.train_src, d.train_tgt, d.valid_src, d.valid_tgt]
    settings = {"src_tokenizer": d.src_tokenizer, "tgt_tokenizer": d.tgt_tokenizer, "min_freq": d.min_freq,
                "src_vocab_size": d.src_vocab_size, "tgt_vocab_size": d.tgt_vocab_size, "max_len": d.max_len}
    given = None if extras is None else {"src": extras["src"], "tgt": extras["tgt"]}

    def build(writer: StoreWriter, n: int) -> dict[str, Any]:
        sides = {name: ("fixed", given[name]) if given else ("fit", kind, size, d.min_freq)
                 for name, kind, size in (("src", d.src_tokenizer, d.src_vocab_size),
                                          ("tgt", d.tgt_tokenizer, d.tgt_vocab_size))}
        return prepare_pairs(writer, n, (d.train_src, d.train_tgt), (d.valid_src, d.valid_tgt), sides, d.max_len)

    return ensure_store("translation", sources, settings, build, workers, d.cache, given,
                        lambda store: {n: store.tokenizer_state(n) for n in ("src", "tgt")})


class TranslationTask(TranslationText):
    def __init__(self, cfg: Config, device: torch.device, extras: dict[str, Any] | None = None,
                 with_data: bool = True):
        self.cfg, self.device = cfg, device
        if with_data:
            store = prepare_data(cfg, extras)
            for note in store.manifest["notes"]:
                tqdm.write(note)
            self.valid_src, self.valid_tgt = read_parallel(cfg.data.valid_src, cfg.data.valid_tgt)
            self.src_tok = tokenizer_from_state(store.tokenizer_state("src"))
            self.tgt_tok = tokenizer_from_state(store.tokenizer_state("tgt"))
            self.train_pairs: Pairs = (store.array("train.src"), store.array("train.tgt"))
            self.train_keys = store.keys("train.src")
            self.valid_pairs: Pairs = (store.array("valid.src").in_memory(), store.array("valid.tgt").in_memory())
        else:
            self.src_tok, self.tgt_tok = tokenizer_from_state(extras["src"]), tokenizer_from_state(extras["tgt"])
        v = self.tgt_tok.vocab
        self.bos, self.eos = v.stoi[BOS], v.stoi[EOS]
        self.model = build_model(cfg, len(self.src_tok.vocab), len(v)).to(device)
        self.teacher_forcing = TeacherForcingSchedule(cfg.train.teacher_forcing)

    # ------------------------------------------------------------------ training interface
    def train_batches(self, epoch: int) -> Batches:
        """Indices of similar length, batched; the order is a function of the seed and epoch."""
        return bucket_batches(self.train_keys, self.cfg.train.batch_size, self.cfg.data.batch_tokens,
                              seed=self.cfg.seed * 100003 + epoch)

    def _batch(self, pairs: Pairs, indices: Sequence[int]) -> Batch:
        return make_batch(pairs[0].gather(indices), pairs[1].gather(indices), indices,
                          self.bos, self.eos, LENGTH_MULTIPLE).to(self.device)

    def _loss(self, batch: Batch, ratio: float = 1.0) -> torch.Tensor:
        """Mean cross-entropy per target token; the output layer runs on real tokens only."""
        feats = self.model.features(batch.src, batch.src_lengths, batch.tgt_in, ratio)
        feats = feats.reshape(-1, feats.size(-1)).index_select(0, batch.positions)
        return self.model.decoder.loss(feats, batch.gold, IGNORE)

    def train_step(self, indices: list[int], index: int, step: int) -> StepResult:
        batch = self._batch(self.train_pairs, indices)
        ratio = self.teacher_forcing(step)
        return StepResult(self._loss(batch, ratio), batch.tokens, {"teacher_forcing": ratio})

    def train_state(self) -> dict[str, Any]:
        return {}

    def load_train_state(self, state: dict[str, Any]) -> None:
        pass

    def extras(self) -> dict[str, Any]:
        return {"src": self.src_tok.state(), "tgt": self.tgt_tok.state()}

    @torch.no_grad()
    def _mean_loss(self, pairs: Pairs, batch_size: int) -> tuple[float, int]:
        """Teacher-forced loss per target token over encoded pairs, and the token count."""
        total, tokens = 0.0, 0
        for indices in bucket_batches(pairs[0].lengths(), batch_size):
            batch = self._batch(pairs, indices)
            total += self._loss(batch).item() * batch.tokens
            tokens += batch.tokens
        return total / max(1, tokens), tokens

    def evaluate(self) -> dict[str, float]:
        """Teacher-forced loss over the validation pairs, then greedy BLEU/chrF on validation text."""
        bs = self.cfg.train.eval_batch_size
        loss, _ = self._mean_loss(self.valid_pairs, bs)
        hyps = [t.text for t in self.translate(self.valid_src, beam=1, batch_size=bs)]
        return {"loss": loss, "ppl": perplexity(loss), "bleu": bleu(hyps, self.valid_tgt),
                "chrf": chrf(hyps, self.valid_tgt)}

    def gradient_flow(self) -> GradientFlow:
        """dL/dh_t of the encoder (forward direction) for the teacher-forced loss of validation
        pairs whose sources share one length (the longest length that at least 4 share),
        measured back from the last source token."""
        by_length: dict[int, list[int]] = {}
        for i, n in enumerate(self.valid_pairs[0].lengths().tolist()):
            by_length.setdefault(n, []).append(i)
        length = max((n for n, ids in by_length.items() if len(ids) >= 4), default=None)
        if length is None:
            length = max(by_length, key=lambda n: len(by_length[n]))
        batch = self._batch(self.valid_pairs, by_length[length][: self.cfg.train.eval_batch_size])
        return measure(self.model, "encoder.rnn", lambda: self._loss(batch), length - 1)

    # ------------------------------------------------------------------ inference
    def encode_ids(self, ids: list[list[int]]) -> tuple[DecoderState, np.ndarray]:
        batch = make_batch(ids, None, range(len(ids)), self.bos, self.eos).to(self.device)
        return self.model.encode(batch.src, batch.src_lengths), batch.src_lengths.numpy()

    def stream(self, beam: int = 1, n_best: int = 1, alpha: float = 0.0, replace_unk: bool = False,
               capacity: int = 32) -> TranslationStream:
        """Continuous batching (see :class:`TranslationStream`); for inference only."""
        self.model.eval()
        return super().stream(beam, n_best, alpha, replace_unk, capacity)

    def search_backend(self) -> TorchSteps:
        return TorchSteps(self.model.decoder.step, self.device)

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """Evaluation mode without gradients; a model already in it is left alone (switching
        would drop the decoder's prepared steps)."""
        was_training = self.model.training
        if was_training:
            self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            if was_training:
                self.model.train()

    def score_pairs(self, src: list[str], tgt: list[str], batch_size: int = 64) -> tuple[float, int]:
        """Teacher-forced loss per target token over raw sentence pairs (eval's perplexity)."""
        was_training = self.model.training
        self.model.eval()
        pairs = [(a, b) for a, b in ((self.src_tok.encode(s), self.tgt_tok.encode(t)) for s, t in zip(src, tgt)) if a]
        result = self._mean_loss((TokenArray.from_lists([a for a, _ in pairs]),
                                  TokenArray.from_lists([b for _, b in pairs])), batch_size)
        self.model.train(was_training)
        return result


def build(cfg: Config, device: torch.device, extras: dict[str, Any] | None = None,
          with_data: bool = True) -> TranslationTask:
    return TranslationTask(cfg, device, extras, with_data)
