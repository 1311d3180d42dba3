"""rnnkit tune: the space checked before any trial, trials as run folders, topping up,
pruning with the state saved, failures that do not stop the study, kill -9 and resume."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rnnkit.cli import app
from rnnkit.config import load_config
from tests.conftest import ROOT, tiny_lm_config, write_yaml

optuna = pytest.importorskip("optuna", reason="rnnkit tune needs the tune extra (optuna)")
runner = CliRunner()
SPACE = {"train.lr": {"low": 1.0e-3, "high": 3.0e-2, "log": True}, "model.hidden_size": {"choices": [16, 32]}}


def _files(tmp_path, steps: int = 4, every: int = 2, space: dict | None = None):
    cfg = tiny_lm_config(tmp_path, run_dir=str(tmp_path / "unused"))
    cfg["train"].update(max_steps=steps, eval_every=every)
    return write_yaml(tmp_path / "lm.yaml", cfg), write_yaml(tmp_path / "space.yaml", space or SPACE)


def _tune(*args: str):
    return runner.invoke(app, ["tune", *args])


@pytest.mark.parametrize("space,sampler,words", [
    ({"train.lrr": {"low": 1, "high": 2}}, "tpe", "train.lrr: unknown key (did you mean 'lr'?)"),
    ({"model.cell": {"low": 1, "high": 2}}, "tpe", "model.cell: is not a number, so it takes {choices"),
    ({"model.cell": {"choices": ["lstm", "transformer"]}}, "tpe", "the choice 'transformer' is refused by the config"),
    ({"model.num_layers": {"low": 1, "high": 2.5}}, "tpe", "is an integer key; high 2.5 is not an integer"),
    ({"model.dropout": {"low": 0.1, "high": 0.6}}, "grid", "the grid sampler needs every range to have a step"),
    ({"train.lr": {"low": 0.0, "high": 0.1, "log": True}}, "tpe", "a log range needs low above 0"),
    ({"train": {"choices": [1]}}, "tpe", "train: is a section"),
])
def test_a_bad_space_is_one_line_before_any_trial(tmp_path, space, sampler, words):
    config, space_file = _files(tmp_path, space=space)
    result = _tune(str(config), str(space_file), "--dir", str(tmp_path / "runs"), "--sampler", sampler)
    assert result.exit_code == 2, result.output
    assert words in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "runs").exists()


def test_bad_sampler_and_show_of_nothing(tmp_path):
    config, space = _files(tmp_path)
    result = _tune(str(config), str(space), "--sampler", "bayes")
    assert result.exit_code == 2 and "--sampler must be one of tpe, random, grid" in result.output
    result = _tune("--show", str(tmp_path))
    assert result.exit_code == 2 and "not a study folder" in result.output


def test_a_sweep_is_run_folders_and_the_same_command_tops_it_up(tmp_path):
    config, space = _files(tmp_path)
    runs = tmp_path / "runs"
    result = _tune(str(config), str(space), "--trials", "2", "--dir", str(runs), "--study", "s", "--seed", "0",
                   "--pruner", "none")
    assert result.exit_code == 0, result.output
    study = runs / "s"
    for n in (0, 1):
        trial = study / f"trial-000{n}"
        assert {"config.yaml", "metrics.jsonl", "best.pt", "last.pt"} <= {f.name for f in trial.iterdir()}
    first = (study / "trial-0000" / "best.pt").stat().st_mtime_ns
    result = _tune(str(config), str(space), "--trials", "3", "--dir", str(runs), "--study", "s", "--seed", "0",
                   "--pruner", "none")
    assert result.exit_code == 0, result.output
    assert "2 of 3 trials finished" in result.output
    assert sorted(p.name for p in study.glob("trial-*")) == ["trial-0000", "trial-0001", "trial-0002"]
    assert (study / "trial-0000" / "best.pt").stat().st_mtime_ns == first          # not run again
    loaded = optuna.load_study(study_name="s", storage=f"sqlite:///{study / 'study.db'}")
    values = {t.number: t.value for t in loaded.trials}
    assert len(values) == 3 and all(v is not None for v in values.values())
    best = loaded.best_trial
    cfg = load_config(study / "best.yaml")                                           # ready for rnnkit train
    assert cfg.train.lr == pytest.approx(best.params["train.lr"]) and cfg.model.hidden_size == best.params[
        "model.hidden_size"]
    assert cfg.run_dir == str(study.resolve() / "best")                                 # a new run folder
    assert f"trial {best.number} (trial-{best.number:04d})" in (study / "best.yaml").read_text()
    assert len({(t.params["train.lr"], t.params["model.hidden_size"]) for t in loaded.trials}) == 3  # no replay
    shown = _tune("--show", str(study))
    assert shown.exit_code == 0, shown.output
    assert "3 trials, best first" in shown.output and "importances:" in shown.output
    assert {"optimization_history.png", "intermediate_values.png", "parallel_coordinate.png"} <= {
        p.name for p in study.iterdir()}


def test_a_pruned_trial_stops_with_its_state_saved(tmp_path, monkeypatch):
    from rnnkit.tune.space import read_space
    from rnnkit.tune.study import StudySpec
    from rnnkit.tune.trial import run_trial

    config, space = _files(tmp_path, steps=8, every=2)
    spec = StudySpec("p", tmp_path / "study", "", config, space, "tpe", "asha", 1, None, 0)
    study = optuna.create_study()
    trial = study.ask()
    monkeypatch.setattr(trial, "should_prune", lambda: True)
    with pytest.raises(optuna.TrialPruned):
        run_trial(study, trial, spec, read_space(space, config))
    folder = tmp_path / "study" / "trial-0000"
    evals = [line for line in (folder / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert len(evals) == 1 and '"step": 2' in evals[0]                 # stopped at the first evaluation
    import torch

    assert torch.load(folder / "last.pt", weights_only=False)["progress"]["step"] == 2
    assert trial.user_attrs["steps"] == 2


def test_a_failed_trial_has_its_reason_and_the_study_goes_on(tmp_path, monkeypatch):
    import rnnkit.runs
    from rnnkit.training.interface import TrainingError

    config, space = _files(tmp_path, space={"model.hidden_size": {"choices": [16, 32]}})
    real = rnnkit.runs.prepare_trainer

    def refuse_32(cfg, resume=False):
        if cfg.model.hidden_size == 32:
            raise TrainingError("loss is NaN at step 3")
        return real(cfg, resume)

    monkeypatch.setattr(rnnkit.runs, "prepare_trainer", refuse_32)
    runs = tmp_path / "runs"
    result = _tune(str(config), str(space), "--trials", "4", "--dir", str(runs), "--study", "f", "--sampler", "grid",
                   "--pruner", "none")
    assert result.exit_code == 0, result.output       # one trial completed
    assert "failed" not in result.output or "fail" in result.output
    study = optuna.load_study(study_name="f", storage=f"sqlite:///{runs / 'f' / 'study.db'}")
    states = {t.params["model.hidden_size"]: (t.state.name, t.user_attrs.get("reason")) for t in study.trials}
    assert states[16][0] == "COMPLETE"
    assert states[32] == ("FAIL", "TrainingError: loss is NaN at step 3")
    assert "TrainingError: loss is NaN at step 3" in result.output
    assert len(study.trials) == 2                   # the grid's two points, then it stops


def test_kill_9_then_the_same_command_continues_the_trial(tmp_path):
    config, space = _files(tmp_path, steps=400, every=5)
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "rnnkit", "tune", str(config), str(space), "--trials", "1", "--dir", str(runs),
           "--study", "k", "--seed", "1"]
    env = {**os.environ, "RNNKIT_TUNE_HEARTBEAT": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    last = runs / "k" / "trial-0000" / "last.pt"
    end = time.time() + 120
    while not last.exists() and time.time() < end and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)            # mid-trial: last.pt holds an early evaluation
    assert last.exists()
    proc.wait()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    study = optuna.load_study(study_name="k", storage=f"sqlite:///{runs / 'k' / 'study.db'}")
    states = [(t.number, t.state.name) for t in study.trials]
    assert states == [(0, "FAIL"), (1, "COMPLETE")]                       # no number used twice
    assert study.trials[1].params == study.trials[0].params
    log = (runs / "k" / "trial-0001" / "metrics.jsonl").read_text().splitlines()
    steps = [yaml.safe_load(line)["step"] for line in log if '"eval"' in line]
    assert steps[0] == 5 and steps[-1] == 400 and steps == sorted(set(steps))   # continued, not restarted
    trained = (runs / "k" / "trial-0001" / "train.log").read_text()
    assert "step 5:" not in trained and "step 400:" in trained     # step 5 came with the copied last.pt


@pytest.mark.parametrize("name", ["sentiment", "forecast_etth1"])
def test_the_shipped_spaces_fit_their_configs(name):
    from rnnkit.tune.space import read_space

    config = ROOT / "configs" / f"{name}.yaml"
    if not (ROOT.parent / "shared" / "data").is_dir():
        pytest.skip("../shared/data is absent: the shipped configs point at its corpora")
    params = read_space(ROOT / "configs" / "sweeps" / f"{name}.yaml", config)
    assert len(params) >= 5


def _check_no_trial_lost_or_duplicated(study, folder, n: int) -> None:
    """``n`` complete trials numbered 0..n-1, each in its own folder run once with its own parameters."""
    assert sorted(t.number for t in study.trials) == list(range(n))
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * n
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == n
    for t in study.trials:
        trial = folder / f"trial-{t.number:04d}"
        cfg = load_config(trial / "config.yaml")
        assert cfg.train.lr == pytest.approx(t.params["train.lr"]) and cfg.model.hidden_size == t.params[
            "model.hidden_size"]
        starts = [line for line in (trial / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
        steps = [yaml.safe_load(line)["step"] for line in starts]
        assert steps == [2, 4], steps              # one run wrote it: no step twice, none missing


def _two_workers(tmp_path, storage: str | None) -> tuple:
    config, space = _files(tmp_path)
    runs = tmp_path / "runs"
    extra = ["--storage", storage] if storage else []
    cmd = [sys.executable, "-m", "rnnkit", "tune", str(config), str(space), "--trials", "6", "--jobs", "2",
           "--dir", str(runs), "--study", "two", "--seed", "3", "--pruner", "none", *extra]
    done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return runs / "two", done.stdout + done.stderr


def test_two_workers_share_one_sqlite_study(tmp_path):
    folder, out = _two_workers(tmp_path, None)
    assert "2 jobs" in out
    study = optuna.load_study(study_name="two", storage=f"sqlite:///{folder / 'study.db'}")
    _check_no_trial_lost_or_duplicated(study, folder, 6)
    workers = {t.user_attrs.get("worker") for t in study.trials}
    assert workers == {0, 1}, workers                  # both took trials


def _postgres_binaries() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return versions[-1].parent if versions else None


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server on 127.0.0.1, run by an unprivileged user (``postgres``
    when the tests run as root), stopped afterwards."""
    pytest.importorskip("psycopg", reason="the PostgreSQL driver (psycopg, in the test extra) is missing")
    bin_dir = _postgres_binaries()
    if bin_dir is None:
        pytest.skip("PostgreSQL's server programs (initdb, pg_ctl) are not installed: Debian's postgresql package")
    as_user: list[str] = []
    data = Path(tempfile.mkdtemp(prefix="rnnkit-pg-"))
    if os.geteuid() == 0:                    # initdb refuses root
        import pwd

        # the package's 'postgres' user where it made one, else 'nobody', which every Linux has
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            user = pwd.getpwnam("nobody")
        os.chown(data, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", user.pw_name, "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = data / "db"

    def pg(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, capture_output=True, timeout=120)

    pg(str(bin_dir / "initdb"), "-D", str(db), "-U", "rnnkit", "--auth=trust", "--no-sync")
    pg(str(bin_dir / "pg_ctl"), "-D", str(db), "-l", str(data / "server.log"), "-w", "-o",
       f"-h 127.0.0.1 -p {port} -k {data} -c fsync=off", "start")
    try:
        yield f"postgresql://rnnkit@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(db), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(data, ignore_errors=True)


def test_two_workers_share_one_postgresql_study(tmp_path, postgres_url):
    folder, out = _two_workers(tmp_path, postgres_url)
    assert not (folder / "study.db").exists()                  # the study lives on the server
    study = optuna.load_study(study_name="two", storage=postgres_url)
    _check_no_trial_lost_or_duplicated(study, folder, 6)
    shown = _tune("--show", "two", "--storage", postgres_url, "--dir", str(folder.parent))
    assert shown.exit_code == 0 and "6 trials, best first" in shown.output, shown.output


def test_a_bad_storage_url_is_one_line(tmp_path):
    config, space = _files(tmp_path)
    for url, words in [("nosuchdb://x", "cannot open the study's storage"),
                       ("postgresql://nobody@127.0.0.1:1/none", "cannot open the study's storage")]:
        result = _tune(str(config), str(space), "--storage", url, "--dir", str(tmp_path / "runs"))
        assert result.exit_code == 2, result.output
        assert words in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_the_median_pruner_stops_a_clearly_worse_curve(tmp_path):
    """A toy with a known answer: a trial that learns sets the median; one whose learning rate
    is a millionth of it stays at the untrained loss and is stopped at its first evaluation."""
    from rnnkit.tune.space import read_space
    from rnnkit.tune.study import StudySpec
    from rnnkit.tune.trial import run_trial

    config, space = _files(tmp_path, steps=12, every=4, space={"train.lr": {"low": 1e-9, "high": 0.1, "log": True}})
    spec = StudySpec("m", tmp_path / "study", "", config, space, "tpe", "median", 1, None, 0)
    params = read_space(space, config)
    study = optuna.create_study(direction="minimize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    values = []
    for lr in (3e-2, 3e-8):
        study.enqueue_trial({"train.lr": lr})
        trial = study.ask()
        try:
            values.append(run_trial(study, trial, spec, params))
            study.tell(trial, values[-1])
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED"]
    assert study.trials[1].user_attrs["steps"] == 4                # stopped at its first evaluation
    assert study.trials[1].intermediate_values[4] > study.trials[0].intermediate_values[4]


def test_best_yaml_is_the_best_trial_not_the_last(tmp_path):
    """Trials finishing 0.5, 0.1, 0.9 (lower is better): best.yaml is trial 1's config, though
    trial 2 finished last and trial 0 first."""
    from rnnkit.tune.study import write_best

    study = optuna.create_study(direction="minimize", study_name="s")
    for n, value in enumerate((0.5, 0.1, 0.9)):
        folder = tmp_path / f"trial-{n:04d}"
        folder.mkdir()
        cfg = tiny_lm_config(tmp_path, run_dir=str(folder))
        cfg["train"]["lr"] = [0.01, 0.02, 0.03][n]
        write_yaml(folder / "config.yaml", cfg)
        trial = study.ask()
        trial.set_user_attr("folder", folder.name)
        study.tell(trial, value)
    path = write_best(study, tmp_path)
    assert load_config(path).train.lr == 0.02 and "trial 1 (trial-0001)" in path.read_text()


def test_a_binary_search_space_is_one_line_and_exit_2(tmp_path):
    config, _ = _files(tmp_path)
    space = tmp_path / "space.bin"
    space.write_bytes(bytes(range(256)) * 4)
    result = _tune(str(config), str(space), "--trials", "1", "--dir", str(tmp_path / "runs"))
    assert result.exit_code == 2 and "not UTF-8 text" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()
