"""The derivatives of `log_inhibition` of every order, in closed form.

    s[b, i] = sum_j log f[b, j, i],   f = 1 - W[j, i] x[b, j]

Its derivatives are sums of one family of contractions (`reference.contract`):
the partial derivatives of the trilinear forms

    T_p(A, B, C) = sum_{b, j, i} A[b, j] B[j, i] C[b, i] R_p[b, j, i],   R_p = 1 / f ** p

(R_p = 0 where f is floored: a floored factor is a constant), closed under
differentiation because dR_p = p R_{p+1} (x dW + W dx). A `Kernel` gives the
first two operations fused; the third is derived here, once:

    forward(x, W)          = s
    adjoint(x, W, u)       = (dx, dW) of sum(u * s): (-T_1'_A(., W, u), -T_1'_B(x, ., u))
    tangent(x, W, tx, tW)  = ds = -(T_1'_C(x, tW, .) + T_1'_C(tx, W, .))

`adjoint` and `tangent` are each other's transposes. Every second derivative
is one formula (`Algebra.second`),

    d2s[t, s] = -(tW sx + sW tx) R_1 - (x tW + W tx) (x sW + W sx) R_2,

and the rules here give the JVP and VJP of `adjoint`, `tangent` and
`contract` with it and with dR_p, in terms of the same operations. So any
backend that wraps them as differentiable operations (jax primitives, torch
autograd Functions, tensorflow custom gradients) gets every order, forward
and reverse, with no (batch, n_in, n_out) tensor.

An `Algebra` holds one backend's operations bound to (x, W); `None` stands
for a zero tangent or cotangent throughout (its terms are skipped).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

#: The slots of T_p: "a" (batch, n_in), "b" (n_in, n_out), "c" (batch, n_out).
SLOTS = ("a", "b", "c")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One implementation's operations on plain tensors of its backend:

        forward(x, W, chunk) -> s                          (batch, n_out)
        adjoint(x, W, u, chunk) -> (dx, dW)                the vjp of sum(u * s)
        contract(slot, power, a, b, c, x, W, chunk) -> t   T_p's gradient in `slot`

    (the operand of `slot` None), with its own checks.

    Attributes:
        forward, adjoint, contract: the three operations.
        chunk: the factors per log the kernel always takes (the fused GPU
            kernels' tile), which the reference they export as takes too;
            None: the caller's `chunk_size`.
        build: the variant of the C loops it calls (`cpu_build`); why they
            cannot be built or loaded is a reason not to apply.
        reasons: `reasons(x, W, auto) -> list[str]`, any reason of its own.
    """

    forward: Callable
    adjoint: Callable
    contract: Callable
    chunk: int | None = None
    build: str | None = None
    reasons: Callable[..., list[str]] | None = None


def contract_shape(slot: str, x_shape, kernel_shape) -> tuple:
    """The shape of T_p's gradient in `slot` for x and W of these shapes."""
    batch, (n_in, n_out) = x_shape[0], kernel_shape
    return {"a": (batch, n_in), "b": (n_in, n_out), "c": (batch, n_out)}[slot]


def operand_slots(slot: str) -> tuple[str, str]:
    """The slots given to a contraction that leaves out `slot`, in order."""
    return tuple(s for s in SLOTS if s != slot)


def tangent(contract: Callable, x, kernel, tx, tw):
    """ds = -(T_1'_C(x, tW) + T_1'_C(tx, W)): the jvp of s along (tx, tW).

    `contract(slot, power, a, b)` computes the contraction; a None tangent is
    a zero (its term is skipped; None if both are).
    """
    return _neg(_add(_mul_c(contract, x, tw), _mul_c(contract, tx, kernel)))


def _mul_c(contract, a, b):
    return None if a is None or b is None else contract("c", 1, a, b)


def _add(*terms):
    """The sum of the terms that are not None (None if all are)."""
    total = None
    for term in terms:
        if term is not None:
            total = term if total is None else total + term
    return total


def _neg(t):
    return None if t is None else -t


def _mul(*factors):
    """The product, or None if any factor is None (a zero)."""
    out = None
    for f in factors:
        if f is None:
            return None
        out = f if out is None else out * f
    return out


def _scale(p: int, t):
    return None if t is None else (t if p == 1 else p * t)


#: Stands in `Algebra.second`'s terms for the direction whose gradient is taken.
_HOLE = object()


