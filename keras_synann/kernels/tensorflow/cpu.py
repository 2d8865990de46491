"""The C loops under tensorflow ("cpu"): `loops` as `tf.numpy_function` calls;
`gradients` makes them differentiable.

A numpy function calls back into this Python process: it runs eagerly and in
graphs that stay in the process (tf.function without XLA), never inside XLA
or a SavedModel (the loops' row in `kernels.REGISTRY` refuses those). The
library is built with POSIX threads ("pthreads" variant): no OpenMP runtime
is loaded into a tensorflow process.
"""

from __future__ import annotations

import tensorflow as tf

from keras_synann.kernels import cpu_build, loops, rules
from keras_synann.kernels.rules import Kernel

VARIANT = "pthreads"


def _numpy_call(fn, inputs, shape):
    """fn(*arrays) -> an array, as a numpy function of `inputs`: float32, of
    the given static shape."""
    out = tf.numpy_function(fn, inputs, tf.float32, stateful=False)
    out.set_shape(shape)
    return out


def forward(x, kernel, chunk: int):
    """s by the loops, as a numpy function (no gradient of its own)."""
    return _numpy_call(
        lambda a, b: loops.forward(VARIANT, a, b, chunk, cpu_build.threads()),
        [x, kernel],
        (x.shape[0], kernel.shape[1]),
    )


def adjoint(x, kernel, u, chunk: int):
    """(dx, dW) by the loops' backward pass, as a numpy function."""
    del chunk
    d_x, d_w = tf.numpy_function(
        lambda a, b, g: loops.adjoint(VARIANT, a, b, g, cpu_build.threads()),
        [x, kernel, u],
        [tf.float32, tf.float32],
        stateful=False,
    )
    d_x.set_shape(x.shape)
    d_w.set_shape(kernel.shape)
    return d_x, d_w


def contract(slot, power, a, b, c, x, kernel, chunk: int):
    """`reference.contract` by the loops, as a numpy function."""
    del chunk
    names = rules.operand_slots(slot)
    given = {"a": a, "b": b, "c": c}

    def call(p, q, x, kernel):
        operands = dict(zip(names, (p, q), strict=True))
        return loops.contract(
            VARIANT, slot, power, operands.get("a"), operands.get("b"),
            operands.get("c"), x, kernel, cpu_build.threads(),
        )  # fmt: skip

    return _numpy_call(
        call,
        [given[n] for n in names] + [x, kernel],
        rules.contract_shape(slot, x.shape, kernel.shape),
    )


KERNEL = Kernel(forward, adjoint, contract, build=VARIANT)
