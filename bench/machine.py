"""One line naming the machine a benchmark ran on: our machines differ from session to session."""
from __future__ import annotations

import torch

from rnnkit.hardware import cpu_model_and_flags

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_description() -> str:
    """The CPU's model and which of the flags that matter for matrix products it has."""
    model, flags = cpu_model_and_flags()
    have = [f for f in FLAGS if f in flags]
    return f"{model} ({', '.join(have) if have else 'none of ' + '/'.join(FLAGS)})"


def describe(device: torch.device) -> str:
    """``device: ...`` line: the GPU's name, or the CPU with its flags and thread count."""
    if device.type == "cuda":
        return f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}"
    return f"device: CPU {cpu_description()}, {torch.get_num_threads()} threads; torch {torch.__version__}"
