"""What a benchmark figure was measured on: CPU model, core count and the instruction sets that
decide INT8 and BF16 speed (VNNI, AVX512-BF16, AMX), so figures from different hosts are not
compared by mistake; and the one-table reports (burst, soak) that carry it."""

from __future__ import annotations

import json
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


def write_results(stem: Path, report: dict[str, object], text: str) -> None:
    """``stem``.json (the report) and ``stem``.md (the table), the folder made if need be."""
    stem.parent.mkdir(exist_ok=True)
    (stem.parent / f"{stem.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (stem.parent / f"{stem.name}.md").write_text(text + "\n")


def publish(stem: Path, lines: list[str], note: str, report: dict[str, object]) -> None:
    """A benchmark's table and a note ending with the machine, printed and written with
    ``report`` (the machine added to it)."""
    report["machine"] = describe()
    text = "\n".join([*lines, f"\n{note}; machine: {one_line(report['machine'])}."])  # type: ignore[arg-type]
    print(text)
    write_results(stem, report, text)


def save_metrics(report: dict[str, object], stem: Path) -> None:
    """Add the machine to ``report``, print it as a metric/value table, and write ``stem``.json
    and ``stem``.md."""
    report["machine"] = describe()
    lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in report.items() if k != "machine"]
    lines.append(f"| machine | {one_line(report['machine'])} |")  # type: ignore[arg-type]
    print("\n".join(lines))
    write_results(stem, report, "\n".join(lines))
