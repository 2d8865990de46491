"""The C loops under torch ("cpu"): `loops` on the tensors' own memory
(float32 CPU tensors); `functions` makes them differentiable.

The library runs `torch.get_num_threads()` POSIX threads ("pthreads"
variant: one library per CPU level serves every backend, with no OpenMP
runtime of its own).
"""

from __future__ import annotations

import torch

from keras_synann.kernels import loops
from keras_synann.kernels.rules import Kernel

VARIANT = "pthreads"


def _host(*tensors):
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
