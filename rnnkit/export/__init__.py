"""``rnnkit export``: a checkpoint written as ONNX graphs and a manifest, to be run by
onnxruntime without torch (:mod:`rnnkit.runtime`). ``graphs`` builds each task's graphs with
torch.onnx; ``writer`` checks the checkpoint, writes the folder under a temporary name and
renames it last, and quantises to int8 with onnxruntime when asked.
"""
from rnnkit.export.writer import export

__all__ = ["export"]
