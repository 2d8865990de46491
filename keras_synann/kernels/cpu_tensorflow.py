"""The C loops under tensorflow: `tf.numpy_function` calls, with the
closed-form gradient as a second call (`tf.custom_gradient`).

A numpy function calls back into this Python process: it runs eagerly and in
graphs that stay in the process (tf.function without XLA), never inside XLA
or a SavedModel (`cpu.why_not` keeps those on the reference). The library is
built with POSIX threads ("pthreads" variant): no OpenMP runtime is loaded
into a tensorflow process.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_synann.kernels import cpu_build
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


def log_inhibition(x, kernel, chunk: int):
    """s for float32 tensors x (batch, n_in) and kernel (n_in, n_out)."""

    @tf.custom_gradient
    def s(x, kernel):
        out = tf.numpy_function(
            lambda a, b: _forward(a, b, chunk), [x, kernel], tf.float32,
            stateful=False,
        )  # fmt: skip
        out.set_shape([x.shape[0], kernel.shape[1]])

        def grad(u):
            d_x, d_w = tf.numpy_function(
                _backward, [x, kernel, u], [tf.float32, tf.float32], stateful=False
            )
            d_x.set_shape(x.shape)
            d_w.set_shape(kernel.shape)
            return d_x, d_w

        return out, grad

    return s(x, kernel)
