"""Plots (matplotlib, no display needed): attention heatmaps, gradient flow, forecasts."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence


def save_attention_plots(translations: Sequence, directory: Path) -> int:
    """One PNG per sentence with attention: rows are output tokens, columns source tokens.
    With several heads, the mean over heads and then each head, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = 0
    for i, t in enumerate(translations, start=1):
        if t.attention is None or not t.src_tokens:
            continue
        rows = list(t.tgt_tokens) + ["</s>"]
        heads = getattr(t, "heads", None)
        panels = [("", t.attention)] if heads is None else \
            [("mean of the heads", t.attention)] + [(f"head {h + 1}", w) for h, w in enumerate(heads)]
        width = max(3, 0.45 * len(t.src_tokens) + 1.5)
        fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), max(2.5, 0.4 * len(rows) + 1)),
                                 squeeze=False)
        for ax, (name, weights) in zip(axes[0], panels):
            ax.imshow(weights, cmap="Greys", vmin=0.0, vmax=1.0, aspect="auto")
            ax.set_xticks(range(len(t.src_tokens)), t.src_tokens, rotation=60, ha="right", fontsize=8)
            ax.set_yticks(range(len(rows)), rows, fontsize=8)
            ax.set_title(f"sentence {i}" + (f": {name}" if name else ""), fontsize=9)
        fig.tight_layout()
        fig.savefig(directory / f"attention_{i:05d}.png", dpi=100)
        plt.close(fig)
        written += 1
    return written


def _draw_gradient_flow(ax, curves: Mapping[str, object], title: str) -> None:
    for name, flow in curves.items():
        points = [(d, n) for d, n in zip(flow.distances, flow.norms) if n > 0]
        if points:
            ax.semilogy([d for d, _ in points], [n for _, n in points], label=f"{name} (decay {flow.decay:.3f}/step)")
    ax.set_xlabel("time steps back from the loss")
    ax.set_ylabel("||dL/dh_t|| (mean over the batch)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def save_gradient_flow_panels(panels: Mapping[str, Mapping[str, object]], path: Path) -> None:
    """One log-scale panel per title, each overlaying its gradient-flow curves
    (``rnnkit.gradient_flow.GradientFlow``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels.items()):
        _draw_gradient_flow(ax, curves, title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_gradient_flow_plot(curves: Mapping[str, object], path: Path, title: str = "gradient flow") -> None:
    """Gradient-flow curves on one log-scale figure."""
    save_gradient_flow_panels({title: curves}, path)


def save_forecast_plot(series, column: str, start: int, history: int, forecast: Sequence, path: Path) -> None:
    """One column of ``series``: the ``history`` rows before row ``start``, the truth after it
    (where the file has it) and ``forecast``, (timestamp, value) pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    j = series.columns.index(column)
    n = len(series)
    end = min(n, start + len(forecast))
    fig, ax = plt.subplots(figsize=(10, 3.6))
    ax.plot(series.times[start - history:start], series.values[start - history:start, j].tolist(),
            color="0.35", lw=1, label="history")
    if end > start:
        ax.plot(series.times[start:end], series.values[start:end, j].tolist(), color="tab:blue", lw=1, label="truth")
    ax.plot([t for t, _ in forecast], [v for _, v in forecast], color="tab:red", lw=1.4, label="forecast")
    ax.axvline(series.times[start - 1], color="0.6", ls=":", lw=1)
    ax.set_ylabel(column)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
