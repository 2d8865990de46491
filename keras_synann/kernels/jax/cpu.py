"""The C loops under jax ("cpu"): primitives (`primitives.define`) whose CPU
lowering is an XLA FFI call of the handlers in cpu_ffi.c (forward, adjoint
and the contractions of the higher derivatives).

`jax.jit` on a CPU runs the loops inside the compiled program (no callback
into Python); a module lowered for export, or for another platform, holds
the keras.ops reference instead. The library is built with POSIX threads
("xla_ffi" variant): a binary wheel's against the oldest FFI
header the supported jax range needs, a first-use build against jaxlib's.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from keras_synann.kernels import cpu_build, devices
from keras_synann.kernels._numerics import FACTOR_FLOOR, PRODUCT_FLOOR
from keras_synann.kernels.jax import primitives

VARIANT = "xla_ffi"
_FORWARD, _BACKWARD = "keras_synann_forward", "keras_synann_backward"
_CONTRACT = "keras_synann_contract"


def unavailable() -> str | None:
    """Why the loops cannot run here (None: loaded and registered with XLA)."""
    return cpu_build.unavailable(VARIANT) or _register()


@functools.cache
def _register() -> str | None:
    """Registers the handlers with XLA; None, or why XLA refused them."""
    lib = cpu_build.load(VARIANT)
    jax.devices()  # (a refusal before the backend starts would break it)
    try:
        for target, symbol in (
            (_FORWARD, "synann_ffi_forward"),
            (_BACKWARD, "synann_ffi_backward"),
            (_CONTRACT, "synann_ffi_contract"),
        ):
            jax.ffi.register_ffi_target(
                target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu"
            )
    except Exception as e:  # XLA's refusal (a JaxRuntimeError) names the version
        return f"XLA refused the C loops' FFI handlers: {str(e).splitlines()[0]}"
    return None


def _ffi_forward(x, kernel, *, chunk, threads):
    out = jax.ShapeDtypeStruct((x.shape[0], kernel.shape[1]), x.dtype)
    return jax.ffi.ffi_call(_FORWARD, out)(
        x, kernel, chunk=np.int64(chunk), floor=np.float32(FACTOR_FLOOR),
        product_floor=np.float32(PRODUCT_FLOOR), threads=np.int32(threads),
    )  # fmt: skip


def _ffi_backward(x, kernel, u, *, chunk, threads):
    del chunk  # the backward's loops have no chunks
    outs = (
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        jax.ShapeDtypeStruct(kernel.shape, kernel.dtype),
    )
    return jax.ffi.ffi_call(_BACKWARD, outs)(
        x, kernel, u, floor=np.float32(FACTOR_FLOOR), threads=np.int32(threads)
    )


def _ffi_contract(p, q, x, kernel, *, slot, power, chunk, threads):
    del chunk
    shape = {
        "a": (x.shape[0], kernel.shape[0]),
        "b": kernel.shape,
        "c": (x.shape[0], kernel.shape[1]),
    }[slot]
    out = jax.ShapeDtypeStruct(shape, x.dtype)
    return jax.ffi.ffi_call(_CONTRACT, out)(
        p, q, x, kernel, slot=np.int32("abc".index(slot)), power=np.int32(power),
        floor=np.float32(FACTOR_FLOOR), threads=np.int32(threads),
    )  # fmt: skip


_log_inhibition = primitives.define(
    "keras_synann_cpu", {"cpu": (_ffi_forward, _ffi_backward, _ffi_contract)}
)


def not_supported_reasons(x, kernel, auto: bool = False) -> list[str]:
    """Why the loops do not apply here (empty: they do)."""
    del auto
    reasons = []
    if not devices.is_float32(x, kernel):
        reasons.append(
            f"the C loops compute in float32 (received {devices.dtypes(x, kernel)})"
        )
    count, platform = devices.jax_devices()
    if (count, platform) != (1, "cpu"):
        reasons.append(
            "the C loops need jax on a single CPU device "
            f"(jax has {count} {platform} device(s))"
        )
    reason = unavailable()
    if reason is not None:
        reasons.append(reason)
    return reasons


def log_inhibition(x, kernel, chunk: int):
    """s for float32 arrays x (batch, n_in) and kernel (n_in, n_out)."""
    return _log_inhibition(x, kernel, chunk=int(chunk), threads=cpu_build.threads())
