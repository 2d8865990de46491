"""What a benchmark ran on: CPU model, cores, caches, and how busy it was.

Elementwise-heavy code has run 3-5x apart on two x86 machines of the same
size (an AMD EPYC and an Intel Xeon), so every table says which CPU it is from.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def caches() -> str:
    """Cache sizes seen by CPU 0, e.g. "L1d 48K, L2 2048K, L3 491520K (shared)"."""
    parts = []
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(root.glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
            shared = (index / "shared_cpu_list").read_text().strip()
        except OSError:
            continue
        if kind == "Instruction":
            continue
        name = f"L{level}{'d' if kind == 'Data' else ''}"
        parts.append(
            f"{name} {size}" + (" (shared)" if shared not in ("0", "") else "")
        )
    return ", ".join(parts) or "unknown"


def load() -> str:
    try:
        one, five, _ = os.getloadavg()
        return f"load average {one:.2f} (1 min), {five:.2f} (5 min)"
    except OSError:
        return "load average unknown"


def describe() -> dict:
    """The fields every results file and table carries."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "caches": caches(),
        "platform": platform.platform(),
        "machine": platform.machine(),
    }


def line(info: dict | None = None) -> str:
    info = info or describe()
    return (
        f"{info['cpu']}, {info['cores']} cores ({info['machine']}), "
        f"caches per core {info['caches']}; {info['platform']}"
    )
