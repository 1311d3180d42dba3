"""What this machine's processor can do fast: the features that matter for low-precision
arithmetic on CPU (CPUs differ in them: AVX-512, VNNI, native bf16, AMX)."""
from __future__ import annotations

import ctypes
import os
import platform
import sys
from contextlib import contextmanager, nullcontext
from functools import lru_cache
from pathlib import Path
from typing import Any

BF16_FLAGS = ("avx512_bf16", "amx_bf16")

# oneDNN, which does bf16 matrix products on CPU, builds (and caches) a kernel for every new
# shape, which costs about a fifth of a 700 x 512 x 8,588 product. Products whose row count
# changes from call to call (the real target tokens of a batch, the live hypotheses of a beam
# search) round it up to a multiple of this with copies of a row whose results are dropped,
# so kernels are built once and reused: at most ROW_MULTIPLE - 1 rows more.
ROW_MULTIPLE = 16
# The same for the length of a batch's padded sources in training, which sets the shape of the
# encoder's fused recurrent kernel (oneDNN's in fp32 too) and of the attention's products: a
# corpus with sentences of 1 to 100 words then gives 13 shapes instead of 100. Padding is
# masked everywhere (see rnnkit.models.rnn.run_padded), so only float rounding changes.
LENGTH_MULTIPLE = 8


def pad_rows(t, fill: int | None = None):
    """``t`` (a tensor) with rows appended up to a multiple of ROW_MULTIPLE: copies of its first
    row, or ``fill``. Unchanged (no copy) when its row count is a multiple already."""
    import torch

    extra = -t.size(0) % ROW_MULTIPLE
    if not extra:
        return t
    rows = t[:1].expand(extra, *t.shape[1:]) if fill is None else t.new_full((extra, *t.shape[1:]), fill)
    return torch.cat([t, rows])


@lru_cache(maxsize=1)
def cpu_model_and_flags() -> tuple[str, frozenset[str]]:
    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = frozenset(value.split())
    except OSError:
        pass
    return model, flags


def native_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX)."""
    return any(f in cpu_model_and_flags()[1] for f in BF16_FLAGS)


@lru_cache(maxsize=None)
def onednn_bf16_lstm() -> bool:
    """Whether oneDNN builds its bf16 LSTM kernel on this CPU. It needs AVX-512: where AVX2 is
    all there is, an LSTM under CPU bf16 autocast fails ("could not create a primitive
    descriptor for the LSTM forward propagation primitive")."""
    import torch

    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.LSTM(2, 2)(torch.zeros(1, 1, 2))
        return True
    except RuntimeError:
        return False


@contextmanager
def autocast(device_type: str, dtype: Any):
    """``torch.autocast``, and inside it, on a CPU whose oneDNN has no bf16 LSTM
    (:func:`onednn_bf16_lstm`), oneDNN switched off: torch's own kernels run instead, the
    recurrent layers in fp32, where oneDNN's would fail. Use it for bf16 with this package's
    models on CPU; training and ``rnnkit.load(..., precision="bf16")`` do."""
    import torch

    lstm_missing = device_type == "cpu" and dtype == torch.bfloat16 and not onednn_bf16_lstm()
    onednn_off = torch.backends.mkldnn.flags(enabled=False, deterministic=None, allow_tf32=None,
                                             fp32_precision=None) if lstm_missing else nullcontext()
    with torch.autocast(device_type, dtype=dtype), onednn_off:
        yield


def training_precision(precision: str, device: Any) -> str:
    """What ``train.precision`` runs as on ``device``: ``auto`` is bf16 where it is native (a
    CUDA device that supports it; a CPU with AVX512-BF16 or AMX whose oneDNN has the bf16 LSTM),
    else fp32. Any other value runs as given."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and native_bf16() and onednn_bf16_lstm() else "fp32"


def bf16_note() -> str | None:
    """A one-line warning when bf16 on this CPU would be emulated (slow), else None."""
    if native_bf16():
        return None
    return (f"note: this CPU has no native bf16 ({' or '.join(BF16_FLAGS)} missing from /proc/cpuinfo): "
            f"bf16 works but runs slower than fp32 here")


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


# oneDNN keeps every kernel it builds, up to 1,024 by default, and a recurrent layer's kernel
# holds scratch memory sized by its sequence length and batch: training the shared translation
# model on sentences of 1 to 100 words held 1.24 GB against 0.80 GB with one length (bench/
# memory.py). Sources padded to LENGTH_MULTIPLE bound the shapes in translation; this bounds
# what any run can keep, whatever its shapes.
KERNEL_CACHE = 256


def bound_kernel_cache(capacity: int = KERNEL_CACHE) -> bool:
    """Cap oneDNN's kernel cache at ``capacity`` kernels unless the environment sets it
    (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``). oneDNN reads the setting when it builds its first
    kernel, so this must run before any model computes. Returns whether it applied."""
    if any(k in os.environ for k in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")):
        return False
    os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(capacity)
    return True


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep the memory a training step frees for the next step's tensors.

    By default glibc serves blocks over 32 MB (an output layer's logits and their gradients)
    with fresh mappings and returns freed memory at the top of the heap to the system, so every
    step pays again for page faults on zeroed pages. With this, translation training here had
    half the system time, a quarter of the page faults and 5-17% more tokens/s (fp32 and bf16);
    peak memory stayed within 0.1 GB in fp32 and grew by 0.6 GB over 1,000 bf16 steps; what is
    kept goes back to the system only through :func:`release_freed_memory`. The role jemalloc or tcmalloc play in PyTorch's
    CPU tuning guides, without a preload.
    Skipped off Linux, when libc has no ``mallopt`` (not glibc), and when the environment already
    sets a ``MALLOC_*`` variable or ``LD_PRELOAD`` (the user chose). Returns whether it applied."""
    if sys.platform != "linux" or os.environ.get("LD_PRELOAD") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    global _KEEPING
    _KEEPING = all(mallopt(param, value) == 1 for param, value in
                   ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20)))
    return _KEEPING


_KEEPING = False


# How often (training steps) the memory kept by keep_freed_memory is handed back. bf16 training
# of the shared translation model, 1,000 steps: every 50 steps peaked at 1.33-1.42 GB over
# three runs, every 25 at 1.20-1.36 GB in two for 1-5% of its tokens/s, every 10 at 1.26 GB for 10%.
RELEASE_EVERY = 25


def release_freed_memory() -> bool:
    """Hand the free pages of malloc's heap back to the system (``malloc_trim``), where
    :func:`keep_freed_memory` applied. Batches of different sizes leave holes in the heap that
    the next larger tensor does not fit, so the heap grows; the holes stay resident though
    nothing uses them. Released every RELEASE_EVERY steps, they cost the shared translation
    model's training 13% less peak memory (1.20 -> 1.04 GB over 400 steps) for about 1% of its
    speed (every step: 15%). Returns whether it ran."""
    if not _KEEPING:
        return False
    return trim_heap()


def trim_heap() -> bool:
    """``malloc_trim(0)``: the free pages of glibc's heap back to the system now (a large
    buffer replaced by another, freed memory that would otherwise stay resident). Returns
    whether it ran (glibc on Linux only)."""
    if sys.platform != "linux":
        return False
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far, in MB (None where unknown)."""
    try:
        import resource
    except ImportError:      # not on Unix
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 1024), 1)   # bytes on macOS, KB elsewhere
