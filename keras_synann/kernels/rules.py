"""The derivatives of `log_inhibition` of every order, in closed form.

    s[b, i] = sum_j log f[b, j, i],   f = 1 - W[j, i] x[b, j]

Its derivatives are sums of one family of contractions (`reference.contract`):
the partial derivatives of the trilinear forms

    T_p(A, B, C) = sum_{b, j, i} A[b, j] B[j, i] C[b, i] R_p[b, j, i],   R_p = 1 / f ** p

(R_p = 0 where f is floored: a floored factor is a constant), closed under
differentiation because dR_p = p R_{p+1} (x dW + W dx). Three operations
carry the first order, each with a fused kernel where one exists:

    forward(x, W)          = s
    adjoint(x, W, u)       = (dx, dW) of sum(u * s): (-T_1'_A(., W, u), -T_1'_B(x, ., u))
    tangent(x, W, tx, tW)  = ds = -(T_1'_C(x, tW, .) + T_1'_C(tx, W, .))

`adjoint` and `tangent` are each other's transposes. The functions here give
the JVP and VJP of `adjoint`, `tangent` and `contract` in terms of those same
operations, so any backend that wraps the four as differentiable operations
(jax primitives, torch autograd Functions, tensorflow custom gradients) gets
every order, forward and reverse, with no (batch, n_in, n_out) tensor.

An `Algebra` holds one backend's four operations bound to (x, W); `None`
stands for a zero tangent or cotangent throughout (its terms are skipped).
"""

from __future__ import annotations

from collections.abc import Callable

#: The slots of T_p: "a" (batch, n_in), "b" (n_in, n_out), "c" (batch, n_out).
SLOTS = ("a", "b", "c")


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


class Algebra:
    """One backend's differentiable operations, bound to x and W.

    Args:
        x, kernel: the primal inputs, (batch, n_in) and (n_in, n_out).
        contract: contract(slot, power, a, b, c) with the operand of `slot`
            None; differentiable by this backend's autodiff.
        adjoint: adjoint(u) -> (dx, dW).
        tangent: tangent(tx, tW) -> ds (both given).
    """

    def __init__(
        self,
        x,
        kernel,
        contract: Callable,
        adjoint: Callable,
        tangent: Callable,
    ):
        self.x, self.w = x, kernel
        self._contract, self._adjoint, self._tangent = contract, adjoint, tangent

    # -- the operations, with None for zeros ----------------------------------

    def contract(self, slot: str, power: int, a=None, b=None, c=None):
        operands = {"a": a, "b": b, "c": c}
        del operands[slot]
        if any(v is None for v in operands.values()):
            return None
        return self._contract(slot, power, a, b, c)

    def adjoint(self, u):
        if u is None:
            return None, None
        return self._adjoint(u)

    def tangent(self, tx, tw):
        if tx is None and tw is None:
            return None
        if tx is None:
            return -self.contract("c", 1, self.x, tw)
        if tw is None:
            return -self.contract("c", 1, tx, self.w)
        return self._tangent(tx, tw)

    # -- rules -----------------------------------------------------------------

    def adjoint_jvp(self, u, tx, tw, tu):
        """d(dx, dW) of adjoint(x, W, u) along (tx, tW, tu)."""
        x, w = self.x, self.w
        d_dx, d_dw = self.adjoint(tu)
        d_dx = _add(
            d_dx,
            _neg(self.contract("a", 1, None, tw, u)),
            _neg(_mul(x, self.contract("a", 2, None, _mul(w, tw), u))),
            _neg(_mul(tx, self.contract("a", 2, None, w * w, u))),
        )
        d_dw = _add(
            d_dw,
            _neg(self.contract("b", 1, tx, None, u)),
            _neg(_mul(tw, self.contract("b", 2, x * x, None, u))),
            _neg(_mul(w, self.contract("b", 2, _mul(x, tx), None, u))),
        )
        return d_dx, d_dw

    def adjoint_vjp(self, u, g_dx, g_dw, want=(True, True, True)):
        """(x_bar, W_bar, u_bar) for cotangents (g_dx, g_dW) of adjoint(x, W, u);
        None for those `want` leaves out."""
        x, w = self.x, self.w
        u_bar = self.tangent(g_dx, g_dw) if want[2] else None
        x_bar = (
            None
            if not want[0]
            else _add(
                _neg(self.contract("a", 1, None, g_dw, u)),
                _neg(_mul(g_dx, self.contract("a", 2, None, w * w, u))),
                _neg(_mul(x, self.contract("a", 2, None, _mul(g_dw, w), u))),
            )
        )
        w_bar = (
            None
            if not want[1]
            else _add(
                _neg(self.contract("b", 1, g_dx, None, u)),
                _neg(_mul(w, self.contract("b", 2, _mul(g_dx, x), None, u))),
                _neg(_mul(g_dw, self.contract("b", 2, x * x, None, u))),
            )
        )
        return x_bar, w_bar, u_bar

    def tangent_jvp(self, tx, tw, sx, sw, stx, stw):
        """d tangent(x, W, tx, tW) along (sx, sW) for (x, W) and (stx, stW)."""
        x, w = self.x, self.w
        return _add(
            self.tangent(stx, stw),
            _neg(self.contract("c", 1, sx, tw)),
            _neg(self.contract("c", 1, tx, sw)),
            _neg(self.contract("c", 2, x * x, _mul(tw, sw))),
            _neg(self.contract("c", 2, _mul(x, sx), _mul(tw, w))),
            _neg(self.contract("c", 2, _mul(tx, x), _mul(w, sw))),
            _neg(self.contract("c", 2, _mul(tx, sx), w * w)),
        )

    def tangent_vjp(self, tx, tw, ct, want=(True, True, True, True)):
        """(x_bar, W_bar, tx_bar, tW_bar) for a cotangent ct of tangent's output;
        None for those `want` leaves out."""
        x, w = self.x, self.w
        tx_bar, tw_bar = self.adjoint(ct) if want[2] or want[3] else (None, None)
        x_bar = (
            None
            if not want[0]
            else _add(
                _neg(self.contract("a", 1, None, tw, ct)),
                _neg(_mul(x, self.contract("a", 2, None, _mul(tw, w), ct))),
                _neg(_mul(tx, self.contract("a", 2, None, w * w, ct))),
            )
        )
        w_bar = (
            None
            if not want[1]
            else _add(
                _neg(self.contract("b", 1, tx, None, ct)),
                _neg(_mul(tw, self.contract("b", 2, x * x, None, ct))),
                _neg(_mul(w, self.contract("b", 2, _mul(tx, x), None, ct))),
            )
        )
        return x_bar, w_bar, tx_bar, tw_bar

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
