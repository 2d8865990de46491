"""glibc malloc settings that the training script applies to itself.

A jax train step on CPU allocates and frees the same large buffers every step.
With glibc's defaults, freed blocks above the mmap threshold go back to the
kernel (munmap) and a heap top above the trim threshold is trimmed, so the
next step faults every page in again: on a 2-core Intel Xeon, 150 lenet steps
took 3.2 million minor page faults and 10 s of system time. Raising the
thresholds with mallopt(3) keeps freed memory in the process for reuse (the
same as MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ and MALLOC_TOP_PAD_ in
the environment, which glibc reads only at start-up).

    M_MMAP_THRESHOLD = 1 GiB   blocks below it come from the heap, not mmap
    M_TRIM_THRESHOLD = 1 GiB   free memory kept at the heap top before trimming
    M_TOP_PAD        = 512 MiB extra asked of the kernel when the heap grows
                               (address space; pages count once touched)

The cost: freed memory stays with the process (its resident size stays near
its peak instead of shrinking between steps). `SYNANN_MALLOC=0` in the
environment turns this off; on a C library other than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

#: Set to "0" to leave malloc's defaults alone.
ENV = "SYNANN_MALLOC"
#: mallopt(3) parameter numbers (malloc.h) and the values set.
SETTINGS = {
    "M_TRIM_THRESHOLD": (-1, 1 << 30),
    "M_TOP_PAD": (-2, 512 << 20),
    "M_MMAP_THRESHOLD": (-3, 1 << 30),
}


def tune_malloc(environ=None) -> dict[str, int]:
    """Applies `SETTINGS` with mallopt; returns those that took effect.

    Returns {} when `SYNANN_MALLOC=0`, or when the C library is not glibc.
    """
    environ = os.environ if environ is None else environ
    if environ.get(ENV, "1").strip() == "0":
        return {}
    libc = _glibc()
    if libc is None:
        return {}
    applied = {}
    for name, (param, value) in SETTINGS.items():
        if libc.mallopt(param, value) == 1:  # mallopt returns 1 on success
            applied[name] = value
    return applied


def _glibc():
    """The process's C library if it is glibc, else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return libc
