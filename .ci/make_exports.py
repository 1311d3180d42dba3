"""CI, first half of the torch-free check: train four small models with the full install
(a character LM, a translator on the bundled parallel sample, a sentence classifier and a
forecaster on data written here) and export each into FOLDER.

    .venv/bin/python .ci/make_exports.py FOLDER
"""
from __future__ import annotations

import csv
import math
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rnnkit.cli import main  # noqa: E402


def rnnkit(*args: str) -> None:
    try:
        main(list(args))
    except SystemExit as done:
        if done.code not in (0, None):
            raise SystemExit(f"rnnkit {' '.join(args)}: exit {done.code}")


def write_data(out: Path) -> tuple[Path, Path]:
    rng = random.Random(0)
    words = {"pos": "calm bright warm kind fine glad".split(), "neg": "grey cold dark sad grim harsh".split()}
    labels = out / "labels.tsv"
    with labels.open("w", encoding="utf-8") as fh:
        for _ in range(200):
            label = rng.choice(sorted(words))
            fh.write(label + "\t" + " ".join(rng.choice(words[label] + ["the", "day", "sea"]) for _ in range(6)) + "\n")
    series = out / "series.csv"
    with series.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["date", "load", "temp"])
        for t in range(400):
            load = 2 * math.sin(2 * math.pi * t / 24) + 0.01 * t + rng.gauss(0, 0.3)
            w.writerow([f"2020-01-{1 + t // 24:02d} {t % 24:02d}:00:00", round(load, 4), round(10 + 0.5 * load, 4)])
    return labels, series


def main_() -> None:
    out = Path(sys.argv[1]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    labels, series = write_data(out)
    quick = ["--set", "train.max_steps=30", "--set", "train.eval_every=30"]
    rnnkit("train", str(ROOT / "configs/quickstart.yaml"), "--set", f"run_dir={out}/lm", *quick)
    rnnkit("train", str(ROOT / "configs/translate_sample.yaml"), "--set", f"run_dir={out}/tr", *quick)
    cls = out / "cls.yaml"
    cls.write_text(f"task: classification\nrun_dir: {out}/cls\ndata: {{train: {labels}, valid: {labels}}}\n"
                   f"model: {{embedding_dim: 16, hidden_size: 16}}\ntrain: {{batch_size: 16}}\n", encoding="utf-8")
    rnnkit("train", str(cls), *quick)
    fc = out / "fc.yaml"
    fc.write_text(f"task: forecast\nrun_dir: {out}/fc\ndata: {{path: {series}, split: [0.7, 0.85, 1.0], "
                  f"input_length: 48, horizon: 12, season: 24}}\nmodel: {{cell: gru, hidden_size: 16, segment: 4}}\n",
                  encoding="utf-8")
    rnnkit("train", str(fc), *quick)
    for name in ("lm", "tr", "cls", "fc"):
        rnnkit("export", str(out / name / "best.pt"), "-o", str(out / f"{name}_onnx"))


if __name__ == "__main__":
    main_()
