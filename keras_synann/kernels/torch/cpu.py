"""The C loops under torch ("cpu"): forward and adjoint through ctypes on the
tensors' own memory (float32 CPU tensors, made contiguous); `functions`
makes them differentiable.

The library runs `torch.get_num_threads()` POSIX threads ("pthreads"
variant: one library per CPU level serves every backend, with no OpenMP
runtime of its own).
"""

from __future__ import annotations

import torch

from keras_synann.kernels import cpu_build, devices
from keras_synann.kernels._numerics import FACTOR_FLOOR, PRODUCT_FLOOR

VARIANT = "pthreads"


def unavailable() -> str | None:
    """Why the loops cannot run here (None: they are built and loaded)."""
    return cpu_build.unavailable(VARIANT)


def forward(x, kernel, chunk: int):
    """s (batch, n_out) by the loops, for float32 CPU tensors (no autograd)."""
    lib = cpu_build.load(VARIANT)
    x_c, w_c = x.contiguous(), kernel.contiguous()
    batch, (n_in, n_out) = x.shape[0], kernel.shape
    s = x.new_empty((batch, n_out))
    lib.synann_forward(
        x_c.data_ptr(), w_c.data_ptr(), s.data_ptr(), batch, n_in, n_out,
        chunk, FACTOR_FLOOR, PRODUCT_FLOOR, torch.get_num_threads(),
    )  # fmt: skip
    return s


def adjoint(x, kernel, upstream, chunk: int):
    """(dx, dW) of sum(upstream * s) by the loops' one backward pass."""
    del chunk  # the backward's loops have no chunks
    x, kernel, u = x.contiguous(), kernel.contiguous(), upstream.contiguous()
    d_x, d_w = torch.empty_like(x), torch.empty_like(kernel)
    batch, (n_in, n_out) = x.shape[0], kernel.shape
    cpu_build.load(VARIANT).synann_backward(
        x.data_ptr(), kernel.data_ptr(), u.data_ptr(), d_x.data_ptr(),
        d_w.data_ptr(), batch, n_in, n_out, FACTOR_FLOOR, torch.get_num_threads(),
    )  # fmt: skip
    return d_x, d_w


def contract(slot, power, a, b, c, x, kernel, chunk: int):
    """`reference.contract` by the loops (float32 CPU tensors)."""
    del chunk
    operands = [None if t is None else t.contiguous() for t in (a, b, c)]
    x, kernel = x.contiguous(), kernel.contiguous()
    batch, (n_in, n_out) = x.shape[0], kernel.shape
    shape = {"a": (batch, n_in), "b": (n_in, n_out), "c": (batch, n_out)}[slot]
    out = x.new_empty(shape)
    cpu_build.load(VARIANT).synann_contract(
        "abc".index(slot), power,
        *(0 if t is None else t.data_ptr() for t in operands),
        x.data_ptr(), kernel.data_ptr(), out.data_ptr(), batch, n_in, n_out,
        FACTOR_FLOOR, torch.get_num_threads(),
    )  # fmt: skip
    return out


def tangent(x, kernel, tx, tkernel, chunk: int):
    """`reference.tangent` by the loops: -(T_1'_C(x, tW) + T_1'_C(tx, W))."""
    return -(
        contract("c", 1, x, tkernel, None, x, kernel, chunk)
        + contract("c", 1, tx, kernel, None, x, kernel, chunk)
    )


def not_supported_reasons(x, kernel, auto: bool = False) -> list[str]:
    """Why the loops do not apply to these tensors here (empty: they do)."""
    del auto
    reasons = []
    if not devices.is_float32(x, kernel):
        reasons.append(
            f"the C loops compute in float32 (received {devices.dtypes(x, kernel)})"
        )
    if not (x.device.type == kernel.device.type == "cpu"):
        reasons.append(f"the C loops need CPU tensors (received tensors on {x.device})")
    tracer = devices.torch_tracer(x, kernel)
    if tracer is not None:
        # (and the build is not looked up: a tracer would trace that too)
        return [
            *reasons,
            f"{tracer} would record the C loops' result as a constant "
            "(they run outside torch)",
        ]
    reason = unavailable()
    if reason is not None:
        reasons.append(reason)
    return reasons


def log_inhibition(x, kernel, chunk: int):
    """s, differentiable to every order (`functions`)."""
    from keras_synann.kernels.torch import cpu, functions

    return functions.log_inhibition(x, kernel, cpu, chunk)
