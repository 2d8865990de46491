"""What a benchmark ran on: CPU model, cores, caches, how busy it was, the
package versions and the commit; and the --backends option they share.

Elementwise-heavy code has run 3-5x apart on two x86 machines of the same
size (an AMD EPYC and an Intel Xeon), so every table says which CPU it is from.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

BACKENDS = ("jax", "tensorflow", "torch")
REPO = Path(__file__).resolve().parents[1]


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


def versions() -> dict:
    """The installed versions of the packages that decide the figures."""
    found = {}
    for name in ("keras", "jax", "jaxlib", "tensorflow", "torch", "numpy"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def commit(tree: Path = REPO) -> str:
    """The short hash of the commit checked out in `tree`."""
    return subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True, check=False,
    ).stdout.strip() or "unknown"  # fmt: skip


def backends(text: str) -> tuple[str, ...]:
    """--backends (an argparse type): a comma-separated list of BACKENDS."""
    names = tuple(b.strip() for b in text.split(",") if b.strip())
    unknown = [b for b in names if b not in BACKENDS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}"
        )
    return names


def save(module: str, argv, path, **fields) -> dict:
    """Writes a results file: the command that ran `module` with `argv`, the
    commit, the date and the machine, then `fields`; returns what it wrote."""
    args = sys.argv[1:] if argv is None else argv
    record = {
        "command": " ".join(["python -m", module, *args]),
        "commit": commit(),
        "date": datetime.date.today().isoformat(),
        "machine": describe(),
        **fields,
    }
    Path(path).write_text(json.dumps(record, indent=1) + "\n")
    print(f"# {line(record['machine'])}; written to {path}")
    return record
