"""Each backend's derivative transforms of a function y(x, W), and how
`check_derivatives` feeds, compiles and reads them (`Backend`).

Every transform takes (x, W, vx, vW), the directions for those that need
them, and returns a list of tensors; L = sum(y ** 2).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import keras
import numpy as np


def _jax_table(fn):
    import jax
    import jax.numpy as jnp

    def loss(x, w):
        return jnp.sum(fn(x, w) ** 2)

    def gx(x, w):
        return jax.grad(loss, 0)(x, w)

    def hvp(x, w, vx):
        return jax.grad(lambda x: jnp.vdot(gx(x, w), vx))(x)

    return {
        "grad": lambda x, w, vx, vw: jax.grad(loss, (0, 1))(x, w),
        "gradient_penalty": lambda x, w, vx, vw: [
            jax.grad(lambda w: jnp.sum(gx(x, w) ** 2))(w)
        ],
        "hvp": lambda x, w, vx, vw: [hvp(x, w, vx)],
        "third_order": lambda x, w, vx, vw: [
            jax.grad(lambda w: jnp.sum(hvp(x, w, vx) ** 2))(w)
        ],
        "jvp": lambda x, w, vx, vw: [jax.jvp(fn, (x, w), (vx, vw))[1]],
        "linearize": lambda x, w, vx, vw: [jax.linearize(fn, x, w)[1](vx, vw)],
        "forward_over_reverse_hvp": lambda x, w, vx, vw: [
            jax.jvp(lambda x: gx(x, w), (x,), (vx,))[1]
        ],
        "jacrev": lambda x, w, vx, vw: list(jax.jacrev(fn, (0, 1))(x, w)),
        "jacfwd": lambda x, w, vx, vw: list(jax.jacfwd(fn, (0, 1))(x, w)),
        "hessian": lambda x, w, vx, vw: [jax.hessian(loss, 0)(x, w)],
        "vmap": lambda x, w, vx, vw: [jax.vmap(lambda xi: fn(xi[None], w)[0])(x)],
        "per_sample_grads": lambda x, w, vx, vw: [
            jax.vmap(lambda xi: jax.grad(lambda w: loss(xi[None], w))(w))(x)
        ],
    }


def _torch_table(fn):
    import torch
    import torch.autograd.forward_ad as fwad
    from torch import func

    def loss(x, w):
        return (fn(x, w) ** 2).sum()

    def leaves(*ts):
        return [t.detach().clone().requires_grad_(True) for t in ts]

    def grad(x, w, vx, vw):
        x, w = leaves(x, w)
        return list(torch.autograd.grad(loss(x, w), (x, w)))

    def gx(x, w):
        return torch.autograd.grad(loss(x, w), x, create_graph=True)[0]

    def penalty(x, w, vx, vw):
        x, w = leaves(x, w)
        return list(torch.autograd.grad((gx(x, w) ** 2).sum(), w))

    def hvp(x, w, vx, vw):
        x, w = leaves(x, w)
        return list(torch.autograd.grad((gx(x, w) * vx).sum(), x))

    def third(x, w, vx, vw):
        x, w = leaves(x, w)
        h = torch.autograd.grad((gx(x, w) * vx).sum(), x, create_graph=True)[0]
        return list(torch.autograd.grad((h**2).sum(), w))

    def forward_ad(x, w, vx, vw):
        with fwad.dual_level():
            y = fn(fwad.make_dual(x, vx), fwad.make_dual(w, vw))
            return [fwad.unpack_dual(y).tangent]

    return {
        "grad": grad,
        "gradient_penalty": penalty,
        "hvp": hvp,
        "third_order": third,
        "jvp": lambda x, w, vx, vw: [func.jvp(fn, (x, w), (vx, vw))[1]],
        "forward_ad": forward_ad,
        "forward_over_reverse_hvp": lambda x, w, vx, vw: [
            func.jvp(lambda x: func.grad(loss, 0)(x, w), (x,), (vx,))[1]
        ],
        "jacrev": lambda x, w, vx, vw: list(func.jacrev(fn, (0, 1))(x, w)),
        "jacfwd": lambda x, w, vx, vw: list(func.jacfwd(fn, (0, 1))(x, w)),
        "vmap": lambda x, w, vx, vw: [func.vmap(lambda xi: fn(xi[None], w)[0])(x)],
        "func_grad": lambda x, w, vx, vw: list(func.grad(loss, (0, 1))(x, w)),
        "per_sample_grads": lambda x, w, vx, vw: [
            func.vmap(func.grad(lambda w, xi: loss(xi[None], w)), (None, 0))(w, x)
        ],
    }


def _tensorflow_table(fn):
    import tensorflow as tf

    def loss(x, w):
        return tf.reduce_sum(fn(x, w) ** 2)

    def gx(x, w):
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = loss(x, w)
        return tape.gradient(value, x)

    def hvp(x, w, vx):
        with tf.GradientTape() as tape:
            tape.watch(x)
            inner = tf.reduce_sum(gx(x, w) * vx)
        return tape.gradient(inner, x)

    def grad(x, w, vx, vw):
        with tf.GradientTape() as tape:
            tape.watch([x, w])
            value = loss(x, w)
        return tape.gradient(value, [x, w])

    def penalty(x, w, vx, vw):
        with tf.GradientTape() as tape:
            tape.watch(w)
            p = tf.reduce_sum(gx(x, w) ** 2)
        return [tape.gradient(p, w)]

    def third(x, w, vx, vw):
        with tf.GradientTape() as tape:
            tape.watch(w)
            p = tf.reduce_sum(hvp(x, w, vx) ** 2)
        return [tape.gradient(p, w)]

    def jvp(x, w, vx, vw):
        with tf.autodiff.ForwardAccumulator([x, w], [vx, vw]) as acc:
            y = fn(x, w)
        return [acc.jvp(y)]

    def fwd_over_rev(x, w, vx, vw):
        with tf.autodiff.ForwardAccumulator(x, vx) as acc:
            g = gx(x, w)
        return [acc.jvp(g)]

    def batch_jacobian(x, w, vx, vw):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x, w)
        return [tape.batch_jacobian(y, x)]

    def jacobian(x, w, vx, vw):
        with tf.GradientTape() as tape:
            tape.watch(w)
            y = fn(x, w)
        return [tape.jacobian(y, w)]

    def vmap(x, w, vx, vw):
        return [tf.vectorized_map(lambda xi: fn(xi[None], w)[0], x)]

    def per_sample(x, w, vx, vw):
        def one(xi):
            with tf.GradientTape() as tape:
                tape.watch(w)
                value = loss(xi[None], w)
            return tape.gradient(value, w)

        return [tf.vectorized_map(one, x)]

    return {
        "grad": grad,
        "gradient_penalty": penalty,
        "hvp": lambda x, w, vx, vw: [hvp(x, w, vx)],
        "third_order": third,
        "jvp": jvp,
        "forward_over_reverse_hvp": fwd_over_rev,
        "batch_jacobian": batch_jacobian,
        "jacobian": jacobian,
        "vmap": vmap,
        "per_sample_grads": per_sample,
    }


@dataclasses.dataclass(frozen=True)
class Backend:
    """How `check_derivatives` runs transforms on one backend.

    Attributes:
        table: fn -> {transform: f(x, W, vx, vW) -> list of tensors}.
        tensor: (NumPy array, "float32" or "float64") -> a tensor.
        compile: f -> f compiled (jax.jit, tf.function, torch.compile).
        numpy: f's outputs -> a list of NumPy arrays.
        namespace: the array functions the plain formula needs (maximum,
            log, exp, eye, sum).
        float64: a context in which float64 tensors can be made.
    """

    table: Callable
    tensor: Callable
    compile: Callable
    numpy: Callable
    namespace: object
    float64: Callable = contextlib.nullcontext


def _jax() -> Backend:
    import jax
    import jax.numpy as jnp

    def float64():
        # jax >= 0.8 spells it jax.enable_x64; older ones, jax.experimental.
        if hasattr(jax, "enable_x64"):
            return jax.enable_x64(True)
        from jax.experimental import enable_x64

        return enable_x64()

    return Backend(
        _jax_table,
        lambda a, dtype: jnp.asarray(a, dtype),
        jax.jit,
        lambda out: [np.asarray(a) for a in jax.tree_util.tree_leaves(out)],
        jnp,
        float64,
    )


def _torch() -> Backend:
    import torch

    class Namespace:
        maximum, log, exp = torch.clamp_min, torch.log, torch.exp

        @staticmethod
        def eye(n, dtype):
            return torch.eye(n, dtype=dtype)

        @staticmethod
        def sum(t, axis):
            return t.sum(axis)

    return Backend(
        _torch_table,
        lambda a, dtype: torch.tensor(a, dtype=getattr(torch, dtype)),
        torch.compile,
        lambda out: [a.detach().numpy() for a in out],
        Namespace,
    )


def _tensorflow() -> Backend:
    import tensorflow as tf

    class Namespace:
        maximum, log, exp = tf.maximum, tf.math.log, tf.exp

        @staticmethod
        def eye(n, dtype):
            return tf.eye(n, dtype=dtype)

        @staticmethod
        def sum(t, axis):
            return tf.reduce_sum(t, axis)

    return Backend(
        _tensorflow_table,
        lambda a, dtype: tf.constant(a, dtype),
        tf.function,
        lambda out: [np.asarray(a) for a in out],
        Namespace,
    )


def backend() -> Backend:
    """The running Keras backend's."""
    return {"jax": _jax, "torch": _torch, "tensorflow": _tensorflow}[
        keras.backend.backend()
    ]()
