"""Starting and resuming runs, and rebuilding a task from a checkpoint alone."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from rnnkit.config import Config, ConfigError, config_to_dict, load_config, save_config
from rnnkit.tasks import task_module
from rnnkit.training.checkpoint import CheckpointError, load_checkpoint
from rnnkit.training import distributed
from rnnkit.training.run_lock import RunLock
from rnnkit.training.interface import resolve_device
from rnnkit.training.trainer import Trainer


def _first_difference(a: Any, b: Any, prefix: str) -> str | None:
    """The first dotted key whose values differ; a recurrent layer's ``impl`` may change
    (both implementations share their weights)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted((set(a) | set(b)) - {"impl"}):
            d = _first_difference(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
            if d:
                return d
        return None
    return None if a == b else prefix


def prepare_trainer(cfg: Config, resume: bool = False) -> Trainer:
    """Check the run directory, build the task and a Trainer (restored when ``resume``).
    Nothing in the run directory changes until all of that has succeeded. Under torchrun
    every rank builds the same, rank 0 alone touches the run directory, and an error on
    any rank stops them all."""
    rank = distributed.current()
    if rank.world == 1:
        return _prepare(cfg, resume, rank)
    failed = None
    try:
        trainer = _prepare(cfg, resume, rank)
    except Exception as err:
        failed = err
    if distributed.any_rank([failed is not None], distributed.device_of(rank))[0]:
        if failed is None:
            raise ConfigError("", "another rank could not start (its error is above)")
        raise failed
    trainer.broadcast_from_main()
    return trainer


def _prepare(cfg: Config, resume: bool, rank: distributed.Rank) -> Trainer:
    run_dir = Path(cfg.run_dir)
    lock = RunLock(run_dir)
    if rank.main and run_dir.is_dir():
        lock.acquire()      # another live process training here is refused before anything else
    try:
        trainer = _build_trainer(cfg, run_dir, resume, rank)
        if rank.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            trainer.lock = lock.claim()
            for stale in run_dir.glob(".*.pt.*.tmp"):   # half-written by a killed process; ours now
                stale.unlink(missing_ok=True)
            if not resume:      # records of a run killed before its first checkpoint: it starts over
                (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            save_config(cfg, run_dir / "config.yaml")
        if resume:
            trainer.resume(run_dir / "last.pt")
    except BaseException:
        lock.release()
        raise
    return trainer


def _build_trainer(cfg: Config, run_dir: Path, resume: bool, rank: distributed.Rank) -> Trainer:
    last = run_dir / "last.pt"
    ckpt = None
    if resume:
        if not last.exists():
            raise ConfigError("run_dir", f"--resume given, but {last} does not exist")
        ckpt = load_checkpoint(last)
        old = ckpt["config"]
        new = config_to_dict(cfg)
        for section in ("task", "data", "model", "seed"):
            diff = _first_difference(old.get(section), new.get(section), section)
            if diff:
                raise ConfigError(diff, f"differs from the checkpoint being resumed ({last}); only train.* "
                                      f"(and a recurrent layer's impl) may change")
    elif last.exists():
        raise ConfigError("run_dir", f"{run_dir} already holds a run; pass --resume to continue it, "
                                     f"or choose another directory with --set run_dir=...")
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and rank.world > 1:
        device = torch.device("cuda", rank.local_rank)
    if cfg.train.precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision", f"'fp16' needs a CUDA device (this run is on {device.type}); "
                                             f"use bf16 or fp32")
    if cfg.train.precision == "bf16" and device.type == "cpu" and rank.main:
        from rnnkit.hardware import bf16_note

        note = bf16_note()
        if note:
            tqdm.write(note)
    module = task_module(cfg.task)
    extras = ckpt["task"] if ckpt else None
    if rank.world > 1 and hasattr(module, "prepare_data"):   # rank 0 prepares the store; the others then open it
        distributed.main_first(lambda: module.prepare_data(cfg, extras), rank)
    torch.manual_seed(cfg.seed)
    task = module.build(cfg, device, extras=extras)
    if rank.world > 1:     # the same initial weights on every rank, then dropout of their own
        torch.manual_seed(cfg.seed + 7919 * (rank.rank + 1))
    return Trainer(cfg, task, run_dir, device)


def load_task(path: str | Path, device: str = "auto", with_data: bool = False):
    """Rebuild a task (model, vocabulary, tokenizer) from a checkpoint, for inference
    (``with_data``: with the validation data its config names, e.g. for gradient flow)."""
    dev = resolve_device(device, key="--device")
    if dev.type == "cuda" and dev.index is None and distributed.launched():   # one GPU per rank
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    ckpt = load_checkpoint(path, map_location=dev, mmap=True)
    try:
        cfg = load_config(None, base=ckpt["config"])
    except ConfigError as err:
        raise CheckpointError(f"{path}: its stored config is invalid ({err})") from None
    task = task_module(cfg.task).build(cfg, dev, extras=ckpt["task"], with_data=with_data)
    task.model.load_state_dict(ckpt["model"])
    task.model.eval()
    return task
