"""`log_inhibition` with tensorflow custom gradients, differentiable to every order.

    s = log_inhibition(x, W)          one implementation's forward
    (dx, dW) = adjoint(x, W, u)       its backward, the vjp of sum(u * s)
    ds = tangent(x, W, tx, tW)        the jvp (keras.ops reference)
    contract(slot, power, ...)        the family every higher derivative is
                                      made of (`kernels.rules`)

Each is a `tf.custom_gradient` whose gradient function is written with these
same functions, so an outer `GradientTape` records it (gradient penalties,
Hessian-vector products, `batch_jacobian`) and `tf.autodiff.ForwardAccumulator`,
which differentiates the gradient function to get a JVP, works too. Inside
each function its inputs pass through `stop_gradient`: the tape records
only the custom gradient, never the chunk loops.

An implementation is any object with `forward(x, W, chunk) -> s` and
`adjoint(x, W, u, chunk) -> (dx, dW)` on tensors, and optionally `contract`
and `tangent` (else those of `kernels.reference` run).
"""

from __future__ import annotations

import tensorflow as tf

from keras_synann.kernels import reference, rules


def _algebra(x, kernel, impl, chunk) -> rules.Algebra:
    return rules.Algebra(
        x,
        kernel,
        contract=lambda slot, power, a=None, b=None, c=None: contract(
            slot, power, a, b, c, x, kernel, impl, chunk
        ),
        adjoint=lambda u: adjoint(x, kernel, u, impl, chunk),
        tangent=lambda tx, tw: tangent(x, kernel, tx, tw, impl, chunk),
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


def log_inhibition(x, kernel, impl, chunk: int):
    """s for tensors x (batch, n_in) and kernel (n_in, n_out) through `impl`."""

    @tf.custom_gradient
    def s(x, kernel):
        out = impl.forward(*_plain(x, kernel), chunk)

        def grad(u, variables=None):
            _no_variables(variables)
            return adjoint(x, kernel, u, impl, chunk)

        return out, grad

    return s(x, kernel)


def adjoint(x, kernel, u, impl, chunk: int):
    """(dx, dW) = impl.adjoint(x, W, u), itself differentiable."""

    @tf.custom_gradient
    def pair(x, kernel, u):
        d_x, d_w = impl.adjoint(*_plain(x, kernel, u), chunk)

        def grad(g_dx, g_dw, variables=None):
            _no_variables(variables)
            bars = _algebra(x, kernel, impl, chunk).adjoint_vjp(u, g_dx, g_dw)
            return _zeros_for(bars, (x, kernel, u))

        return (d_x, d_w), grad

    return pair(x, kernel, u)


def tangent(x, kernel, tx, tw, impl, chunk: int):
    """ds = -sum_j (x dW + dx W) / f, differentiable."""

    @tf.custom_gradient
    def ds(x, kernel, tx, tw):
        tangent_fn = getattr(impl, "tangent", reference.tangent)
        out = tangent_fn(*_plain(x, kernel, tx, tw), chunk)

        def grad(ct, variables=None):
            _no_variables(variables)
            bars = _algebra(x, kernel, impl, chunk).tangent_vjp(tx, tw, ct)
            return _zeros_for(bars, (x, kernel, tx, tw))

        return out, grad

    return ds(x, kernel, tx, tw)


def contract(slot, power, a, b, c, x, kernel, impl, chunk: int):
    """`reference.contract` (or the implementation's own), differentiable."""
    names = tuple(s for s in rules.SLOTS if s != slot)
    given = {"a": a, "b": b, "c": c}
    filled = [given[n] for n in names]

    @tf.custom_gradient
    def out(p, q, x, kernel):
        operands = dict(zip(names, _plain(p, q), strict=True))
        contract_fn = getattr(impl, "contract", reference.contract)
        value = contract_fn(
            slot, power, operands.get("a"), operands.get("b"), operands.get("c"),
            *_plain(x, kernel), chunk,
        )  # fmt: skip

        def grad(ct, variables=None):
            _no_variables(variables)
            alg = _algebra(x, kernel, impl, chunk)
            ops_ = dict(zip(names, (p, q), strict=True))
            bars, x_bar, w_bar = alg.contract_vjp(slot, power, ops_, ct)
            return _zeros_for(
                [bars[names[0]], bars[names[1]], x_bar, w_bar], (p, q, x, kernel)
            )

        return value, grad

    return out(*filled, x, kernel)
