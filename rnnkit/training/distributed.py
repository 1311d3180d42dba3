"""Data parallelism under ``torchrun``: one process per device, each on a slice of every
global batch, gradients averaged with one all-reduce per step.

``train.batch_size`` is the global batch: each of the W ranks takes a contiguous 1/W of every
batch the task yields (sentences, windows, streams), and the loss is normalised over the
global batch's tokens exactly as one process would, so a run's numbers do not depend on how
many processes compute them. Rank 0 alone logs, evaluates and writes files.
"""
from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist


class Rank(NamedTuple):
    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = Rank(0, 1, 0)


def launched() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> Rank:
    """Join the process group torchrun describes (NCCL with GPUs, gloo without); the single-
    process answer when not launched that way."""
    if not launched():
        return SINGLE
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return current()


def device_of(rank: Rank) -> torch.device:
    """Where this rank's collective tensors live (NCCL needs them on the GPU)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", rank.local_rank)
    return torch.device("cpu")


def finish(ok: bool = True) -> None:
    """Leave the process group: together after a run that ended well (a rank that exits
    alone aborts the others' gloo threads); at once after an error, which torchrun then
    answers by stopping the other ranks."""
    if dist.is_available() and dist.is_initialized():
        try:
            if ok:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def current() -> Rank:
    if dist.is_available() and dist.is_initialized():
        return Rank(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return SINGLE


def share(n: int, rank: Rank) -> tuple[int, int]:
    """This rank's contiguous [lo, hi) of ``n`` items (the first ranks take one more)."""
    base, extra = divmod(n, rank.world)
    lo = rank.rank * base + min(rank.rank, extra)
    return lo, lo + base + (1 if rank.rank < extra else 0)


def shard(batch: Any, rank: Rank) -> Any:
    """This rank's part of a global batch: a slice of a list, range or tensor of items."""
    if isinstance(batch, (list, tuple, range, torch.Tensor, np.ndarray)):
        lo, hi = share(len(batch), rank)
        return batch[lo:hi]
    raise TypeError(f"cannot split a batch of type {type(batch).__name__} across ranks; "
                    f"give the task a shard(batch, rank) method")


def main_first(work: Callable[[], Any], rank: Rank) -> None:
    """Run ``work`` on rank 0 while the other ranks wait (preparing data that every rank then
    opens); an error there stops every rank."""
    failed = None
    if rank.main:
        try:
            work()
        except Exception as err:
            failed = err
    if rank.world > 1 and any_rank([failed is not None], device_of(rank))[0] and failed is None:
        from rnnkit.data.vocab import DataError

        raise DataError("rank 0 could not prepare the data (its error is above)")
    if failed is not None:
        raise failed


def all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag true on every rank when it is true on any (stop together), in one all-reduce."""
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def average_gradients(params: list[torch.Tensor], world: int) -> None:
    """Mean of every parameter's gradient over the ranks, in one flat all-reduce."""
    for q in params:
        if q.grad is None:
            q.grad = torch.zeros_like(q)
    grads = [q.grad for q in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def gather_rows(t: torch.Tensor, dim: int, rank: Rank) -> torch.Tensor:
    """Concatenate every rank's ``t`` along ``dim`` in rank order (sizes may differ by one)."""
    sizes = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(rank.world)]
    dist.all_gather(sizes, torch.tensor([t.size(dim)], device=t.device))
    biggest = int(max(s.item() for s in sizes))
    pad = list(t.shape)
    pad[dim] = biggest - t.size(dim)
    padded = torch.cat([t, t.new_zeros(pad)], dim) if pad[dim] else t
    parts = [torch.empty_like(padded) for _ in range(rank.world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p.narrow(dim, 0, int(s.item())) for p, s in zip(parts, sizes)], dim)
