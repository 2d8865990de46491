"""The C loops under torch ("cpu"): `loops` on the tensors' own memory
(float32 CPU tensors); `functions` makes them differentiable.

The loops run on torch's own threads: where torch's parallel backend is
OpenMP, the library is given that runtime's `GOMP_parallel` (found among the
libraries torch loaded, never loading one), so the pool torch keeps waiting
between its operations does the loops' pieces instead of competing with other
threads for the cores. Elsewhere they run `torch.get_num_threads()` POSIX
threads ("pthreads" variant: one library per CPU level serves every backend,
with no OpenMP runtime of its own).
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

from keras_synann.kernels import cpu_build, loops
from keras_synann.kernels.rules import Kernel

VARIANT = "pthreads"
#: The file names of the OpenMP runtimes that provide GOMP_parallel.
_OPENMP_RUNTIMES = ("libgomp", "libomp", "libiomp5")


def _loaded_openmp_runtimes() -> list[str]:
    """Paths of the OpenMP runtimes this process has loaded (Linux: its maps),
    then those beside torch's own libraries."""
    paths = []
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            path = line.split(maxsplit=5)[-1]
            if Path(path).name.startswith(_OPENMP_RUNTIMES):
                paths.append(path)
    except OSError:  # no /proc (macOS)
        pass
    torch_lib = Path(torch.__file__).parent / "lib"
    paths += [
        str(p)
        for p in sorted(torch_lib.glob("lib*"))
        if p.name.startswith(_OPENMP_RUNTIMES)
    ]
    return list(dict.fromkeys(paths))


@functools.cache
def torch_team() -> int | None:
    """The address of GOMP_parallel in the OpenMP runtime torch runs its
    parallel regions on (None: torch's backend is not OpenMP, or no loaded
    runtime has it)."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    for path in _loaded_openmp_runtimes():
        try:  # RTLD_NOLOAD: only a runtime already in the process
            runtime = ctypes.CDLL(path, mode=os.RTLD_NOLOAD)
            return ctypes.cast(runtime.GOMP_parallel, ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
    return None


@functools.cache
def _bind() -> None:
    cpu_build.load(VARIANT).synann_set_team(torch_team())


def _host(*tensors):
    _bind()
    return [None if t is None else t.detach().numpy() for t in tensors]


def forward(x, kernel, chunk: int):
    """s (batch, n_out) by the loops (no autograd)."""
    s = loops.forward(VARIANT, *_host(x, kernel), chunk, torch.get_num_threads())
    return torch.from_numpy(s)


def adjoint(x, kernel, upstream, chunk: int):
    """(dx, dW) of sum(upstream * s) by the loops' one backward pass."""
    del chunk
    threads = torch.get_num_threads()
    d_x, d_w = loops.adjoint(VARIANT, *_host(x, kernel, upstream), threads)
    return torch.from_numpy(d_x), torch.from_numpy(d_w)


def contract(slot, power, a, b, c, x, kernel, chunk: int):
    """`reference.contract` by the loops."""
    del chunk
    threads = torch.get_num_threads()
    out = loops.contract(VARIANT, slot, power, *_host(a, b, c, x, kernel), threads)
    return torch.from_numpy(out)


KERNEL = Kernel(forward, adjoint, contract, build=VARIANT)
