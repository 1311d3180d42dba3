"""Attention heatmaps (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


def save_attention_plots(translations: Sequence, directory: Path) -> int:
    """One PNG per sentence with attention: rows are output tokens, columns source tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = 0
    for i, t in enumerate(translations, start=1):
        if t.attention is None or not t.src_tokens:
            continue
        rows = list(t.tgt_tokens) + ["</s>"]
        fig, ax = plt.subplots(figsize=(max(3, 0.45 * len(t.src_tokens) + 1.5), max(2.5, 0.4 * len(rows) + 1)))
        ax.imshow(t.attention.numpy(), cmap="Greys", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(t.src_tokens)), t.src_tokens, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set_title(f"sentence {i}", fontsize=9)
        fig.tight_layout()
        fig.savefig(directory / f"attention_{i:05d}.png", dpi=100)
        plt.close(fig)
        written += 1
    return written
