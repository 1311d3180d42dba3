"""A forecaster's graph on onnxruntime; reading series, choosing windows, the baselines and
the forecasts in original units come from :mod:`rnnkit.tasks.forecast_text`, as for the
torch task."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rnnkit.data.series import Scaler
from rnnkit.runtime.base import Exported
from rnnkit.runtime.manifest import open_graph
from rnnkit.tasks.forecast_text import ForecastText


class OnnxForecaster(ForecastText, Exported):
    def __init__(self, folder: Path, manifest: dict[str, Any]):
        super().__init__(folder, manifest)
        extras = manifest["extras"]
        self.columns, self.target_names = list(extras["columns"]), list(extras["targets"])
        self.targets = [self.columns.index(t) for t in self.target_names]
        self.scaler = Scaler.from_state(extras["scaler"])
        self.session = open_graph(folder, manifest["graphs"]["forecast"])

    def predict_windows(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"x": x.astype(np.float32)})[0]
