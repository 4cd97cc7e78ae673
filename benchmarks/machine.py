"""What a benchmark figure was measured on: CPU model, core count and the instruction sets that
decide INT8 and BF16 speed (VNNI, AVX512-BF16, AMX), so figures from different hosts are not
compared by mistake."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# The flags that change which kernels torch picks for this model.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def describe() -> dict[str, object]:
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "isa": [f for f in ISA_FLAGS if f in flags],
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def one_line(machine: dict[str, object]) -> str:
    isa = ", ".join(machine["isa"]) or "no AVX2"  # type: ignore[arg-type]
    return f"{machine['cpus']} × {machine['cpu']} ({isa})"
