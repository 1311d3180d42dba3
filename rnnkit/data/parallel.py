"""Parallel text: aligned readers, padding and batching (the tokenizers are in rnnkit.data.tokenizers)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from rnnkit.data.store import bucket_batches
from rnnkit.hardware import pad_rows

@dataclass
class Batch:
    src: torch.Tensor          # (B, S) source ids, padded with 0
    src_lengths: torch.Tensor  # (B,) on the CPU (packing wants it there)
    tgt_in: torch.Tensor       # (B, T) <s> y_1 .. y_n, padded
    tgt_out: torch.Tensor      # (B, T) y_1 .. y_n </s>, padded
    tokens: int                # target tokens (for loss normalisation and throughput)
    index: torch.Tensor        # (B,) positions of these sentences in the dataset
    positions: torch.Tensor    # (rows,) flat positions of real (non-pad) targets in tgt_out, see IGNORE
    gold: torch.Tensor         # (rows,) the targets at those positions; IGNORE on the rows added

    def to(self, device: torch.device) -> "Batch":
        """Copy to ``device``; on CUDA through pinned memory, without waiting for the copy."""
        if device.type == "cpu":
            return self
        cuda = device.type == "cuda"
        move = lambda t: (t.pin_memory() if cuda else t).to(device, non_blocking=cuda)  # noqa: E731
        return Batch(move(self.src), self.src_lengths, move(self.tgt_in), move(self.tgt_out),
                     self.tokens, self.index, move(self.positions), move(self.gold))


# The output layer runs on the real target tokens only, a count that changes with every batch;
# it is rounded up to a multiple of rnnkit.hardware.ROW_MULTIPLE (see there) with copies of the
# first row whose targets are IGNORE, so the loss and its gradients are unchanged.
IGNORE = -100       # cross_entropy's ignore_index


def pad(seqs: Sequence[Sequence[int]], multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of ids (lists or arrays) as one zero-padded (B, longest) tensor, and their
    lengths; the width rounded up to a multiple of ``multiple``."""
    lengths = np.fromiter((len(s) for s in seqs), np.int64, len(seqs))
    width = int(lengths.max()) if len(seqs) else 0
    out = np.zeros((len(seqs), width + -width % multiple), np.int64)
    if lengths.sum():
        out[np.arange(out.shape[1]) < lengths[:, None]] = np.concatenate([np.asarray(s, np.int64) for s in seqs])
    return torch.from_numpy(out), torch.from_numpy(lengths)


def make_batch(src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]] | None, index: Sequence[int],
               bos: int, eos: int, src_multiple: int = 1) -> Batch:
    """A batch; the sources' width rounded up to a multiple of ``src_multiple`` (see
    rnnkit.hardware.LENGTH_MULTIPLE)."""
    s, s_len = pad(src, src_multiple)
    if tgt is None:
        empty = torch.zeros(len(src), 0, dtype=torch.long)
        return Batch(s, s_len, empty, empty, 0, torch.as_tensor(index), empty[0], empty[0])
    body, lengths = pad(tgt)
    rows = torch.arange(len(tgt))
    t_in = torch.nn.functional.pad(body, (1, 0), value=bos)          # <s> y_1 .. y_n
    t_out = torch.nn.functional.pad(body, (0, 1))                     # y_1 .. y_n </s>
    t_out[rows, lengths] = eos
    positions = (t_out.view(-1) != 0).nonzero().squeeze(1)   # found on the CPU: no device sync later
    gold = pad_rows(t_out.view(-1)[positions], fill=IGNORE)
    positions = pad_rows(positions)
    return Batch(s, s_len, t_in, t_out, int(lengths.sum()) + len(tgt), torch.as_tensor(np.asarray(index)),
                 positions, gold)


def length_batches(lengths: Sequence[int], batch_size: int, batch_tokens: int | None,
                   generator: torch.Generator | None = None, pool: int = 100) -> list[list[int]]:
    """:func:`rnnkit.data.store.bucket_batches` as lists of indices, seeded by ``generator``."""
    seed = None if generator is None else generator.initial_seed()
    batches = bucket_batches(lengths, batch_size, batch_tokens, seed, pool)
    return [b.tolist() for b in batches]
