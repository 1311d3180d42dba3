"""What every exported task's runtime object has: its folder, manifest, config and card."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rnnkit.config import load_config


class Exported:
    backend = "onnxruntime"

    def __init__(self, folder: Path, manifest: dict[str, Any]):
        self.folder, self.manifest = folder, manifest
        self.cfg = load_config(None, base=manifest["config"])

    def card(self) -> dict[str, Any]:
        """The checkpoint's model card as exported, and how this folder runs."""
        return {**self.manifest.get("card", {}), "export": str(self.folder), "backend": self.backend,
                "int8": self.manifest.get("int8", False)}
