"""Training tokens/s of rnnkit's loop against a minimal hand-written PyTorch loop.

Both train a character LSTM LM of the same shape (2 layers, hidden 512, embedding 128,
batch 64, bptt 128) on tiny shakespeare, with Adam and gradient clipping, hidden state
carried and detached. They run alternately in this process, and the script prints the
ratio rnnkit / raw (target: >= 0.95).

    python bench/lm_throughput.py [--steps 8] [--rounds 2] [--device auto] [--quick]

--quick: a small model and one short round (checks that the benchmark runs; not a measurement).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
HIDDEN, LAYERS, EMBED, BATCH, BPTT = 512, 2, 128, 64, 128
QUICK_SETS = ["model.hidden_size=32", "model.embedding_dim=16", "train.batch_size=8", "data.bptt=16"]


def use_quick_shapes() -> list[str]:
    """--quick: the small shapes for both loops; the --set overrides that give rnnkit's the same."""
    global HIDDEN, EMBED, BATCH, BPTT
    HIDDEN, EMBED, BATCH, BPTT = 32, 16, 8, 16
    return QUICK_SETS


def raw_loop(stream: torch.Tensor, vocab: int, device: torch.device, warmup: int, steps: int) -> float:
    """The baseline: what a person would write by hand. Returns tokens/s over ``steps``."""
    torch.manual_seed(0)
    emb = nn.Embedding(vocab, EMBED).to(device)
    lstm = nn.LSTM(EMBED, HIDDEN, LAYERS, batch_first=True).to(device)
    out = nn.Linear(HIDDEN, vocab).to(device)
    params = [*emb.parameters(), *lstm.parameters(), *out.parameters()]
    opt = torch.optim.Adam(params, lr=2e-3)
    state = None
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        s = (i * BPTT) % (stream.size(1) - BPTT - 1)
        x, y = stream[:, s:s + BPTT], stream[:, s + 1:s + 1 + BPTT]
        h, state = lstm(emb(x), state)
        state = tuple(t.detach() for t in state)
        loss = F.cross_entropy(out(h).reshape(-1, vocab), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
    _sync(device)
    return steps * BATCH * BPTT / (time.perf_counter() - start)


def rnnkit_loop(device: torch.device, warmup: int, steps: int, run_dir: Path, extra: list[str] = ()) -> float:
    """rnnkit's Trainer on the same shapes (``extra``: more --set overrides); tokens/s between
    logged steps ``warmup`` and the end."""
    from rnnkit.config import load_config
    from rnnkit.runs import prepare_trainer

    overrides = [f"run_dir={run_dir}", f"train.max_steps={warmup + steps}", "train.log_every=1",
                 "train.eval_every=100000", "train.max_time=null", "train.lr_schedule=constant",
                 "train.warmup_steps=0", "model.dropout=0.0", f"train.device={device}",
                 f"data.path={CORPUS}", *extra]
    cfg = load_config(ROOT / "configs" / "char_lm.yaml", overrides)
    trainer = prepare_trainer(cfg)
    trainer.task.evaluate = lambda: {"loss": 0.0}   # evaluation is not training throughput
    trainer.fit()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    t = {r["step"]: r["elapsed"] for r in rows if r["kind"] == "train"}
    return steps * BATCH * BPTT / (t[warmup + steps] - t[warmup])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="a small model, one short round: checks that it runs")
    args = ap.parse_args()
    extra = use_quick_shapes() if args.quick else []
    if args.quick:
        args.steps, args.warmup, args.rounds = 2, 1, 1
    if not CORPUS.exists():
        print(f"skipped: {CORPUS} is absent (the shared corpora are needed)")
        return 0
    from rnnkit.training.interface import resolve_device
    from rnnkit.data.vocab import UNK, CharTokenizer, Vocab
    from rnnkit.tasks.language_model import batchify

    device = resolve_device(args.device)
    text = CORPUS.read_text(encoding="utf-8")[: int(1115394 * 0.9)]
    vocab = Vocab.build(CharTokenizer().split(text), [UNK])
    stream = torch.from_numpy(np.ascontiguousarray(batchify(np.asarray(vocab.encode(text)), BATCH))).to(device)
    raw, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            raw.append(raw_loop(stream, len(vocab), device, args.warmup, args.steps))
            ours.append(rnnkit_loop(device, args.warmup, args.steps, Path(tmp) / f"r{r}", extra))
            print(f"round {r + 1}: raw {raw[-1]:.0f} tok/s, rnnkit {ours[-1]:.0f} tok/s", file=sys.stderr)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    best_raw, best_ours = max(raw), max(ours)
    print(f"device: {name}; torch {torch.__version__}")
    print(f"raw PyTorch loop: {best_raw:,.0f} tokens/s (best of {args.rounds})")
    print(f"rnnkit Trainer:   {best_ours:,.0f} tokens/s (best of {args.rounds})")
    print(f"ratio rnnkit/raw: {best_ours / best_raw:.3f}  (target >= 0.95)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
