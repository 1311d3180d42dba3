"""The one training loop. It drives any task that offers the small interface below."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from rnnkit.config import Config, ConfigError, config_to_dict
from rnnkit.hardware import RELEASE_EVERY, autocast, release_freed_memory, training_precision
from rnnkit.training import distributed
from rnnkit.training.checkpoint import load_checkpoint, save_checkpoint
from rnnkit.training.run_lock import RunLock
from rnnkit.training.schedules import LRSchedule
from rnnkit.training.interface import StepResult, Task, TrainingError
from rnnkit.training.optim import Averager, build_optimizer, parameter_groups
from rnnkit.training.progress import LogWindow, Progress, format_number

STOP_SIGNALS = {signal.SIGINT: ("Ctrl-C", 130), signal.SIGTERM: ("SIGTERM", 143)}   # name, exit code

class Trainer:
    def __init__(self, cfg: Config, task: Task, run_dir: Path, device: torch.device,
                 console: Console | None = None):
        self.cfg, self.task, self.run_dir, self.device = cfg, task, Path(run_dir), device
        self.rank = distributed.current()     # under torchrun: rank 0 alone writes files and prints
        self.console = console or Console(stderr=True)
        self.optimizer = build_optimizer(cfg, parameter_groups(cfg, task.model))
        self._open_depth: int | None = None      # gradual unfreezing: the deepest group that trains
        self.schedule = LRSchedule(cfg.train)
        self.precision = training_precision(cfg.train.precision, device)    # `auto` made concrete
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.progress = Progress()
        self.averager: Averager | None = None      # nt_asgd, once triggered; ema_decay: from the start
        if cfg.train.ema_decay is not None:
            self.averager = self._ema()
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.stop_signal: str | None = None     # the signal that asked training to stop
        # called after every evaluation with the step and its results; a reason it returns
        # (a sweep's pruner: "pruned") ends training there, last.pt saved by the evaluation
        self.after_eval: Callable[[int, dict[str, float]], str | None] | None = None
        self.stopped_by: str | None = None
        self.exit_code = 0
        self.lock: RunLock | None = None
        self._grace_timer: threading.Timer | None = None
        self.tensorboard = None
        if cfg.train.tensorboard:
            try:
                import tensorboard  # noqa: F401  (only whether it is installed)
            except ImportError:
                raise ConfigError("train.tensorboard", "needs the tensorboard package: "
                                                       "pip install tensorboard (or rnnkit[tensorboard])") from None
        self.window: LogWindow | None = None
        if cfg.train.gradient_flow_every and not hasattr(task, "gradient_flow"):
            raise ConfigError("train.gradient_flow_every", f"task '{cfg.task}' does not measure gradient flow")

    # ------------------------------------------------------------------ checkpoints
    def _payload(self) -> dict[str, Any]:
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        averaging = self.averager is not None
        return {
            "config": config_to_dict(self.cfg),
            "model": self.averager.averaged_state() if averaging else self.task.model.state_dict(),
            "averaging": self.averager.state_dict() if averaging else None,
            "task": self.task.extras(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": self._progress_state(),
            "train_state": self.task.train_state(),   # called on every rank: it may gather
            "rng": rng,
        }

    def broadcast_from_main(self) -> None:
        """Every rank starts from rank 0's weights (they are equal already; this makes sure)."""
        import torch.distributed as dist

        with torch.no_grad():
            for t in self.task.model.state_dict().values():
                dist.broadcast(t, 0)

    def _progress_state(self) -> dict[str, Any]:
        """Progress with the log window's sums over every rank (called on every rank)."""
        if self.window is not None:
            self.progress.window_loss, self.progress.window_tokens = self.window.totals(self.rank)
        return vars(self.progress).copy()

    def _check_weights(self) -> None:
        """Non-finite weights are never saved."""
        if not all(bool(torch.isfinite(q).all()) for q in self.task.model.parameters()):
            raise TrainingError(f"the weights became non-finite at step {self.progress.step}; not saving them "
                                f"(the checkpoints in {self.run_dir} are from earlier steps); lower train.lr "
                                f"or train.clip_grad_norm and --resume")

    def save_last(self) -> None:
        self._check_weights()
        payload = self._payload()
        if self.rank.main:
            save_checkpoint(payload, self.run_dir / "last.pt")

    def resume(self, path: Path) -> None:
        """Restore model, optimizer, schedule, data position, carried state and RNG."""
        ckpt = load_checkpoint(path, map_location=self.device)
        self.task.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["schedule"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.progress = Progress(**ckpt["progress"])
        if ckpt.get("averaging"):
            self.averager = self.averager or Averager(self.task.model)     # ema_decay's exists from the start
            self.averager.load(ckpt["averaging"])
        self.progress.nonfinite_run = 0     # a resumed run (say, with a lower lr) starts a fresh streak
        self.task.load_train_state(ckpt["train_state"])
        torch.set_rng_state(ckpt["rng"]["cpu"].cpu())
        if "cuda" in ckpt["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["rng"]["cuda"]])
        if self.rank.world > 1:   # the window's sums are global: rank 0 carries them; dropout of each rank's own
            if not self.rank.main:
                self.progress.window_loss, self.progress.window_tokens = 0.0, 0
            torch.manual_seed(self.cfg.seed + 7919 * (self.rank.rank + 1) + self.progress.step)
        self._truncate_metrics(self.progress.step)

    def _truncate_metrics(self, step: int) -> None:
        """Drop records a crashed session wrote after the checkpoint we resume from."""
        if not self.rank.main or not self.metrics_path.exists():
            return
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
        self.metrics_path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")

    def _log(self, record: dict[str, Any]) -> None:
        if not self.rank.main:
            return
        if self.tensorboard is not None:
            for key, value in record.items():
                if key not in ("kind", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(f"{record['kind']}/{key}", value, record["step"])
        try:
            with self.metrics_path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as err:
            raise TrainingError(f"cannot write {self.metrics_path}: {err.strerror or err}") from None

    # ------------------------------------------------------------------ evaluation
    def _improved(self, value: float) -> bool:
        best = self.progress.best
        if best is None:
            return True
        return value < best if self.cfg.train.metric_mode == "min" else value > best

    def evaluate_and_save(self) -> bool:
        """Evaluate, log, checkpoint (``last.pt``, and ``best.pt`` on improvement).

        Returns True when early stopping says training should end.
        """
        t, p = self.cfg.train, self.progress
        p.eval_due = False
        # the last step's gradients go (the next step makes its own) and the heap's free pages back
        # to the system: the evaluation's other shapes then grow the process from what is live,
        # not from a heap full of holes that its tensors do not fit
        self.optimizer.zero_grad(set_to_none=True)
        release_freed_memory()
        self.task.model.eval()
        with torch.no_grad(), (self.averager.swapped_in() if self.averager else contextlib.nullcontext()):
            results = {f"valid_{k}": float(v) for k, v in self.task.evaluate().items()}
        self.task.model.train()
        p.last_eval = results
        value = results[t.metric]
        self.schedule.observe(value, t.metric_mode)
        improved = self._improved(value)
        self._maybe_start_averaging(value)
        if improved:
            p.best, p.best_step, p.bad_evals = value, p.step, 0
        else:
            p.bad_evals += 1
        self._log({"kind": "eval", "step": p.step, **results})
        shown = "  ".join(f"{k}={v:.4g}" for k, v in results.items())
        if self.rank.main:
            tqdm.write(f"step {p.step}: {shown}{'  (best)' if improved else ''}")
        self._check_weights()
        if self.tensorboard is not None:
            self.tensorboard.flush()
        payload = self._payload()
        if self.rank.main:   # best first: a crash between the two leaves a last.pt that redoes this evaluation
            if improved:
                save_checkpoint(payload, self.run_dir / "best.pt")
            if t.keep_checkpoints:
                self._keep(payload)
            save_checkpoint(payload, self.run_dir / "last.pt")
        return t.early_stopping is not None and p.bad_evals >= t.early_stopping

    def _ema(self) -> Averager:
        """``train.ema_decay``'s average, over every parameter the optimizer may train."""
        trained = [q for g in self.optimizer.param_groups for q in g["params"]]
        return Averager(self.task.model, self.cfg.train.ema_decay, trained)

    def _maybe_start_averaging(self, value: float) -> None:
        """NT-ASGD's trigger (Merity et al.): average from now on once the metric is worse than
        the best of the evaluations before the last ``nt_asgd_patience``."""
        t, p = self.cfg.train, self.progress
        p.history.append(value)
        if t.optimizer != "nt_asgd" or self.averager is not None or len(p.history) <= t.nt_asgd_patience + 1:
            return
        earlier = p.history[:-t.nt_asgd_patience - 1]
        best = min(earlier) if t.metric_mode == "min" else max(earlier)
        if (value > best) if t.metric_mode == "min" else (value < best):
            self.averager, p.averaging_from = Averager(self.task.model), p.step
            self._log({"kind": "nt_asgd", "step": p.step, "averaging_from": p.step})
            if self.rank.main:
                tqdm.write(f"step {p.step}: {t.metric} stopped improving; averaging the weights from here on (NT-ASGD)")

    def _keep(self, payload: dict[str, Any]) -> None:
        """``step{N}.pt`` for this evaluation; only the newest ``train.keep_checkpoints`` stay."""
        save_checkpoint(payload, self.run_dir / f"step{self.progress.step}.pt")
        kept = sorted(self.run_dir.glob("step*.pt"), key=lambda f: int(f.stem[4:]) if f.stem[4:].isdigit() else -1)
        for old in kept[: -self.cfg.train.keep_checkpoints]:
            old.unlink(missing_ok=True)

    # ------------------------------------------------------------------ the loop
    def _on_signal(self, signum, frame) -> None:
        name, code = STOP_SIGNALS[signum]
        if self.stop_signal is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.stop_signal, self.exit_code = name, code
        grace = self.cfg.train.stop_grace
        if self.rank.main:
            tqdm.write(f"{name}: finishing this step, then saving last.pt (within {grace:g} s"
                       + ("; Ctrl-C again to abort)" if signum == signal.SIGINT else ")"))
        self._grace_timer = threading.Timer(grace, self._grace_over)
        self._grace_timer.daemon = True
        self._grace_timer.start()

    def _grace_over(self) -> None:
        """The grace period ran out before last.pt was saved: leave now (the previous last.pt,
        written atomically, stays as it was)."""
        os.write(2, f"stop_grace ({self.cfg.train.stop_grace:g} s) ran out; exiting without saving "
                    f"(last.pt holds the previous save)\n".encode())
        os._exit(self.exit_code)

    def _autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return autocast(self.device.type, dtype)

    def _step(self, batch: Any, params: list[torch.Tensor]) -> tuple[StepResult, torch.Tensor | None, float]:
        """One optimisation step: forward (under autocast), backward, clip, update. A non-finite
        loss or gradient skips the update (fp16's loss scaler handles its own overflows)."""
        t, p = self.cfg.train, self.progress
        lr = self.schedule.lr(p.step, p.elapsed)
        if t.unfreeze_every:
            params = self._unfreeze(p.step // t.unfreeze_every)
        self.optimizer.zero_grad(set_to_none=True)
        out = self._forward_backward(batch, params)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0) * out.lr_scale
        self.scaler.unscale_(self.optimizer)
        grads = [q.grad for q in params if q.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros((), device=self.device)
        finite = torch.isfinite(out.loss.detach())
        if not self.scaler.is_enabled():     # fp16's scaler skips its own overflowing steps
            finite &= torch.isfinite(norm)
        over = norm > t.clip_grad_norm if t.clip_grad_norm else torch.zeros_like(finite)
        finite, over = torch.stack([finite, over]).tolist()      # the one host sync of the step
        if finite:
            if over:                         # rescaled only when over the limit (a pass over every gradient)
                torch.nn.utils.clip_grads_with_norm_(params, t.clip_grad_norm, norm, foreach=True)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            p.nonfinite_run = 0
            if self.averager is not None:
                self.averager.update()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.update()
            self._skip_nonfinite(float(out.loss.detach()), float(norm))
        p.step += 1
        p.batch_index += 1
        return out, norm, lr

    def _unfreeze(self, depth: int) -> list[torch.Tensor]:
        """Gradual unfreezing (ULMFiT): the groups down to ``depth`` below the top train, the
        rest get no gradient (so no update, not even weight decay). Returns the trainable ones."""
        if depth != self._open_depth:
            self._open_depth = depth
            for group in self.optimizer.param_groups:
                for q in group["params"]:
                    q.requires_grad_(group.get("depth", 0) <= depth)
        return [q for g in self.optimizer.param_groups if g.get("depth", 0) <= depth for q in g["params"]]

    def _forward_backward(self, batch: Any, params: list[torch.Tensor]) -> StepResult:
        """Forward (under autocast) and backward. Under torchrun: this rank's share of the global
        batch, its loss weighted by its share of the global tokens, gradients averaged over
        ranks, which is the gradient of the global batch's mean loss."""
        p, rank = self.progress, self.rank
        if rank.world > 1:
            batch = getattr(self.task, "shard", distributed.shard)(batch, rank)
        empty = rank.world > 1 and hasattr(batch, "__len__") and len(batch) == 0
        out = StepResult(torch.zeros((), device=self.device), 0)
        if not empty:
            with self._autocast():
                out = self.task.train_step(batch, p.batch_index, p.step)
        loss = out.loss if out.penalty is None else out.loss + out.penalty
        if rank.world > 1:
            (total,) = distributed.all_sum([float(out.tokens)], self.device)
            loss = loss * (out.tokens * rank.world / max(1.0, total))
        if not empty:
            self.scaler.scale(loss).backward()
        if rank.world > 1:
            distributed.average_gradients(params, rank.world)
        return out

    def _skip_nonfinite(self, loss: float, norm: float) -> None:
        p, limit = self.progress, self.cfg.train.max_nonfinite
        p.nonfinite += 1
        p.nonfinite_run += 1
        self._log({"kind": "nonfinite", "step": p.step + 1, "loss": str(loss), "grad_norm": str(norm),
                   "in_a_row": p.nonfinite_run})
        tqdm.write(f"step {p.step + 1}: non-finite loss ({loss}) or gradient norm ({norm}); update skipped "
                   f"({p.nonfinite_run} in a row, train.max_nonfinite {limit})")
        if p.nonfinite_run >= limit:
            raise TrainingError(f"{limit} non-finite updates in a row (train.max_nonfinite) up to step "
                                f"{p.step + 1}; stopped. Lower train.lr, set train.clip_grad_norm, check the data")

    def fit(self) -> dict[str, Any]:
        """Train until max_steps, max_time, early stopping, Ctrl-C or SIGTERM; returns the summary.
        After a signal, last.pt holds the step training stopped at (no extra evaluation; one due
        at that step is marked ``eval_due`` and runs first when the run resumes)."""
        t, p = self.cfg.train, self.progress
        self.task.model.train()
        params = [q for g in self.optimizer.param_groups for q in g["params"]]
        previous = {}
        for signum in STOP_SIGNALS:
            try:
                previous[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread
                pass
        bar = tqdm(total=t.max_steps, initial=p.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=None if self.rank.main else True)
        self.window = window = LogWindow(self.device, p.window_loss, p.window_tokens)
        if self.cfg.train.tensorboard and self.rank.main:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run first drops the events a crashed session wrote after its checkpoint
            self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"),
                                             purge_step=p.step + 1 if p.step else None)
        clock, elapsed_before = time.perf_counter(), p.elapsed
        stop = p.step >= t.max_steps
        try:
            if p.eval_due:     # the evaluation a signal put off, before anything else
                stop = self.evaluate_and_save() or self._told_to_stop() or stop
            while not stop:
                batches = self.task.train_batches(p.epoch)
                if len(batches) == 0:
                    raise TrainingError("the training data yields no batches; check data and batch size")
                while p.batch_index < len(batches) and not stop:
                    out, norm, lr = self._step(batches[p.batch_index], params)
                    if p.step % RELEASE_EVERY == 0:
                        release_freed_memory()
                    if p.nonfinite_run == 0:
                        window.add(out)
                    p.elapsed = elapsed_before + time.perf_counter() - clock
                    if p.step % t.log_every == 0:
                        record = window.flush(p.step, p.elapsed, lr, norm, out.logs, self.rank)
                        self._log(record)
                        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}",
                                        tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
                    if t.gradient_flow_every and p.step % t.gradient_flow_every == 0:
                        flow = self.task.gradient_flow()
                        self._log({"kind": "gradient_flow", "step": p.step, **flow.summary()})
                    bar.update(1)
                    timed_out = t.max_time is not None and p.elapsed >= t.max_time
                    if self.rank.world > 1:    # every rank stops at the same step: one collective
                        signalled, timed_out = distributed.any_rank([self.stop_signal is not None, timed_out],
                                                                    self.device)
                        if signalled and self.stop_signal is None:
                            self.stop_signal, self.exit_code = "SIGTERM", 143   # another rank was told
                    if self.stop_signal is not None:
                        stop, p.eval_due = True, p.step % t.eval_every == 0 or p.step >= t.max_steps
                    else:
                        stop = p.step >= t.max_steps or timed_out
                        if p.step % t.eval_every == 0 or stop:
                            stop = self.evaluate_and_save() or self._told_to_stop() or stop
                if p.batch_index >= len(batches):
                    p.epoch, p.batch_index = p.epoch + 1, 0
            if self.stop_signal is not None:
                self.save_last()
                if self.rank.main:
                    tqdm.write(f"stopped by {self.stop_signal} at step {p.step}; saved {self.run_dir / 'last.pt'}")
        except TrainingError:
            with contextlib.suppress(TrainingError, OSError):
                self.save_last()     # the weights are still the last finite ones
            raise
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()
                self.tensorboard = None
            if self._grace_timer is not None:
                self._grace_timer.cancel()
            bar.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if self.lock is not None:
                self.lock.release()
        summary = {"steps": p.step, "epochs": p.epoch, "seconds": round(p.elapsed, 1),
                   "best_" + t.metric: p.best, "best_step": p.best_step, **p.last_eval,
                   "nonfinite_skipped": p.nonfinite, "stopped_by": self.stop_signal or self.stopped_by or "-",
                   "precision": self.precision}
        if self.rank.main:
            self._print_summary(summary)
        return summary

    def _told_to_stop(self) -> bool:
        """Whether :attr:`after_eval` ends training at this evaluation."""
        if self.after_eval is None:
            return False
        reason = self.after_eval(self.progress.step, dict(self.progress.last_eval))
        if reason:
            self.stopped_by = reason
            if self.rank.main:
                tqdm.write(f"step {self.progress.step}: stopped ({reason}); last.pt holds this step")
        return bool(reason)

    def _print_summary(self, summary: dict[str, Any]) -> None:
        table = Table(title=f"rnnkit: {self.cfg.task} run in {self.run_dir}", show_header=False)
        table.add_column("what", style="bold")
        table.add_column("value")
        for k, v in summary.items():
            if isinstance(v, float):
                v = format_number(v)
            table.add_row(k, str(v))
        table.add_row("checkpoints", f"{self.run_dir / 'last.pt'}, {self.run_dir / 'best.pt'}")
        self.console.print(table)
