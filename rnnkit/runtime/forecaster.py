"""A forecaster's graph on onnxruntime; reading series, choosing windows, the baselines and
the forecasts in original units come from :mod:`rnnkit.tasks.forecast_text`, as for the
torch task."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rnnkit.config import load_config
from rnnkit.data.series import Scaler
from rnnkit.runtime.manifest import open_graph
from rnnkit.tasks.forecast_text import ForecastText


class OnnxForecaster(ForecastText):
    backend = "onnxruntime"

    def __init__(self, folder: Path, manifest: dict[str, Any]):
        self.folder, self.manifest = folder, manifest
        self.cfg = load_config(None, base=manifest["config"])
        extras = manifest["extras"]
        self.columns, self.target_names = list(extras["columns"]), list(extras["targets"])
        self.targets = [self.columns.index(t) for t in self.target_names]
        self.scaler = Scaler.from_state(extras["scaler"])
        self.session = open_graph(folder, manifest["graphs"]["forecast"])

    def predict_windows(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"x": x.astype(np.float32)})[0]

    def card(self) -> dict[str, Any]:
        return {**self.manifest.get("card", {}), "export": str(self.folder), "backend": self.backend,
                "int8": self.manifest.get("int8", False)}
