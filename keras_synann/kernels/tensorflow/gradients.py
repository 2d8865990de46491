"""`log_inhibition` with tensorflow custom gradients, differentiable to every order.

    s = log_inhibition(kernel, x, W)         a kernel's forward
    (dx, dW) = adjoint(kernel, x, W, u)      its adjoint, the vjp of sum(u * s)
    contract(kernel, slot, power, ...)       its contractions, which every
                                             other derivative is made of
                                             (`kernels.rules`)

each taking the implementation's `base.Kernel` and the chunk. Each is a
`tf.custom_gradient` whose gradient function is written with these same
functions, so an outer `GradientTape` records it (gradient penalties,
Hessian-vector products, `batch_jacobian`) and
`tf.autodiff.ForwardAccumulator`, which differentiates the gradient
function to get a JVP, works too. Inside each function its inputs pass
through `stop_gradient`: the tape records only the custom gradient, never
the kernel's own operations.
"""

from __future__ import annotations

import tensorflow as tf

from keras_synann.kernels import rules
from keras_synann.kernels.rules import Kernel


def _algebra(kernel: Kernel, x, w, chunk) -> rules.Algebra:
    return rules.Algebra(
        x,
        w,
        contract=lambda slot, power, a=None, b=None, c=None: contract(
            kernel, slot, power, a, b, c, x, w, chunk
        ),
        adjoint=lambda u: adjoint(kernel, x, w, u, chunk),
    )


def _plain(*tensors):
    return [tf.stop_gradient(t) for t in tensors]


def _no_variables(variables):
    if variables:
        raise ValueError(
            "keras_synann: pass the kernel as an argument (a tensor), not as a "
            f"variable captured by the function. Received: {variables}"
        )


def _zeros_for(bars, likes):
    return [
        tf.zeros_like(like) if b is None else b
        for b, like in zip(bars, likes, strict=True)
    ]


def log_inhibition(kernel: Kernel, x, w, chunk: int):
    """s for tensors x (batch, n_in) and w (n_in, n_out) through `kernel`."""

    @tf.custom_gradient
    def s(x, w):
        out = kernel.forward(*_plain(x, w), chunk)

        def grad(u, variables=None):
            _no_variables(variables)
            return adjoint(kernel, x, w, u, chunk)

        return out, grad

    return s(x, w)


def adjoint(kernel: Kernel, x, w, u, chunk: int):
    """(dx, dW) = kernel.adjoint(x, W, u), itself differentiable."""

    @tf.custom_gradient
    def pair(x, w, u):
        d_x, d_w = kernel.adjoint(*_plain(x, w, u), chunk)

        def grad(g_dx, g_dw, variables=None):
            _no_variables(variables)
            bars = _algebra(kernel, x, w, chunk).adjoint_vjp(u, g_dx, g_dw)
            return _zeros_for(bars, (x, w, u))

        return (d_x, d_w), grad

    return pair(x, w, u)


def contract(kernel: Kernel, slot, power, a, b, c, x, w, chunk: int):
    """kernel.contract(slot, power, a, b, c, x, W), differentiable."""
    names = rules.operand_slots(slot)
    given = {"a": a, "b": b, "c": c}

    @tf.custom_gradient
    def out(p, q, x, w):
        operands = dict(zip(names, _plain(p, q), strict=True))
        value = kernel.contract(
            slot, power, operands.get("a"), operands.get("b"), operands.get("c"),
            *_plain(x, w), chunk,
        )  # fmt: skip

        def grad(ct, variables=None):
            _no_variables(variables)
            alg = _algebra(kernel, x, w, chunk)
            filled = dict(zip(names, (p, q), strict=True))
            bars, x_bar, w_bar = alg.contract_vjp(slot, power, filled, ct)
            return _zeros_for([bars[n] for n in names] + [x_bar, w_bar], (p, q, x, w))

        return value, grad

    return out(*(given[n] for n in names), x, w)
