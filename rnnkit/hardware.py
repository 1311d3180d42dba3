"""What this machine's processor can do fast: the features that matter for low-precision
arithmetic on CPU (our machines differ from session to session)."""
from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")

# oneDNN, which does bf16 matrix products on CPU, builds (and caches) a kernel for every new
# shape, which costs about a fifth of a 700 x 512 x 8,588 product. Products whose row count
# changes from call to call (the real target tokens of a batch, the live hypotheses of a beam
# search) round it up to a multiple of this with copies of a row whose results are dropped,
# so kernels are built once and reused: at most ROW_MULTIPLE - 1 rows more.
ROW_MULTIPLE = 16


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


def bf16_note() -> str | None:
    """A one-line warning when bf16 on this CPU would be emulated (slow), else None."""
    if native_bf16():
        return None
    return (f"note: this CPU has no native bf16 ({' or '.join(BF16_FLAGS)} missing from /proc/cpuinfo): "
            f"bf16 works but runs slower than fp32 here")
