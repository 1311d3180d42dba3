"""Write an export folder: check that the checkpoint can be exported, build its graphs in a
temporary folder beside the target, quantise them to int8 if asked, write the manifest, and
rename the folder into place last (an interrupted or failed export leaves nothing at DIR)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from rnnkit.config import ConfigError, config_to_dict
from rnnkit.config.core import NEW_CELLS
from rnnkit.config.tasks import TASKS, resolve
from rnnkit.runtime.manifest import EXPORTABLE, FORMAT, MANIFEST, outline_files
from rnnkit.training.checkpoint import CheckpointError
from rnnkit.version import __version__

def exportable(cfg: Any) -> None:
    """One line saying why a checkpoint cannot be exported, or nothing."""
    if cfg.task not in EXPORTABLE:
        raise CheckpointError(f"a '{cfg.task}' checkpoint cannot be exported yet; rnnkit exports "
                              f"{', '.join(EXPORTABLE)} models so far")
    m = cfg.model
    parts = {"model": m, "model.encoder": getattr(m, "encoder", None), "model.decoder": getattr(m, "decoder", None)}
    for key, part in parts.items():
        if getattr(part, "impl", "fused") != "fused":
            raise CheckpointError(f"{key}.impl: explicit cells loop over time in Python and have no graph; export "
                                  f"a model with fused layers")
    if getattr(m, "lm_features", None):
        raise CheckpointError("model.lm_features: frozen LM features have no export yet; export a model without "
                              "them")
    if getattr(m, "hierarchical", False):
        raise CheckpointError("model.hierarchical: the hierarchical document classifier has no export yet; it "
                              "runs from its checkpoint")


def export(checkpoint: str | Path, folder: str | Path, opset: int = 17, int8: bool = False,
           note: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Export ``checkpoint`` to ``folder`` (which must not exist yet, or be empty; missing folders
    above it are made, once the checkpoint proves exportable); the manifest."""
    from rnnkit.reports import model_card
    from rnnkit.runs import load_task

    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError("", f"-o {folder}: exists; choose a new folder (an export is never written over "
                              f"anything)")
    above = next((p for p in folder.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ConfigError("", f"-o {folder}: {above} is a file, not a folder")
    if not 13 <= opset <= 20:
        raise ConfigError("", f"--opset must be between 13 and 20, got {opset}")
    task = load_task(checkpoint, "cpu")         # one line if it is not a checkpoint
    exportable(task.cfg)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError("", f"-o {folder}: cannot make {folder.parent} ({e.strerror})") from None
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    mask = os.umask(0)
    os.umask(mask)
    work.chmod(0o777 & ~mask)         # mkdtemp's folder is private; an export is as any folder made here
    try:
        graph_specs = resolve(TASKS[task.cfg.task].exporter)(task, work, opset)
        if int8:
            _quantise(work, graph_specs, _cells(task.cfg.model), note)
        _weights_apart(work, graph_specs)
        manifest = {"format": FORMAT, "rnnkit_version": __version__, "task": task.cfg.task,
                    "config": config_to_dict(task.cfg), "extras": outline_files(work, task.extras()), "graphs": graph_specs,
                    "int8": int8, "opset": opset, "card": _plain(model_card(Path(checkpoint)))}
        (work / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        if folder.exists():
            folder.rmdir()                       # empty, checked above
        os.replace(work, folder)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


def _plain(card: dict[str, Any]) -> dict[str, Any]:
    """The entries of a model card that JSON holds as they are."""
    return {k: v for k, v in card.items() if isinstance(v, (str, int, float, bool, type(None), list, dict))}


def _weights_apart(work: Path, graph_specs: dict[str, dict[str, Any]]) -> None:
    """Each graph's weights moved into a file of their own beside it (``NAME.weights``):
    onnxruntime then maps them instead of reading them into a protobuf first and copying them
    out, which halves a process's peak memory while it loads."""
    import onnx

    mask = os.umask(0)
    os.umask(mask)
    for spec in graph_specs.values():
        path = work / spec["file"]
        weights = path.with_suffix(".weights")
        onnx.save_model(onnx.load(str(path)), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=weights.name, size_threshold=1024)
        if weights.is_file():
            weights.chmod(0o666 & ~mask)          # onnx writes it private; an export is as any file made here
            spec["weights"] = weights.name


def _cells(m: Any) -> set[str]:
    """The recurrent cells a model config names (a translation model's encoder and decoder)."""
    return {part.cell for part in (m, getattr(m, "encoder", None), getattr(m, "decoder", None)) if hasattr(part, "cell")}


def _quantise(work: Path, graph_specs: dict[str, dict[str, Any]], cells: set[str],
              note: Callable[[str], None] | None) -> None:
    """Dynamic int8 quantisation (onnxruntime's) of the graphs' matrix products, LSTM weights
    and embedding tables (looked up in int8, dequantised after the lookup)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    root = logging.getLogger()
    level = root.level
    for spec in graph_specs.values():
        path = work / spec["file"]
        folded, quantised = path.with_suffix(".folded.onnx"), path.with_suffix(".int8.onnx")
        root.setLevel(logging.ERROR)
        try:
            # constants folded first: the bidirectional LSTM's weights are concatenated in the
            # graph as exported, and only a constant weight quantises
            quant_pre_process(str(path), str(folded), skip_symbolic_shape=True)
            # 7-bit weights (reduce_range): a CPU without VNNI sums pairs of u8 x s8 products
            # in 16 bits, which saturate at 8 bits and garbled half the translations of the
            # test's model on an AVX2-only CPU; an export may run on any CPU, so always
            quantize_dynamic(str(folded), str(quantised), weight_type=QuantType.QInt8, reduce_range=True,
                             op_types_to_quantize=["MatMul", "Gemm", "LSTM", "Gather"])
        finally:
            root.setLevel(level)
            folded.unlink(missing_ok=True)
        before, after = path.stat().st_size, quantised.stat().st_size
        os.replace(quantised, path)
        if note is not None:
            note(f"{spec['file']}: int8, {before / 1e6:.2f} MB -> {after / 1e6:.2f} MB")
    unquantised = sorted(c.upper() for c in cells - {"lstm", *NEW_CELLS})   # their weights are matrix products
    if note is not None and unquantised:
        note(f"onnxruntime quantises LSTM weights but not {' or '.join(unquantised)} ones: those recurrent layers "
             f"stay fp32, the matrix products around them are int8")
