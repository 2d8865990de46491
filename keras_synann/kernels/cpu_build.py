"""The C loops for this process: the packaged library for this CPU's level,
else one compiled on first use, else why neither.

The chain, for the level `cpu_levels.choose()` gives (the best this CPU
supports, or `KERAS_SYNANN_CPU_LEVEL`):

1. the library a binary wheel carries, `_lib/synann_<level>.so` next to this
   file (for jax, only where jaxlib accepts its XLA FFI handlers' version);
2. a first-use compile with the C compiler on PATH (`cpu_compile`), for the
   level or for `native`, cached;
3. none: `unavailable` says why, each step's reason in turn, and "auto" takes
   the keras.ops path.

Two variants, one per kind of glue: "pthreads" (the loops, through ctypes:
tensorflow, torch) and "xla_ffi" (the loops and their XLA FFI handlers: jax).
A packaged library is both. `KERAS_SYNANN_NO_CPU_KERNEL` (any value) turns
the loops off.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import sys
from pathlib import Path

from keras_synann.kernels import cpu_compile, cpu_levels
from keras_synann.kernels.cpu_compile import NO_COMPILER

__all__ = ["NO_COMPILER", "describe", "load", "packaged", "threads", "unavailable"]

#: What each variant compiles on first use.
VARIANTS = {"pthreads": "loops", "xla_ffi": "xla_ffi"}
#: Where a binary wheel puts its libraries.
PACKAGED = Path(__file__).with_name("_lib")


def packaged(level: str) -> Path:
    """The path of the packaged library for `level` (it may not exist)."""
    return PACKAGED / cpu_levels.LEVELS[level].library


def unavailable(variant: str) -> str | None:
    """Why the loops cannot be loaded here, in one line (None: they are loaded)."""
    return _load(variant)[2]


def load(variant: str) -> ctypes.CDLL:
    """The library of `variant` (call `unavailable` first)."""
    lib, _, reason = _load(variant)
    if lib is None:
        raise RuntimeError(f"The compiled CPU loops are unavailable: {reason}")
    return lib


def describe(variant: str) -> dict:
    """What was loaded: level, origin ("packaged" or "compiled"), path, vector
    width and tiles, XLA FFI API version; or the reason it was not."""
    lib, info, reason = _load(variant)
    return dict(info) if lib is not None else {"unavailable": reason}


@functools.cache
def _load(variant: str) -> tuple[ctypes.CDLL | None, dict, str | None]:
    """(library, what it is, None), or (None, {}, why not)."""
    library = VARIANTS[variant]
    if os.environ.get("KERAS_SYNANN_NO_CPU_KERNEL"):
        return None, {}, "turned off by $KERAS_SYNANN_NO_CPU_KERNEL"
    level, reason = cpu_levels.choose()
    if level is None:
        return None, {}, reason
    reasons = []
    if level != cpu_levels.NATIVE:
        path = packaged(level)
        if path.exists():
            lib, reason = _open(path, library)
            if lib is not None:
                return lib, _info(lib, level, "packaged", path), None
            reasons.append(reason)
        else:
            reasons.append(f"this installation carries no C loops for {level}")
    if sys.platform not in ("linux", "darwin"):
        reasons.append(f"first-use builds run on Linux and macOS, not {sys.platform}")
        return None, {}, "; ".join(reasons)
    cc = cpu_compile.compiler()
    if cc is None:
        reasons.append(NO_COMPILER)
        return None, {}, "; ".join(reasons)
    flags = None if level == cpu_levels.NATIVE else cpu_levels.LEVELS[level].flags
    path, error = cpu_compile.build(cc, library, flags, _include(library))
    if path is None:
        reasons.append(f"the C loops did not compile with {cc}: {error}")
        return None, {}, "; ".join(reasons)
    lib, reason = _open(path, library)
    if lib is None:
        reasons.append(reason)
        return None, {}, "; ".join(reasons)
    return lib, _info(lib, level, "compiled", path), None


def _open(path: Path, library: str) -> tuple[ctypes.CDLL | None, str | None]:
    """(the loaded library, None), or (None, why it cannot serve `library`)."""
    try:
        lib = _declared(ctypes.CDLL(str(path)))
    except OSError as e:
        return None, f"{path.name} did not load: {e}"
    if library == "xla_ffi":
        built, installed = _ffi_version(lib), _jaxlib_ffi_version()
        if installed is not None and (
            built[0] != installed[0] or built[1] > installed[1]
        ):
            return None, (
                f"jaxlib's XLA FFI (API version {installed[0]}.{installed[1]}) "
                f"does not accept {path.name}'s handlers (API version "
                f"{built[0]}.{built[1]})"
            )
    return lib, None


def _ffi_version(lib: ctypes.CDLL) -> tuple[int, int]:
    out = (ctypes.c_int32 * 2)()
    lib.synann_ffi_api_version(out)
    return out[0], out[1]


def _include(library: str) -> tuple[str, ...]:
    """The include directories a first-use build of `library` needs."""
    if library != "xla_ffi":
        return ()
    import jax

    return (jax.ffi.include_dir(),)


def _jaxlib_ffi_version() -> tuple[int, int] | None:
    """The XLA FFI API version of the installed jaxlib (its C header), or None."""
    import jax

    header = Path(jax.ffi.include_dir()) / "xla" / "ffi" / "api" / "c_api.h"
    try:
        text = header.read_text()
    except OSError:
        return None
    found = dict(re.findall(r"#define XLA_FFI_API_(MAJOR|MINOR) (\d+)", text))
    if set(found) != {"MAJOR", "MINOR"}:
        return None
    return int(found["MAJOR"]), int(found["MINOR"])


def _info(lib: ctypes.CDLL, level: str, origin: str, path: Path) -> dict:
    build = (ctypes.c_int32 * 4)()
    lib.synann_build_info(build)
    info = {
        "level": level,
        "origin": origin,
        "path": str(path),
        "vector_bytes": build[0],
        "forward_tile": f"{build[1]} samples x {build[2]} vectors",
        "backward_samples": build[3],
    }
    if hasattr(lib, "synann_ffi_api_version"):
        info["xla_ffi_api"] = "{}.{}".format(*_ffi_version(lib))
    return info


def _declared(lib: ctypes.CDLL) -> ctypes.CDLL:
    """`lib` with its entry points' C signatures declared."""
    ptr, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.synann_forward.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, f32, f32, i32]
    lib.synann_forward.restype = None
    lib.synann_backward.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, f32, i32]
    lib.synann_backward.restype = None
    lib.synann_contract.argtypes = [i32, i32, *[ptr] * 6, i64, i64, i64, f32, i32]
    lib.synann_contract.restype = None
    lib.synann_build_info.argtypes = [ptr]
    lib.synann_build_info.restype = None
    lib.synann_set_team.argtypes = [ptr]
    lib.synann_set_team.restype = None
    return lib


def threads() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1
