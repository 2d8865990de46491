"""The C loops under tensorflow ("cpu"): `tf.numpy_function` calls for the
forward and the adjoint; `gradients` makes them differentiable.

A numpy function calls back into this Python process: it runs eagerly and in
graphs that stay in the process (tf.function without XLA), never inside XLA
or a SavedModel (`cpu.why_not` keeps those on the reference). The library is
built with POSIX threads ("pthreads" variant): no OpenMP runtime is loaded
into a tensorflow process.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_synann.kernels import cpu_build, devices
from keras_synann.kernels._numerics import FACTOR_FLOOR, PRODUCT_FLOOR

VARIANT = "pthreads"


def unavailable() -> str | None:
    """Why the loops cannot run here (None: they are built and loaded)."""
    return cpu_build.unavailable(VARIANT)


def _forward(x, kernel, chunk: int):
    x, kernel = np.ascontiguousarray(x), np.ascontiguousarray(kernel)
    (batch, n_in), n_out = x.shape, kernel.shape[1]
    s = np.empty((batch, n_out), np.float32)
    cpu_build.load(VARIANT).synann_forward(
        x.ctypes.data, kernel.ctypes.data, s.ctypes.data, batch, n_in, n_out,
        chunk, FACTOR_FLOOR, PRODUCT_FLOOR, cpu_build.threads(),
    )  # fmt: skip
    return s


def _backward(x, kernel, u):
    x, kernel = np.ascontiguousarray(x), np.ascontiguousarray(kernel)
    u = np.ascontiguousarray(u, np.float32)
    (batch, n_in), n_out = x.shape, kernel.shape[1]
    d_x, d_w = np.empty_like(x), np.empty_like(kernel)
    cpu_build.load(VARIANT).synann_backward(
        x.ctypes.data, kernel.ctypes.data, u.ctypes.data, d_x.ctypes.data,
        d_w.ctypes.data, batch, n_in, n_out, FACTOR_FLOOR, cpu_build.threads(),
    )  # fmt: skip
    return d_x, d_w


def forward(x, kernel, chunk: int):
    """s by the loops, as a numpy function (no gradient of its own)."""
    out = tf.numpy_function(
        lambda a, b: _forward(a, b, chunk), [x, kernel], tf.float32, stateful=False
    )
    out.set_shape([x.shape[0], kernel.shape[1]])
    return out


def adjoint(x, kernel, u, chunk: int):
    """(dx, dW) by the loops' backward pass, as a numpy function."""
    del chunk
    d_x, d_w = tf.numpy_function(
        _backward, [x, kernel, u], [tf.float32, tf.float32], stateful=False
    )
    d_x.set_shape(x.shape)
    d_w.set_shape(kernel.shape)
    return d_x, d_w


def _contract(slot_index, power, p, q, x, kernel):
    x, kernel = np.ascontiguousarray(x), np.ascontiguousarray(kernel)
    (batch, n_in), n_out = x.shape, kernel.shape[1]
    slot = int(slot_index)
    shape = ((batch, n_in), (n_in, n_out), (batch, n_out))[slot]
    given = iter((np.ascontiguousarray(p), np.ascontiguousarray(q)))
    operands = [None if k == slot else next(given) for k in range(3)]
    out = np.empty(shape, np.float32)
    cpu_build.load(VARIANT).synann_contract(
        slot, int(power), *(0 if a is None else a.ctypes.data for a in operands),
        x.ctypes.data, kernel.ctypes.data, out.ctypes.data, batch, n_in, n_out,
        FACTOR_FLOOR, cpu_build.threads(),
    )  # fmt: skip
    return out


def contract(slot, power, a, b, c, x, kernel, chunk: int):
    """`reference.contract` by the loops, as a numpy function."""
    del chunk
    p, q = (t for t in (a, b, c) if t is not None)
    slot_index = "abc".index(slot)
    out = tf.numpy_function(
        lambda p, q, x, k: _contract(slot_index, power, p, q, x, k),
        [p, q, x, kernel], tf.float32, stateful=False,
    )  # fmt: skip
    batch, n_in, n_out = x.shape[0], kernel.shape[0], kernel.shape[1]
    out.set_shape([(batch, n_in), (n_in, n_out), (batch, n_out)][slot_index])
    return out


def tangent(x, kernel, tx, tkernel, chunk: int):
    """`reference.tangent` by the loops: -(T_1'_C(x, tW) + T_1'_C(tx, W))."""
    return -(
        contract("c", 1, x, tkernel, None, x, kernel, chunk)
        + contract("c", 1, tx, kernel, None, x, kernel, chunk)
    )


def not_supported_reasons(x, kernel, auto: bool = False) -> list[str]:
    """Why the loops do not apply here (empty: they do).

    A numpy function calls back into this Python process: it runs eagerly
    and in graphs that stay in the process, never inside XLA or a
    SavedModel. "auto" also leaves inference graphs portable (converters
    such as tf2onnx read them) and takes the loops in eager calls, training
    steps and Keras's predict and evaluate steps.
    """
    reasons = []
    if not devices.is_float32(x, kernel):
        reasons.append(
            f"the C loops compute in float32 (received {devices.dtypes(x, kernel)})"
        )
    if not devices.tensorflow_on_cpu():
        reasons.append("the C loops need tensorflow on the CPU (it sees a GPU or TPU)")
    context = devices.tensorflow_context(x, kernel)
    if context in (devices.TF_XLA, devices.TF_SAVING):
        reasons.append(f"{context} cannot hold the C loops' call back into Python")
    elif context == devices.TF_FORWARD:
        reasons.append(
            f"{context} cannot differentiate the C loops (in graphs, forward mode "
            "sees a custom gradient's inner ops)"
        )
    elif auto and context == devices.TF_INFERENCE:
        reasons.append(
            f"'auto' leaves {context} portable (converters such as tf2onnx "
            "read such graphs); it takes the C loops in eager calls, training "
            "steps and Keras's predict and evaluate steps"
        )
    reason = unavailable()
    if reason is not None:
        reasons.append(reason)
    return reasons


def log_inhibition(x, kernel, chunk: int):
    """s, differentiable to every order (`gradients`)."""
    from keras_synann.kernels.tensorflow import cpu, gradients

    return gradients.log_inhibition(x, kernel, cpu, chunk)
