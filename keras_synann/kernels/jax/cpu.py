"""The C loops under jax ("cpu"): XLA FFI calls of the handlers in cpu_ffi.c
(forward, adjoint and the contractions of the higher derivatives).

`jax.jit` on a CPU runs the loops inside the compiled program (no callback
into Python); a module lowered for export holds the keras.ops reference
instead (`primitives`). The library is built with POSIX threads ("xla_ffi"
variant): a binary wheel's against the oldest FFI header the supported jax
range needs, a first-use build against the installed jaxlib's.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from keras_synann.kernels import cpu_build, rules
from keras_synann.kernels._numerics import FACTOR_FLOOR, PRODUCT_FLOOR
from keras_synann.kernels.rules import Kernel

VARIANT = "xla_ffi"
_TARGETS = {
    "keras_synann_forward": "synann_ffi_forward",
    "keras_synann_backward": "synann_ffi_backward",
    "keras_synann_contract": "synann_ffi_contract",
}


@functools.cache
def _register() -> str | None:
    """Registers the handlers with XLA; None, or why XLA refused them."""
    lib = cpu_build.load(VARIANT)
    jax.devices()  # (a refusal before the backend starts would break it)
    try:
        for name, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(
                name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu"
            )
    except Exception as e:  # XLA's refusal (a JaxRuntimeError) names the version
        return f"XLA refused the C loops' FFI handlers: {str(e).splitlines()[0]}"
    return None


def _reasons(x, kernel, auto: bool) -> list[str]:
    """The handlers, registered with XLA before the loops are taken."""
    del x, kernel, auto
    reason = _register()
    return [] if reason is None else [reason]


def _call(target: str, outs, *args, **attributes):
    _register()
    call = jax.ffi.ffi_call(target, outs)
    return call(
        *args,
        floor=np.float32(FACTOR_FLOOR),
        threads=np.int32(cpu_build.threads()),
        **attributes,
    )


def forward(x, kernel, chunk: int):
    """s (batch, n_out) by the loops."""
    out = jax.ShapeDtypeStruct((x.shape[0], kernel.shape[1]), x.dtype)
    return _call(
        "keras_synann_forward", out, x, kernel,
        chunk=np.int64(chunk), product_floor=np.float32(PRODUCT_FLOOR),
    )  # fmt: skip


def adjoint(x, kernel, u, chunk: int):
    """(dx, dW) of sum(u * s) by the loops' one backward pass (no chunks)."""
    del chunk
    outs = (
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        jax.ShapeDtypeStruct(kernel.shape, kernel.dtype),
    )
    return _call("keras_synann_backward", outs, x, kernel, u)


def contract(slot, power, a, b, c, x, kernel, chunk: int):
    """`reference.contract` by the loops."""
    del chunk
    shape = rules.contract_shape(slot, x.shape, kernel.shape)
    p, q = (t for t in (a, b, c) if t is not None)
    return _call(
        "keras_synann_contract", jax.ShapeDtypeStruct(shape, x.dtype), p, q, x, kernel,
        slot=np.int32(rules.SLOTS.index(slot)), power=np.int32(power),
    )  # fmt: skip


KERNEL = Kernel(forward, adjoint, contract, build=VARIANT, reasons=_reasons)
