"""One line naming the machine a benchmark ran on: its CPU model and flags, or its GPU, so that each figure says what it was measured on."""
from __future__ import annotations

import torch

from rnnkit.hardware import cpu_model_and_flags

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")


def cpu_description() -> str:
    """The CPU's model, which of the flags that matter for matrix products (fp32, int8, bf16)
    it has, and which it lacks: ``Xeon (avx2, avx512f, avx512_vnni; no avx512_bf16, no amx_bf16)``."""
    model, flags = cpu_model_and_flags()
    have = [f for f in FLAGS if f in flags]
    lacks = [f"no {f}" for f in FLAGS if f not in flags]
    return f"{model} ({'; '.join(x for x in (', '.join(have), ', '.join(lacks)) if x)})"


def describe(device: torch.device) -> str:
    """``device: ...`` line: the GPU's name, or the CPU with its flags and thread count."""
    if device.type == "cuda":
        return f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}"
    return f"device: CPU {cpu_description()}, {torch.get_num_threads()} threads; torch {torch.__version__}"
