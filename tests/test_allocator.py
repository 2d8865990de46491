"""training/allocator.py: mallopt settings keep freed memory for reuse."""

import platform
import subprocess
import sys
import textwrap

import pytest

from training import allocator

pytestmark = pytest.mark.any_backend

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

#: Allocates and frees a 64 MB buffer (past glibc's largest dynamic mmap
#: threshold, 32 MB, like the temporary buffer of an XLA step) 20 times; prints
#: the minor page faults, counted in 4 KiB pages (transparent huge pages off).
_FAULTS = textwrap.dedent(
    """
    import ctypes, resource, sys
    import numpy as np
    sys.path.insert(0, ".")
    from training import allocator
    ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE
    applied = allocator.tune_malloc()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        a = np.full(16 * 2**20, 1.0, np.float32)
        del a
    print(len(applied), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _faults(switch: str) -> tuple[int, int]:
    env = {"SYNANN_MALLOC": switch, "PATH": ""}
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    applied, faults = out.stdout.split()
    return int(applied), int(faults)


def test_switch_off_applies_nothing():
    assert allocator.tune_malloc({"SYNANN_MALLOC": "0"}) == {}


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_tuned_malloc_reuses_freed_buffers():
    applied, tuned = _faults("1")
    assert applied == len(allocator.SETTINGS)
    off, untuned = _faults("0")
    assert off == 0
    # Untuned, glibc maps and unmaps the buffer every time: 20 x 16,384 pages
    # fault in. Tuned, the freed heap memory is reused after the first time.
    assert untuned > 10 * 16384
    assert tuned < untuned / 5
