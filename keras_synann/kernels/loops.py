"""The C loops (cpu_loops.c) on NumPy arrays, for the backends that call them
through ctypes on host memory (torch's and tensorflow's "cpu" kernels).

    forward(x, W)                    s (batch, n_out), one log per chunk
    adjoint(x, W, u)                 (dx, dW) of sum(u * s), in one pass
    contract(slot, power, a, b, c)   T_p's gradient in `slot` (`kernels.rules`)

Each takes float32 arrays (made C-contiguous here), the library variant
(`cpu_build`: "pthreads", the loops with POSIX threads, for both) and the
number of threads, and returns new arrays.
"""

from __future__ import annotations

import numpy as np

from keras_synann.kernels import cpu_build, rules
from keras_synann.kernels._numerics import FACTOR_FLOOR, PRODUCT_FLOOR


def _host(*arrays):
    return [np.ascontiguousarray(a, np.float32) for a in arrays]


def forward(variant: str, x, kernel, chunk: int, threads: int) -> np.ndarray:
    """s = sum over chunks of log(max(prod max(1 - W x, floor), product floor))."""
    x, kernel = _host(x, kernel)
    (batch, n_in), n_out = x.shape, kernel.shape[1]
    s = np.empty((batch, n_out), np.float32)
    cpu_build.load(variant).synann_forward(
        x.ctypes.data, kernel.ctypes.data, s.ctypes.data, batch, n_in, n_out,
        chunk, FACTOR_FLOOR, PRODUCT_FLOOR, threads,
    )  # fmt: skip
    return s


def adjoint(variant: str, x, kernel, u, threads: int):
    """(dx, dW) of sum(u * s) (no chunks: the loops' one backward pass)."""
    x, kernel, u = _host(x, kernel, u)
    (batch, n_in), n_out = x.shape, kernel.shape[1]
    d_x, d_w = np.empty_like(x), np.empty_like(kernel)
    cpu_build.load(variant).synann_backward(
        x.ctypes.data, kernel.ctypes.data, u.ctypes.data, d_x.ctypes.data,
        d_w.ctypes.data, batch, n_in, n_out, FACTOR_FLOOR, threads,
    )  # fmt: skip
    return d_x, d_w


def contract(variant: str, slot: str, power: int, a, b, c, x, kernel, threads: int):
    """`reference.contract`: the operand of `slot` is None."""
    x, kernel = _host(x, kernel)
    operands = [None if t is None else _host(t)[0] for t in (a, b, c)]
    (batch, n_in), n_out = x.shape, kernel.shape[1]
    out = np.empty(rules.contract_shape(slot, x.shape, kernel.shape), np.float32)
    cpu_build.load(variant).synann_contract(
        rules.SLOTS.index(slot), int(power),
        *(0 if t is None else t.ctypes.data for t in operands),
        x.ctypes.data, kernel.ctypes.data, out.ctypes.data, batch, n_in, n_out,
        FACTOR_FLOOR, threads,
    )  # fmt: skip
    return out