class Algebra:
    """One backend's differentiable operations, bound to x and W.

    Args:
        x, kernel: the primal inputs, (batch, n_in) and (n_in, n_out).
        contract: contract(slot, power, a, b, c) with the operand of `slot`
            None; differentiable by this backend's autodiff.
        adjoint: adjoint(u) -> (dx, dW).
        tangent: tangent(tx, tW) -> ds with both given, where the backend has
            an operation of its own for it (jax, whose tangent transposes to
            the fused adjoint); by default derived from `contract`.
    """

    def __init__(
        self,
        x,
        kernel,
        contract: Callable,
        adjoint: Callable,
        tangent: Callable | None = None,
    ):
        self.x, self.w = x, kernel
        self._contract, self._adjoint, self._tangent = contract, adjoint, tangent

    # -- the operations, with None for zeros ----------------------------------

    def contract(self, slot: str, power: int, a=None, b=None, c=None):
        given = {"a": a, "b": b, "c": c}
        if any(given[s] is None for s in operand_slots(slot)):
            return None
        return self._contract(slot, power, a, b, c)

    def adjoint(self, u):
        if u is None:
            return None, None
        return self._adjoint(u)

    def tangent(self, tx, tw):
        if self._tangent is None or tx is None or tw is None:
            return tangent(self.contract, self.x, self.w, tx, tw)
        return self._tangent(tx, tw)

    def second(self, slot: str, t, c=None, s=(None, None)) -> list:
        """The terms of the second derivative along t = (tx, tW) (module):

            d2s[t, s] = -(tW sx + sW tx) R_1 - (x tW + W tx) (x sW + W sx) R_2

        slot "c": d2s[t, s] itself, (batch, n_out), for the given s; "a" or
        "b": the gradient of sum(c * d2s[t, s]) in sx or in sW. Each term
        negated, in a fixed order (their sum is the derivative).
        """
        tx, tw = t
        x, w = self.x, self.w
        sx, sw = {"a": (_HOLE, None), "b": (None, _HOLE), "c": s}[slot]
        terms = (
            (1, (sx,), (tw,)),
            (1, (tx,), (sw,)),
            (2, (x, x), (tw, sw)),
            (2, (x, sx), (w, tw)),
            (2, (x, tx), (w, sw)),
            (2, (tx, sx), (w, w)),
        )
        out = []
        for power, a, b in terms:
            if slot == "c":
                out.append(_neg(self.contract("c", power, _mul(*a), _mul(*b))))
                continue
            held, other = (a, b) if slot == "a" else (b, a)
            if not any(f is _HOLE for f in held):
                continue
            given = {"a" if slot == "b" else "b": _mul(*other), "c": c}
            term = self.contract(slot, power, **given)
            rest = [f for f in held if f is not _HOLE]
            out.append(_neg(_mul(*rest, term) if rest else term))
        return out

    # -- rules -----------------------------------------------------------------

    def adjoint_jvp(self, u, tx, tw, tu):
        """d(dx, dW) of adjoint(x, W, u) along (tx, tW, tu)."""
        d_dx, d_dw = self.adjoint(tu)
        t = (tx, tw)
        return (
            _add(d_dx, *self.second("a", t, u)),
            _add(d_dw, *self.second("b", t, u)),
        )

    def adjoint_vjp(self, u, g_dx, g_dw, want=(True, True, True)):
        """(x_bar, W_bar, u_bar) for cotangents (g_dx, g_dW) of adjoint(x, W, u);
        None for those `want` leaves out."""
        t = (g_dx, g_dw)
        return (
            _add(*self.second("a", t, u)) if want[0] else None,
            _add(*self.second("b", t, u)) if want[1] else None,
            self.tangent(g_dx, g_dw) if want[2] else None,
        )

    def tangent_jvp(self, tx, tw, sx, sw, stx, stw):
        """d tangent(x, W, tx, tW) along (sx, sW) for (x, W) and (stx, stW)."""
        return _add(self.tangent(stx, stw), *self.second("c", (tx, tw), s=(sx, sw)))

    def contract_jvp(self, slot, power, operands, tangents, tx, tw):
        """d contract(slot, power, **operands) along the operands' tangents
        (dicts by slot) and (tx, tW)."""
        x, w = self.x, self.w
        terms = []
        for name, t in tangents.items():
            if t is not None:
                terms.append(self.contract(slot, power, **{**operands, name: t}))
        a, b, c = (operands.get(s) for s in SLOTS)
        nxt = power + 1
        # p * [T_{p+1}'(A x, B tW, C) + T_{p+1}'(A tx, B W, C)], a factor of the
        # left-out slot multiplying the result instead.
        for xs, ws in ((x, tw), (tx, w)):
            if xs is None or ws is None:
                continue
            if slot == "a":
                term = _mul(xs, self.contract("a", nxt, None, _mul(b, ws), c))
            elif slot == "b":
                term = _mul(ws, self.contract("b", nxt, _mul(a, xs), None, c))
            else:
                term = self.contract("c", nxt, _mul(a, xs), _mul(b, ws))
            terms.append(_scale(power, term))
        return _add(*terms)

    def contract_vjp(self, slot, power, operands, ct, want=None):
        """Cotangents {slot: bar} of the given operands, and (x_bar, W_bar),
        for a cotangent ct of contract(slot, power, **operands); `want` (a set
        of slot names and "x", "w") leaves the others None."""
        x, w = self.x, self.w
        want = set(operands) | {"x", "w"} if want is None else want
        full = {**operands, slot: ct}
        a, b, c = (full[s] for s in SLOTS)
        bars = {}
        for name in operands:
            rest = {k: v for k, v in full.items() if k != name}
            bars[name] = self.contract(name, power, **rest) if name in want else None
        nxt = power + 1
        x_bar = w_bar = None
        if "x" in want:
            x_bar = _scale(power, _mul(a, self.contract("a", nxt, None, _mul(b, w), c)))
        if "w" in want:
            w_bar = _scale(power, _mul(b, self.contract("b", nxt, _mul(a, x), None, c)))
        return bars, x_bar, w_bar
