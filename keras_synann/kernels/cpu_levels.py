"""The instruction-set levels the C loops are built for, and the one this CPU takes.

    level       compiler flag        vectors (registers)   runs on
    x86-64      -march=x86-64        SSE2, 16 bytes (16)   every x86-64 CPU
    x86-64-v3   -march=x86-64-v3     AVX2+FMA, 32 (16)     Haswell, Zen and newer
    x86-64-v4   -march=x86-64-v4     AVX-512, 64 (32)      Skylake-SP, Zen 4 and newer
    armv8-a     -march=armv8-a       NEON, 16 (32)         every 64-bit Arm CPU
    native      -march=native        this CPU's            compiled on first use

cpu_loops.c picks its vector width and tiles from the level's macros. The
level is the best one this CPU supports, as the kernel reports its features
(Linux: /proc/cpuinfo; macOS: sysctl hw.optional.*), the way NumPy's
dispatcher and PyTorch's CPU capability choose theirs.
`KERAS_SYNANN_CPU_LEVEL` names another one: a level this CPU supports, or
`native` (compiled on first use for this CPU, never packaged).

Only the standard library is imported here: the wheel's build step loads this
file by path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import os
import platform
import sys
from pathlib import Path

#: The environment variable that overrides the level.
ENV = "KERAS_SYNANN_CPU_LEVEL"
#: The level compiled on first use for exactly this CPU.
NATIVE = "native"

_X86_V2 = ("cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3")
_X86_V3 = (*_X86_V2, "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe")
_X86_V4 = (*_X86_V3, "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")


@dataclasses.dataclass(frozen=True)
class Level:
    """One build: its name, the machine it is for, its compiler flags and the
    CPU features (as Linux's /proc/cpuinfo names them) it needs."""

    name: str
    machine: str
    flags: tuple[str, ...]
    features: tuple[str, ...] = ()

    @property
    def library(self) -> str:
        """The file name of its packaged library (an importable-looking name,
        as wheel checkers expect of a .so)."""
        return f"synann_{self.name.replace('-', '_')}.so"


#: Every packaged level, lowest first per machine.
LEVELS = {
    level.name: level
    for level in (
        Level("x86-64", "x86_64", ("-march=x86-64",)),
        Level("x86-64-v3", "x86_64", ("-march=x86-64-v3",), _X86_V3),
        Level("x86-64-v4", "x86_64", ("-march=x86-64-v4",), _X86_V4),
        Level("armv8-a", "aarch64", ("-march=armv8-a",)),
    )
}


def machine() -> str:
    """This machine as the levels name it: "x86_64", "aarch64" or another."""
    name = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(name, name)


def for_machine(name: str | None = None) -> tuple[str, ...]:
    """The packaged levels of a machine (default: this one), lowest first."""
    name = name or machine()
    return tuple(level.name for level in LEVELS.values() if level.machine == name)


def cpu_features() -> frozenset[str]:
    """The CPU features the operating system reports (empty where unknown)."""
    if sys.platform.startswith("linux"):
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
        for line in text.splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
        return frozenset()
    if sys.platform == "darwin":
        return _darwin_features()
    return frozenset()


#: macOS sysctl names of the features the x86 levels need (hw.optional.NAME).
_DARWIN = {
    "avx": "avx1_0", "avx2": "avx2_0", "fma": "fma", "bmi1": "bmi1", "bmi2": "bmi2",
    "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512cd": "avx512cd",
    "avx512dq": "avx512dq", "avx512vl": "avx512vl",
}  # fmt: skip


def _darwin_features() -> frozenset[str]:
    """x86 features from macOS's sysctl; the ones it does not name (every CPU
    with AVX2 has them) are assumed alongside AVX2."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    found = set()
    for feature, key in _DARWIN.items():
        value, size = ctypes.c_int(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_int))
        name = f"hw.optional.{key}".encode()
        if libc.sysctlbyname(name, ctypes.byref(value), ctypes.byref(size), None, 0):
            continue
        if value.value:
            found.add(feature)
    if "avx2" in found:
        found.update(f for f in _X86_V3 if f not in _DARWIN)
    return frozenset(found)


def supported(features: frozenset[str] | None = None) -> tuple[str, ...]:
    """The packaged levels this CPU runs, lowest first."""
    features = cpu_features() if features is None else features
    return tuple(
        name
        for name in for_machine()
        if all(f in features for f in LEVELS[name].features)
    )


def choose(
    environ: dict | None = None, features: frozenset[str] | None = None
) -> tuple[str | None, str | None]:
    """(level, None): the level to load; or (None, why there is none).

    The best level this CPU supports, unless `KERAS_SYNANN_CPU_LEVEL` names
    one; `native` where this machine has no packaged level.

    Raises:
        ValueError: `KERAS_SYNANN_CPU_LEVEL` names no level.
    """
    environ = os.environ if environ is None else environ
    requested = environ.get(ENV, "").strip()
    runs = supported(features)
    if requested in ("", "auto"):
        return (runs[-1] if runs else NATIVE), None
    if requested == NATIVE:
        return NATIVE, None
    if requested not in LEVELS:
        names = ", ".join(["auto", NATIVE, *(for_machine() or LEVELS)])
        raise ValueError(f"{ENV} must be one of {names}. Received: {ENV}={requested!r}")
    if requested not in runs:
        level = LEVELS[requested]
        if level.machine != machine():
            why = f"it is for {level.machine}, this machine is {machine()}"
        else:
            features = cpu_features() if features is None else features
            missing = [f for f in level.features if f not in features]
            why = f"this CPU lacks {', '.join(missing)}"
        return None, f"{ENV}={requested} does not run here: {why}"
    return requested, None
