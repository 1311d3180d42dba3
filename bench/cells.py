"""Training speed and memory of the newer cells (minGRU, minLSTM, RG-LRU, sLSTM, mLSTM)
against torch's fused LSTM and GRU and against the published implementations, as the
sequence grows.

One recurrent layer, batch 32, input width = hidden size, a forward and a backward pass over
random inputs (loss: the outputs' sum). Each (cell, hidden, length, precision) runs in a
fresh process of its own, with the allocator setting the ``rnnkit`` command trains with
(glibc keeps freed memory for the next tensors; ``rnnkit.hardware.keep_freed_memory``):
tokens per second (best of ``--repeats`` after one warm-up) and
peak memory (resident memory's peak during the passes above what the process held before
them; on a GPU, torch's peak allocation). The table gives each cell's ratio to the fused
LSTM measured in the same run. Then step-form generation: one layer stepped token by token
at batch 1, time per token against the LSTM's.

Published implementations, where installed (``pip install -e .[refs]``): ``mingru-pytorch``'s
minGRU and minLSTM (the log-space scan), ``recurrentgemma``'s RG-LRU behind a linear
input projection (rnnkit's RG-LRU cell has one; theirs takes its width as it is), and
``xlstm``'s native PyTorch mLSTM (its parallel form) and sLSTM (its vanilla loop), each
behind the same input projection as rnnkit's cell (4 heads).

    python bench/cells.py [--hidden 512 1024] [--lengths 64 256 1024 4096] [--precision fp32 bf16]
                          [--cells lstm gru mingru ...] [--repeats 2] [--plot PNG] [--json FILE] [--compile]
                          (--cells also takes hawk, mlstm_block, slstm_block: the cells in their blocks)
    python bench/cells.py --quick     (small sizes, in one process: checks that it runs)
    python bench/cells.py --plot PNG --plot-from A.json B.json [--hidden 512] [--precision fp32]
                          (one plot from the --json files of several runs)
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OURS = ("mingru", "minlstm", "rglru", "slstm", "mlstm")
BASELINES = ("lstm", "gru")
BLOCKS = {"hawk": "rglru", "mlstm_block": "mlstm", "slstm_block": "slstm"}     # cells in their papers' blocks
REFERENCES = {"mingru-pytorch": "minGRU_pytorch", "minlstm-pytorch": "minGRU_pytorch",
              "recurrentgemma": "recurrentgemma", "xlstm-mlstm": "xlstm", "xlstm-slstm": "xlstm"}
GOALS = {"mingru": 5.0, "minlstm": 5.0, "mlstm": 2.0}     # tokens/s against the fused LSTM at length 1,024


def reference_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(REFERENCES[name]) is not None


def build(cell: str, hidden: int):
    """A one-layer module mapping (B, T, hidden) to (B, T, hidden) (and whatever else)."""
    import torch
    from torch import nn

    if cell in BASELINES:
        return {"lstm": nn.LSTM, "gru": nn.GRU}[cell](hidden, hidden, batch_first=True)
    if cell in OURS:
        from rnnkit.models.rnn import make_rnn

        return make_rnn(cell, hidden, hidden, 1)
    if cell in BLOCKS:
        from rnnkit.models.rnn import make_rnn

        return make_rnn(BLOCKS[cell], hidden, hidden, 1, block=True)
    if cell == "mingru-pytorch":
        from minGRU_pytorch import minGRU

        return minGRU(hidden)
    if cell == "minlstm-pytorch":
        from minGRU_pytorch.minLSTM import minLSTM

        return minLSTM(hidden)
    if cell.startswith("xlstm"):
        return xlstm_reference(cell, hidden)
    from tests.test_scan_references import _recurrentgemma_torch

    rglru = _recurrentgemma_torch().RGLRU(hidden, num_heads=1)

    class Projected(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.rglru = nn.Linear(hidden, hidden), rglru

        def forward(self, x):
            positions = torch.arange(x.size(1), device=x.device).expand(x.size(0), -1)
            return self.rglru(self.inp(x), positions)[0]

    return Projected()


def xlstm_reference(cell: str, hidden: int, heads: int = 4):
    """xlstm's native PyTorch mLSTM (parallel form) or sLSTM (vanilla loop) behind one input
    projection, as rnnkit's cells have."""
    import torch
    from torch import nn

    d = hidden // heads
    if cell == "xlstm-mlstm":
        from xlstm.blocks.mlstm.backends import parallel_stabilized_simple

        class MLSTM(nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = nn.Linear(hidden, 4 * hidden + 2 * heads)

            def forward(self, x):
                b, t, _ = x.shape
                p = self.proj(x)
                q, k, v, o = (z.view(b, t, heads, d).transpose(1, 2) for z in p[..., :4 * hidden].chunk(4, -1))
                i, f = (z.transpose(1, 2).unsqueeze(-1) for z in p[..., 4 * hidden:].chunk(2, -1))
                h = parallel_stabilized_simple(q, k, v, i, f)
                return torch.sigmoid(o).transpose(1, 2).reshape(b, t, hidden) * h.transpose(1, 2).reshape(b, t, hidden)

        return MLSTM()
    from xlstm.blocks.slstm.src.vanilla import slstm_forward, slstm_pointwise_function_registry

    class SLSTM(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(hidden, 4 * hidden, bias=False)
            self.rec = nn.Parameter(torch.randn(heads, 4 * d, d) / d ** 0.5)
            self.bias = nn.Parameter(torch.zeros(4 * hidden))

        def forward(self, x):
            wx = self.inp(x).transpose(0, 1)
            states = x.new_zeros(4, x.size(0), hidden)
            out, _, _ = slstm_forward(wx, states, self.rec, self.bias, slstm_pointwise_function_registry["slstm"])
            return out[0, 1:].transpose(0, 1)

    return SLSTM()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure_one(cell: str, hidden: int, length: int, batch: int, precision: str, repeats: int, device: str,
                compile: bool = False) -> dict:
    """Tokens/s and peak memory of forward + backward, in this process (``compile``: the layer
    through ``torch.compile``, its compilation in the warm-up)."""
    import torch

    from rnnkit.hardware import autocast

    torch.manual_seed(0)
    dev = torch.device(device)
    model = build(cell, hidden).to(dev)
    x = torch.randn(batch, length, hidden, device=dev, requires_grad=True)
    layer = torch.compile(model) if compile else model

    def once() -> float:
        start = time.perf_counter()
        with autocast(dev.type, torch.bfloat16) if precision == "bf16" else torch.autocast(dev.type, enabled=False):
            out = layer(x)
            out = out[0] if isinstance(out, tuple) else out
            loss = out.float().sum()
        loss.backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        x.grad = None
        return time.perf_counter() - start

    before = rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
    once()                                  # warm-up (oneDNN builds its primitives)
    best = min(once() for _ in range(repeats))
    if dev.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - held) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    return {"cell": cell, "hidden": hidden, "length": length, "precision": precision,
            "tokens_per_s": batch * length / best, "peak_mb": peak}


def step_time(cell: str, hidden: int, steps: int, device: str) -> float:
    """Seconds per token of step-form generation: one layer, batch 1, the state carried."""
    import torch

    from rnnkit.models.rnn import make_rnn, rnn_step

    rnn = make_rnn(cell, hidden, hidden, 1).to(device).eval()
    x = torch.randn(1, hidden, device=device)
    if hasattr(rnn, "initial_state"):
        state = rnn.initial_state(1, x)
    else:
        state = torch.zeros(1, 1, hidden, device=device)
        state = (state, state.clone()) if cell == "lstm" else state
    with torch.no_grad():
        for _ in range(20):
            x, state = rnn_step(rnn, x, state)
        start = time.perf_counter()
        for _ in range(steps):
            x, state = rnn_step(rnn, x, state)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def product_rate(device: str, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of one fp32 (size x size) x (size x size) product: about the most this machine
    multiplies, the best of ``repeats``."""
    import torch

    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def weight_products(cell: str, hidden: int) -> int:
    """Multiply-adds per token of a layer's weight matrices (each 2-D weight: one per element);
    what a scan or chunkwise form adds on top (mLSTM's memory) is left out, so a bound from it
    is generous."""
    return sum(p.numel() for p in build(cell, hidden).parameters() if p.dim() == 2)


def product_ceiling(rows: list[dict], cells: list[str], device: str) -> None:
    """For each cell with a speed goal: the most tokens/s its weight products allow at the
    faster of the machine's product rate and the rate the fused LSTM reaches, against the
    LSTM's tokens/s at length 1,024 (fp32). Forward + backward is three products of each
    weight's size per token (the output, the input's gradient, the weight's gradient)."""
    peak = product_rate(device)
    print(f"\nproducts alone, fp32, length 1024: a 2048-square product runs at {peak / 1e9:.0f} GFLOP/s here")
    for hidden in dict.fromkeys(r["hidden"] for r in rows):
        base = next((r for r in rows if r["cell"] == "lstm" and r["hidden"] == hidden and r["length"] == 1024
                     and r["precision"] == "fp32"), None)
        if base is None:
            continue
        lstm_macs = weight_products("lstm", hidden)
        lstm_rate = base["tokens_per_s"] * 6 * lstm_macs
        rate = max(peak, lstm_rate)
        print(f"  h{hidden} the fused LSTM: {lstm_rate / 1e9:.0f} GFLOP/s in its products")
        for cell in (c for c in GOALS if c in cells):
            macs = weight_products(cell, hidden)
            most = rate / (6 * macs)
            print(f"  h{hidden} {cell}: {macs / 1e6:.2f}M multiply-adds per token "
                  f"(the LSTM {lstm_macs / 1e6:.2f}M): at most {most:.0f} tokens/s, "
                  f"{most / base['tokens_per_s']:.2f}x the LSTM (goal {GOALS[cell]}x)")


def run_child(args: argparse.Namespace, cell: str, hidden: int, length: int, precision: str) -> dict | None:
    cmd = [sys.executable, __file__, "--one", cell, str(hidden), str(length), precision, "--batch", str(args.batch),
           "--repeats", str(args.repeats), "--device", args.device, "--threads", str(args.threads),
           *(["--compile"] if args.compile else [])]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        print(f"{cell} h{hidden} T{length} {precision}: failed: {res.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path, hidden: int, precision: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for cell in dict.fromkeys(r["cell"] for r in rows):
        mine = sorted((r for r in rows if r["cell"] == cell and r["hidden"] == hidden and r["precision"] == precision),
                      key=lambda r: r["length"])
        if not mine:
            continue
        style = "-" if cell in OURS else "--" if cell in BASELINES else ":"
        lengths = [r["length"] for r in mine]
        ax1.plot(lengths, [r["tokens_per_s"] / 1e3 for r in mine], style, marker="o", label=cell)
        ax2.plot(lengths, [r["peak_mb"] for r in mine], style, marker="o", label=cell)
    for ax, label in ((ax1, "thousand tokens/s (forward + backward)"), (ax2, "peak memory above the start (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax2.set_yscale("log")
    ax1.legend(fontsize=8)
    fig.suptitle(f"one layer, hidden {hidden}, batch 32, {precision}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024, 4096])
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--cells", nargs="+", default=[*BASELINES, *OURS, *REFERENCES])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--step-tokens", type=int, default=2000)
    ap.add_argument("--plot", type=Path, help="write the plot of speed and memory against length here")
    ap.add_argument("--json", type=Path, help="write every measurement here")
    ap.add_argument("--plot-from", type=Path, nargs="+", help="draw --plot from these --json files and measure nothing")
    ap.add_argument("--compile", action="store_true", help="every layer through torch.compile (a C++ compiler needed)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--one", nargs=4, metavar=("CELL", "HIDDEN", "LENGTH", "PRECISION"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plot_from:
        if not args.plot:
            ap.error("--plot-from needs --plot")
        rows = [row for f in args.plot_from for row in json.loads(f.read_text())]
        plot(rows, args.plot, args.hidden[0], args.precision[0])
        print(f"plot: {args.plot}")
        return 0
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(args.threads)
    if args.one:
        from rnnkit.hardware import keep_freed_memory

        keep_freed_memory()     # the allocator the rnnkit command trains with, for every cell alike
        cell, hidden, length, precision = args.one
        print(json.dumps(measure_one(cell, int(hidden), int(length), args.batch, precision, args.repeats, args.device,
                                     args.compile)))
        return 0
    if args.quick:
        args.hidden, args.lengths, args.batch, args.repeats, args.step_tokens = [32], [64], 4, 1, 50
        args.precision = ["fp32"]
    cells = [c for c in args.cells if c not in REFERENCES or reference_available(c)]
    missing = [c for c in args.cells if c not in cells]
    from bench.machine import describe

    print(describe(torch.device(args.device)))
    if missing:
        print(f"not installed, left out: {', '.join(missing)} (pip install -e .[refs])")
    rows = []
    for precision in args.precision:
        for hidden in args.hidden:
            for length in args.lengths:
                for cell in cells:
                    # --quick measures in this process: its sizes are too small for memory to mean anything
                    row = measure_one(cell, hidden, length, args.batch, precision, args.repeats, args.device) \
                        if args.quick else run_child(args, cell, hidden, length, precision)
                    if row:
                        rows.append(row)
                        print(f"  {precision} h{hidden} T{length:>5} {cell:<16} {row['tokens_per_s']:>10.0f} tok/s "
                              f"{row['peak_mb']:>8.0f} MB", file=sys.stderr, flush=True)
    print(f"\ntraining, one layer, batch {args.batch}, forward + backward; ratio to the fused LSTM of the same run")
    print(f"{'precision':<9} {'hidden':>6} {'length':>6} {'cell':<16} {'tokens/s':>10} {'x LSTM':>7} "
          f"{'peak MB':>8} {'x LSTM':>7}")
    for row in rows:
        base = next((r for r in rows if r["cell"] == "lstm" and all(r[k] == row[k] for k in
                                                                     ("hidden", "length", "precision"))), None)
        speed = f"{row['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "-"
        memory = f"{row['peak_mb'] / base['peak_mb']:.2f}" if base and base["peak_mb"] > 0 else "-"
        print(f"{row['precision']:<9} {row['hidden']:>6} {row['length']:>6} {row['cell']:<16} "
              f"{row['tokens_per_s']:>10.0f} {speed:>7} {row['peak_mb']:>8.0f} {memory:>7}")
    for cell, goal in GOALS.items():
        for row in rows:
            if row["cell"] == cell and row["length"] == 1024:
                base = next(r for r in rows if r["cell"] == "lstm" and r["hidden"] == row["hidden"]
                            and r["length"] == 1024 and r["precision"] == row["precision"])
                ratio = row["tokens_per_s"] / base["tokens_per_s"]
                print(f"goal {cell} >= {goal}x LSTM at 1024 ({row['precision']}, h{row['hidden']}): {ratio:.2f}x "
                      f"{'met' if ratio >= goal else 'not met'}")
    if "lstm" in cells:
        product_ceiling(rows, cells, args.device)
    rounds = 5
    print(f"\nstep-form generation, one layer, batch 1: time per token, the best of {rounds} rounds of "
          f"{args.step_tokens // rounds} tokens, the cells taking turns within each round (a shared machine's "
          f"drift then reaches every cell alike)")
    for hidden in args.hidden:
        times: dict[str, list[float]] = {c: [] for c in ("lstm", "gru", *OURS)}
        for _ in range(rounds):
            for cell, seen in times.items():
                seen.append(step_time(cell, hidden, args.step_tokens // rounds, args.device))
        best = {cell: min(seen) for cell, seen in times.items()}
        print(f"  h{hidden} lstm {best['lstm'] * 1e6:.1f} us")
        for cell in list(times)[1:]:
            print(f"  h{hidden} {cell} {best[cell] * 1e6:.1f} us  ratio to lstm {best[cell] / best['lstm']:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    if args.plot and rows:
        plot(rows, args.plot, args.hidden[0], args.precision[0])
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
