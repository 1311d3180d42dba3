"""Many streams' recurrent states in one slab per state array, a row per stream, whatever the
backend: numpy arrays (onnxruntime) or torch tensors, each with the batch on axis 1 (torch's
(layers, batch, hidden) convention), alone or in tuples and lists (an LSTM's h and c)."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from rnnkit.hardware import trim_heap


def _map(fn: Callable, *trees: Any) -> Any:
    first = trees[0]
    if isinstance(first, (tuple, list)):
        return type(first)(_map(fn, *parts) for parts in zip(*trees))
    return fn(*trees)


def _leaves(tree: Any) -> list:
    return [x for part in tree for x in _leaves(part)] if isinstance(tree, (tuple, list)) else [tree]


def _index(x: Any, rows: np.ndarray) -> Any:
    if isinstance(x, np.ndarray):
        return rows
    import torch

    return torch.as_tensor(rows, dtype=torch.long, device=x.device)


def take_rows(state: Any, rows: np.ndarray) -> Any:
    """The rows ``rows`` of every array in ``state`` (copies)."""
    return _map(lambda x: x[:, _index(x, rows)], state)


def put_rows(state: Any, rows: np.ndarray, value: Any) -> None:
    """``state``'s rows ``rows`` set to ``value``'s, in place."""
    def put(x: Any, v: Any) -> None:
        x[:, _index(x, rows)] = v.to(x.dtype) if hasattr(v, "to") else v.astype(x.dtype, copy=False)

    _map(put, state, value)


def _zeros(like: Any, rows: int) -> Any:
    shape = (like.shape[0], rows, *like.shape[2:])
    return np.zeros(shape, like.dtype) if isinstance(like, np.ndarray) else like.new_zeros(shape)


def _nbytes(x: Any) -> int:
    return int(x.nbytes) if isinstance(x, np.ndarray) else x.element_size() * x.nelement()


class StateRows:
    """Carried states of many streams in one slab per state array, a row per stream. Rows are
    handed out and given back; a row given back is zeroed (a fresh state is all zeros for
    every rnnkit model). The slab grows by a quarter when full and is compacted when three
    quarters of it stand empty, so its bytes stay within about 1.25x of the live states'."""

    GROW = 1.25

    def __init__(self) -> None:
        self.slab: Any = None            # None until the first state is put
        self.capacity = 0
        self._free: list[int] = []
        self.live = 0

    def allocate(self) -> int:
        if not self._free:
            new = max(self.capacity + 16, int(self.capacity * self.GROW))
            self._resize(new)
        self.live += 1
        return self._free.pop()

    def release(self, row: int) -> None:
        if self.slab is not None:
            put_rows(self.slab, np.asarray([row]), _map(lambda x: _zeros(x, 1), self.slab))
        self._free.append(row)
        self.live -= 1

    def take(self, rows: Sequence[int]) -> Any:
        """The states of ``rows`` as one batch (None before any state exists: all fresh)."""
        return None if self.slab is None else take_rows(self.slab, np.asarray(rows, dtype=np.int64))

    def put(self, rows: Sequence[int], state: Any) -> None:
        if self.slab is None:
            self.slab = _map(lambda x: _zeros(x, self.capacity), state)
        put_rows(self.slab, np.asarray(rows, dtype=np.int64), state)

    @property
    def nbytes(self) -> int:
        return 0 if self.slab is None else sum(_nbytes(x) for x in _leaves(self.slab))

    def row_bytes(self) -> int:
        return self.nbytes // max(1, self.capacity)

    @property
    def sparse(self) -> bool:
        """Whether three quarters of the slab stand empty (time to :meth:`compact`)."""
        return self.capacity > 64 and self.live * 4 <= self.capacity

    def compact(self, rows: dict[Any, int]) -> dict[Any, int]:
        """Move the live rows (``rows``: owner -> row) to the front of a slab sized for them;
        returns each owner's row afterwards."""
        owners = list(rows)
        new_capacity = max(64, int(self.live * self.GROW) + 16)
        if self.slab is not None:
            kept = take_rows(self.slab, np.asarray([rows[o] for o in owners], dtype=np.int64))
            self.slab = _map(lambda x: _zeros(x, new_capacity), self.slab)
            put_rows(self.slab, np.arange(len(owners)), kept)
        self.capacity = new_capacity
        self._free = list(range(new_capacity - 1, len(owners) - 1, -1))
        trim_heap()                     # the old slab's pages back to the system
        return {o: i for i, o in enumerate(owners)}

    def _resize(self, new: int) -> None:
        if self.slab is not None:
            old = self.slab
            self.slab = _map(lambda x: _zeros(x, new), old)
            _map(lambda x, o: x.__setitem__((slice(None), slice(0, self.capacity)), o), self.slab, old)
            del old
            trim_heap()
        self._free = list(range(new - 1, self.capacity - 1, -1)) + self._free
        self.capacity = new
