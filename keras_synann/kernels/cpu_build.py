"""Compiles the C loops (cpu_loops.c, cpu_ffi.c) on first use and loads them.

The sources ship in the package (read with importlib.resources). They are
compiled with the C compiler on PATH (`$CC`, else cc, gcc or clang) for this
CPU (`-march=native`) into a cache directory (`$KERAS_SYNANN_CACHE`, else
`$XDG_CACHE_HOME/keras_synann` or ~/.cache/keras_synann), once per source,
compiler, flags and CPU. Three variants, one per backend's glue:

- "openmp": the loops with an OpenMP team (torch: its libgomp is loaded);
- "pthreads": the loops with POSIX threads (tensorflow);
- "xla_ffi": the loops and their XLA FFI handlers (jax), against jaxlib's
  C header.

Environment: `KERAS_SYNANN_NO_CPU_KERNEL` (any value) turns the loops off;
`KERAS_SYNANN_REQUIRE_CPU_KERNEL=1` turns "unavailable" into a RuntimeError
with the reason (CI: a missing compiler fails instead of skipping).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.resources
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

#: What each variant compiles, and whether OpenMP is allowed.
VARIANTS = {
    "openmp": (("cpu_loops.c",), True),
    "pthreads": (("cpu_loops.c",), False),
    "xla_ffi": (("cpu_loops.c", "cpu_ffi.c"), False),
}
#: Compiler flags tried in order; the first set that compiles is kept.
FLAG_SETS = (
    ("-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"),
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-march=native"),
    ("-O3",),
)
COMMON_FLAGS = ("-fPIC", "-shared", "-pthread")
#: The reason given when no compiler is found.
NO_COMPILER = "no C compiler found ($CC, cc, gcc, clang)"


def compiler() -> str | None:
    """The C compiler: `$CC`, else cc, gcc or clang on PATH; None if there is none."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def source(name: str) -> str:
    """The text of one of the package's C files."""
    return importlib.resources.files(__package__).joinpath(name).read_text()


def flag_sets(variant: str) -> tuple[tuple[str, ...], ...]:
    """The flag sets a variant tries, in order."""
    _, openmp = VARIANTS[variant]
    return tuple(f for f in FLAG_SETS if openmp or "-fopenmp" not in f)


def command(
    cc: str, variant: str, flags: tuple[str, ...], directory: Path, out: Path
) -> list[str]:
    """The compile command for `variant` with its sources written into `directory`."""
    names, _ = VARIANTS[variant]
    paths = []
    for name in names:
        path = directory / name
        path.write_text(source(name))
        paths.append(str(path))
    return [cc, *flags, *_include(variant), *COMMON_FLAGS, *paths, "-o", str(out)]


def _include(variant: str) -> tuple[str, ...]:
    if variant != "xla_ffi":
        return ()
    import jax

    return (f"-I{jax.ffi.include_dir()}",)


def unavailable(variant: str) -> str | None:
    """Why the loops cannot be loaded here, in words (None: they are loaded)."""
    reason = _load(variant)[1]
    if reason is not None and os.environ.get("KERAS_SYNANN_REQUIRE_CPU_KERNEL") == "1":
        raise RuntimeError(
            "KERAS_SYNANN_REQUIRE_CPU_KERNEL=1 and the compiled CPU loops are "
            f"unavailable: {reason}"
        )
    return reason


def load(variant: str) -> ctypes.CDLL:
    """The compiled library of `variant` (call `unavailable` first)."""
    lib, reason = _load(variant)
    if lib is None:
        raise RuntimeError(f"The compiled CPU loops are unavailable: {reason}")
    return lib


@functools.cache
def _load(variant: str) -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None), or (None, why not)."""
    if sys.platform not in ("linux", "darwin"):
        return None, f"the C loops build on Linux and macOS, not {sys.platform}"
    if os.environ.get("KERAS_SYNANN_NO_CPU_KERNEL"):
        return None, "turned off by $KERAS_SYNANN_NO_CPU_KERNEL"
    cc = compiler()
    if cc is None:
        return None, NO_COMPILER
    path, error = build(cc, variant)
    if path is None:
        return None, f"the C loops did not compile with {cc}: {error}"
    try:
        return _declared(ctypes.CDLL(str(path))), None
    except OSError as e:
        return None, f"the compiled C loops did not load: {e}"


def build(cc: str, variant: str) -> tuple[Path | None, str]:
    """(the library, built now unless cached, ""), or (None, the compiler's error)."""
    version = subprocess.run(
        [cc, "--version"], capture_output=True, text=True, check=False
    ).stdout
    names, _ = VARIANTS[variant]
    texts = [source(name) for name in names]
    error = ""
    for flags in flag_sets(variant):
        key = hashlib.sha256(
            "\0".join(
                [*texts, cc, version, _cpu_id(), *flags, *_include(variant)]
            ).encode()
        ).hexdigest()[:20]
        target = cache_dir() / f"synann_{variant}_{key}.so"
        if target.exists():
            return target, ""
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                out = Path(tmp) / "out.so"
                result = subprocess.run(
                    command(cc, variant, flags, Path(tmp), out),
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if result.returncode == 0:
                    os.replace(out, target)  # atomic: concurrent builders agree
                    return target, ""
                error = (result.stderr.strip().splitlines() or ["failed"])[-1]
        except OSError as e:
            return None, str(e)
    return None, error


def cache_dir() -> Path:
    """Where compiled libraries are kept."""
    root = os.environ.get("KERAS_SYNANN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
        "keras_synann",
    )
    return Path(root)


def _cpu_id() -> str:
    """What the compiled code depends on: the CPU model and its features."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [
            line
            for line in text.splitlines()
            if line.startswith(("model name", "flags", "Features", "CPU part"))
        ]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _declared(lib: ctypes.CDLL) -> ctypes.CDLL:
    """`lib` with its entry points' C signatures declared."""
    ptr, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.synann_forward.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, f32, f32, i32]
    lib.synann_forward.restype = None
    lib.synann_backward.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, f32, i32]
    lib.synann_backward.restype = None
    lib.synann_contract.argtypes = [
        i32,
        i32,
        ptr,
        ptr,
        ptr,
        ptr,
        ptr,
        ptr,
        i64,
        i64,
        i64,
        f32,
        i32,
    ]
    lib.synann_contract.restype = None
    return lib


def threads() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1
