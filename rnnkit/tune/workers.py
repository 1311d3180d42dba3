"""Trial processes: one loop per worker that takes trials until the study has its total, and
the parent that starts ``--jobs`` of them.

Each worker gets its share of the CPU threads and, with GPUs, one GPU (round-robin over
``CUDA_VISIBLE_DEVICES``). A worker exits when the tune process dies (Linux: the kernel
sends it SIGTERM; elsewhere it notices its parent is gone): its trial stops as after
SIGTERM, with last.pt saved, and the next command continues it.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from typing import Callable

from rnnkit.tune.space import read_space
from rnnkit.tune.study import WORKER_VARIABLE, StudySpec, heartbeat_grace, heartbeat_interval, open_study, progress, write_best
from rnnkit.tune.trial import Interrupted, folder_name, run_trial



def _die_with_parent() -> None:
    """SIGTERM to this process when its parent exits (then training stops as after SIGTERM)."""
    parent = os.getppid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)     # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:      # it died before the call took
        os.kill(os.getpid(), signal.SIGTERM)

    def watch() -> None:            # where prctl is not there
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()


class ClaimLock:
    """Held from a worker's count of the study's trials until the trial it then starts exists,
    so that two workers cannot both see one trial left and both start it: an exclusive lock
    on a file in the study's folder, which every worker of a study shares (on one machine, or
    on a shared filesystem)."""

    def __init__(self, folder) -> None:
        self.path, self.fd = folder / ".claim.lock", None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)          # closing the descriptor drops the lock
            self.fd = None


def describe_trial(trial, metric: str) -> str:
    """One line for a finished trial: number, state, value or reason, parameters."""
    state = trial.state.name.lower()
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    if state == "complete":
        what = f"{metric} {trial.value:.4g}"
    elif state == "pruned":
        what = f"pruned at step {trial.user_attrs.get('steps', '?')}"
    else:
        what = trial.user_attrs.get("reason", "interrupted; the next command continues it")
    return f"trial {trial.number} ({folder_name(trial.number)}) {state}: {what}  [{params}]"


def work(spec: StudySpec, say: Callable[[str], None]) -> bool:
    """Take trials until the study has ``spec.trials`` finished ones, the time is up, the grid
    is exhausted, or a signal stops a trial (then True)."""
    import optuna

    params = read_space(spec.space, spec.config, spec.sampler)
    study = open_study(spec, params)
    deadline = None if spec.timeout is None else time.monotonic() + spec.timeout
    stop = threading.Event()

    claim = ClaimLock(spec.folder)

    def objective(trial):
        claim.release()                 # the trial exists: the next count includes it
        try:
            return run_trial(study, trial, spec, params)
        except Interrupted:
            stop.set()
            raise

    def finished(study, trial) -> None:
        say(describe_trial(trial, study.user_attrs.get("metric", "value")))
        if trial.state == optuna.trial.TrialState.COMPLETE:
            write_best(study, spec.folder)

    waited = False
    while not stop.is_set():
        if deadline is not None and time.monotonic() >= deadline:
            break
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")         # Optuna marks heartbeats experimental
            optuna.storages.fail_stale_trials(study)    # a dead worker's trial: failed, and queued again
        claim.acquire()
        done, busy = progress(study)
        if done >= spec.trials:
            claim.release()
            break
        if done + busy >= spec.trials:     # the rest is running: another worker's, or a dead one's
            claim.release()
            if not waited:
                say(f"waiting for {busy} running trial(s): another worker's, or one left by a worker that died "
                    f"(tried again once its heartbeat is {heartbeat_grace()} s old)")
                waited = True
            time.sleep(heartbeat_interval())
            continue
        sampler = study.sampler
        if isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(study):
            claim.release()
            break
        try:
            study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[finished])
        finally:
            claim.release()
    return stop.is_set()


def threads_per_worker(jobs: int) -> int:
    """Each worker's share of the CPUs this process may run on (a SLURM job or ``taskset``
    narrows them: the machine's count would oversubscribe)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:             # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // jobs)


def gpus() -> list[str]:
    """The GPUs workers share: CUDA_VISIBLE_DEVICES's, or every one torch sees."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [g for g in given.split(",") if g.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def run_parallel(spec: StudySpec, jobs: int, say: Callable[[str], None]) -> int:
    """``jobs`` worker processes; their lines pass through. The exit code of the first that
    failed, else 0. SIGINT and SIGTERM reach them (their trials stop and are queued)."""
    devices, threads = gpus(), threads_per_worker(jobs)
    procs = []
    for i in range(jobs):
        env = {**os.environ, WORKER_VARIABLE: str(i), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = devices[i % len(devices)]
        # a session of its own: a terminal's Ctrl-C reaches the parent alone, which passes it on
        # once (twice would abort a trial without saving its state)
        procs.append(subprocess.Popen([sys.executable, "-m", "rnnkit.tune.worker", spec.to_json()], env=env,
                                      stdout=subprocess.PIPE, text=True, bufsize=1, start_new_session=True))

    def forward(signum, frame) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    readers = [threading.Thread(target=lambda p=p: [say(line.rstrip("\n")) for line in p.stdout], daemon=True)
               for p in procs]
    try:
        for r in readers:
            r.start()
        codes = [p.wait() for p in procs]
        for r in readers:
            r.join(timeout=5)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return next((c for c in codes if c not in (0, None)), 0)
