"""The newer cells (minGRU, minLSTM, RG-LRU, sLSTM, mLSTM) in every task: training that
resumes exactly, and inference from the checkpoint (generation, incremental feeding, beam
search, int8)."""
from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit.config import load_config
from rnnkit.runs import load_task
from tests.conftest import write_yaml
from tests.test_crash_safety import (assert_same_weights, last_step, launch, records, task_config, train_in_process,
                                     wait_for)

TASK_CELLS = [("lm", "mingru"), ("translation", "minlstm"), ("tagging", "rglru"), ("documents", "minlstm"),
              ("forecast", "mingru"), ("adding", "rglru"), ("copy", "minlstm"), ("classification_hops", "mingru"),
              ("lm", "slstm"), ("translation", "mlstm"), ("tagging", "mlstm"), ("forecast", "slstm"),
              ("adding", "mlstm"), ("classification_hops", "slstm"), ("tagging", "hawk"), ("lm", "mlstm_block"),
              ("translation", "slstm_block")]
BLOCKED = {"hawk": "rglru", "mlstm_block": "mlstm", "slstm_block": "slstm"}     # the cell in its paper's block


def scan_config(task: str, cell: str, tmp_path, name: str) -> dict:
    cfg = task_config(task, tmp_path, name)
    m = cfg["model"]
    for part in (m["encoder"], m["decoder"]) if "encoder" in m else (m,):
        part["cell"] = BLOCKED.get(cell, cell)
        if cell in BLOCKED:
            part["block"] = True
        if part["cell"] in ("slstm", "mlstm"):
            part["cell_heads"] = 2
    return cfg


@pytest.mark.parametrize("task,cell", TASK_CELLS)
def test_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path, task, cell):
    full = write_yaml(tmp_path / "full.yaml", scan_config(task, cell, tmp_path, "full"))
    part = write_yaml(tmp_path / "part.yaml", scan_config(task, cell, tmp_path, "part"))
    train_in_process(full)
    assert train_in_process(part, signal_at=12).stop_signal == "SIGTERM"
    train_in_process(part, resume=True)
    assert_same_weights(tmp_path / "full" / "last.pt", tmp_path / "part" / "last.pt")
    assert records(tmp_path / "full") == records(tmp_path / "part")
    assert type(load_task(tmp_path / "full" / "last.pt").model).__name__   # the checkpoint rebuilds


@pytest.mark.parametrize("cell,task", [("mingru", "lm"), ("minlstm", "translation"), ("rglru", "lm"),
                                       ("slstm", "lm"), ("mlstm", "translation")])
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, cell, task):
    """A training process killed outright (no handler runs) resumes from its last checkpoint,
    carried recurrent state included, to the weights and curve of a run never killed."""
    import signal

    def config(name: str):
        cfg = scan_config(task, cell, tmp_path, name)
        cfg["train"].update(max_steps=60, eval_every=6)
        return write_yaml(tmp_path / f"{name}.yaml", cfg)

    train_in_process(config("reference"))
    killed, run = config("killed"), tmp_path / "killed"
    proc = launch(killed)
    if not wait_for(lambda: last_step(run) >= 20, proc, timeout=120):
        pytest.fail(f"training ended before the kill: {proc.stderr.read()[-500:]}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last_step(run) < 60
    train_in_process(killed, resume=True)
    assert_same_weights(tmp_path / "reference" / "last.pt", run / "last.pt")
    assert records(tmp_path / "reference") == records(run)


def _trained(tmp_path, task, cell, **model):
    cfg = scan_config(task, cell, tmp_path, "run")
    cfg["model"].update(model)
    train_in_process(write_yaml(tmp_path / "c.yaml", cfg))
    return tmp_path / "run" / "last.pt"


@pytest.mark.parametrize("cell", ["mingru", "minlstm", "rglru", "slstm", "mlstm", "hawk", "mlstm_block",
                                  "slstm_block"])
def test_language_model_fed_in_pieces_scores_as_the_whole_text(tmp_path, cell):
    """The step path (incremental feeding, generation) and the scan over a whole text give the
    same log-probabilities; greedy generation is the argmax chain of one pass over its output."""
    m = rnnkit.load(_trained(tmp_path, "lm", cell, num_layers=2))
    text = "The harbour was quiet in the morning, and the boats lay still."
    run = m.incremental()
    for piece in ("The harb", "o", "ur was quiet in the morning", ", and the boats lay still."):
        run.feed(piece)
    task = m.task
    ids = task.encode(text)
    with torch.no_grad():
        logp = task.model.log_probs(task.model.features(torch.tensor([ids[:-1]])).output)[0]
    whole = logp.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(torch.tensor(run.log_probs, dtype=torch.float64), whole.double(), atol=1e-4)
    greedy = "The" + m.generate("The", 30, top_k=1)
    chain = task.encode(greedy)
    with torch.no_grad():
        best = task.model.log_probs(task.model.features(torch.tensor([chain[:-1]])).output)[0].argmax(-1)
    assert best[2:].tolist() == chain[3:]
    int8 = rnnkit.load(tmp_path / "run" / "last.pt", int8=True)
    assert any("quantized" in type(q).__module__ for q in int8.task.model.modules())
    assert len(int8.generate("The", 20, seed=1)) > 0


@pytest.mark.parametrize("cell", ["rglru", "mlstm", "mlstm_block"])
def test_beam_search_with_new_cells_decodes_each_sentence_as_alone(tmp_path, cell):
    """Beam rows are reordered by index (an mLSTM's whole memory with them): a sentence
    decoded in a batch of others and beams gives what it gives alone."""
    m = rnnkit.load(_trained(tmp_path, "translation", cell))
    lines = ["the boat", "a quiet harbour in the morning", "the sea"]
    together = m.translate(lines, beam=4)
    assert together == [m.translate([line], beam=4)[0] for line in lines]
    assert m.translate(lines, beam=1) == [m.translate([line], beam=1)[0] for line in lines]


@pytest.mark.parametrize("cell", ["mingru", "mlstm"])
def test_gradient_flow_probe_reads_a_new_cell(tmp_path, cell):
    cfg = load_config(write_yaml(tmp_path / "c.yaml", scan_config("adding", cell, tmp_path, "run")))
    from rnnkit.runs import prepare_trainer

    task = prepare_trainer(cfg).task
    flow = task.gradient_flow()
    assert len(flow.distances) > 1 and all(v > 0 for v in flow.norms)
