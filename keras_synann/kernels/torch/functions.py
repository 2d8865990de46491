"""`log_inhibition` as torch autograd Functions, differentiable to every order.

    s = LogInhibition(x, W)             a kernel's forward
    (dx, dW) = Adjoint(x, W, u)         its adjoint, the vjp of sum(u * s)
    Contract(slot, power, ...)          its contractions, which every other
                                        derivative is made of (`kernels.rules`;
                                        the jvp of s is two of them)

each taking the implementation's `base.Kernel` and the chunk. Each Function
(torch's "Extending torch.func with autograd.Function") has `setup_context`,
a `backward` built from these Functions (so `create_graph=True`
differentiates it again: gradient penalties, Hessian-vector products), a
`jvp` (`torch.func.jvp`, `jacfwd`, `torch.autograd.forward_ad`) and a `vmap`
rule (`torch.func.vmap`, per-sample gradients with `vmap(grad)`): a mapped
batch of samples with shared weights folds into the batch; anything else
runs one slice at a time.

The kernel's operations take their inputs as they are (autograd runs them
without recording): under torch.compile, which traces a Function's forward
and differentiates it for forward mode, a detached input would drop the
tangent.
"""

from __future__ import annotations

import torch

from keras_synann.kernels import rules
from keras_synann.kernels.rules import Kernel


def _algebra(x, w, kernel: Kernel, chunk) -> rules.Algebra:
    return rules.Algebra(
        x,
        w,
        contract=lambda slot, power, a=None, b=None, c=None: Contract.apply(
            slot, power, a, b, c, x, w, kernel, chunk
        ),
        adjoint=lambda u: Adjoint.apply(x, w, u, kernel, chunk),
    )


def _or_zeros(t, like):
    return torch.zeros_like(like) if t is None else t


def _moved(t, dim, size):
    """`t` with its mapped axis first (broadcast when it has none)."""
    if dim is None:
        return t.expand(size, *t.shape)
    return t.movedim(dim, 0)


def _fold(fn, size, samples, weights):
    """fn(*folded_samples, *weights) with the mapped axis folded into the
    batch of every per-sample tensor; the result unfolded, mapped axis 0."""
    folded = []
    batch = None
    for t, dim in samples:
        t = _moved(t, dim, size)
        batch = t.shape[1]
        folded.append(t.reshape(size * batch, *t.shape[2:]))
    out = fn(*folded, *weights)
    return out.reshape(size, batch, *out.shape[1:])


def _per_slice(fn, size, args):
    """fn on each mapped slice; results stacked on axis 0."""
    outs = [
        fn(*(t if dim is None else t.select(dim, k) for t, dim in args))
        for k in range(size)
    ]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*outs, strict=True))
    return torch.stack(outs)


class LogInhibition(torch.autograd.Function):
    """s = kernel.forward(x, W), with its derivatives of every order."""

    @staticmethod
    def forward(x, w, kernel, chunk):
        return kernel.forward(x, w, chunk)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, kernel, chunk = inputs
        ctx.save_for_backward(x, w)
        ctx.save_for_forward(x, w)
        ctx.kernel, ctx.chunk = kernel, chunk

    @staticmethod
    def backward(ctx, u):
        x, w = ctx.saved_tensors
        d_x, d_w = Adjoint.apply(x, w, u, ctx.kernel, ctx.chunk)
        return d_x, d_w, None, None

    @staticmethod
    def jvp(ctx, tx, tw, *_):
        x, w = ctx.saved_tensors
        ds = _algebra(x, w, ctx.kernel, ctx.chunk).tangent(tx, tw)
        return _or_zeros(ds, x.new_empty((x.shape[0], w.shape[1])))

    @staticmethod
    def vmap(info, in_dims, x, w, kernel, chunk):
        def call(xs, ws):
            return LogInhibition.apply(xs, ws, kernel, chunk)

        x_dim, w_dim = in_dims[:2]
        if w_dim is None:
            out = _fold(call, info.batch_size, [(x, x_dim)], [w])
        else:
            out = _per_slice(call, info.batch_size, [(x, x_dim), (w, w_dim)])
        return out, 0


class Adjoint(torch.autograd.Function):
    """(dx, dW) = kernel.adjoint(x, W, u): the fused vjp, itself differentiable."""

    @staticmethod
    def forward(x, w, u, kernel, chunk):
        return tuple(kernel.adjoint(x, w, u, chunk))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, u, kernel, chunk = inputs
        ctx.save_for_backward(x, w, u)
        ctx.save_for_forward(x, w, u)
        ctx.kernel, ctx.chunk = kernel, chunk
        # An output no one uses gets None, not zeros: its terms are skipped.
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, g_dx, g_dw):
        x, w, u = ctx.saved_tensors
        alg = _algebra(x, w, ctx.kernel, ctx.chunk)
        x_bar, w_bar, u_bar = alg.adjoint_vjp(
            u, g_dx, g_dw, want=ctx.needs_input_grad[:3]
        )
        return x_bar, w_bar, u_bar, None, None

    @staticmethod
    def jvp(ctx, tx, tw, tu, *_):
        x, w, u = ctx.saved_tensors
        d_dx, d_dw = _algebra(x, w, ctx.kernel, ctx.chunk).adjoint_jvp(u, tx, tw, tu)
        return _or_zeros(d_dx, x), _or_zeros(d_dw, w)

    @staticmethod
    def vmap(info, in_dims, x, w, u, kernel, chunk):
        out = _per_slice(
            lambda *a: Adjoint.apply(*a, kernel, chunk),
            info.batch_size,
            list(zip((x, w, u), in_dims[:3], strict=True)),
        )
        return out, (0, 0)


class Contract(torch.autograd.Function):
    """kernel.contract(slot, power, a, b, c, x, W): T_p's gradient in `slot`
    (whose operand is None), itself differentiable."""

    @staticmethod
    def forward(slot, power, a, b, c, x, w, kernel, chunk):
        return kernel.contract(slot, power, a, b, c, x, w, chunk)

    @staticmethod
    def setup_context(ctx, inputs, output):
        slot, power, a, b, c, x, w, kernel, chunk = inputs
        given = {"a": a, "b": b, "c": c}
        ctx.names = rules.operand_slots(slot)
        filled = [given[n] for n in ctx.names]
        ctx.save_for_backward(*filled, x, w)
        ctx.save_for_forward(*filled, x, w)
        ctx.slot, ctx.power, ctx.kernel, ctx.chunk = slot, power, kernel, chunk

    @staticmethod
    def _unpack(ctx):
        *filled, x, w = ctx.saved_tensors
        alg = _algebra(x, w, ctx.kernel, ctx.chunk)
        return dict(zip(ctx.names, filled, strict=True)), alg

    @staticmethod
    def backward(ctx, ct):
        operands, alg = Contract._unpack(ctx)
        needed = dict(
            zip(("a", "b", "c", "x", "w"), ctx.needs_input_grad[2:7], strict=True)
        )
        bars, x_bar, w_bar = alg.contract_vjp(
            ctx.slot, ctx.power, operands, ct, want={k for k, v in needed.items() if v}
        )
        by_slot = [bars.get(s) for s in rules.SLOTS]
        return None, None, *by_slot, x_bar, w_bar, None, None

    @staticmethod
    def jvp(ctx, _slot, _power, ta, tb, tc, tx, tw, _kernel, _chunk):
        operands, alg = Contract._unpack(ctx)
        tangents = {s: t for s, t in zip(rules.SLOTS, (ta, tb, tc), strict=True)}
        tangents = {s: tangents[s] for s in operands}
        out = alg.contract_jvp(ctx.slot, ctx.power, operands, tangents, tx, tw)
        if out is None:
            shape = rules.contract_shape(ctx.slot, alg.x.shape, alg.w.shape)
            out = alg.x.new_zeros(shape)
        return out

    @staticmethod
    def vmap(info, in_dims, slot, power, a, b, c, x, w, kernel, chunk):
        dims = dict(zip(("a", "b", "c", "x", "w"), in_dims[2:7], strict=True))
        tensors = {"a": a, "b": b, "c": c, "x": x, "w": w}
        weights_mapped = dims["b"] is not None or dims["w"] is not None
        if slot != "b" and not weights_mapped:
            sample_names = [n for n in ("a", "c") if n != slot]

            def call(*args):
                *samples, xs, bb, ws = args
                ops_ = dict(zip(sample_names, samples, strict=True))
                return Contract.apply(
                    slot, power, ops_.get("a"), bb, ops_.get("c"), xs, ws, kernel, chunk
                )

            out = _fold(
                call,
                info.batch_size,
                [(tensors[n], dims[n]) for n in (*sample_names, "x")],
                [b, w],
            )
            return out, 0
        names = [n for n in ("a", "b", "c", "x", "w") if tensors[n] is not None]

        def one(*args):
            t = dict(zip(names, args, strict=True))
            return Contract.apply(
                slot, power, t.get("a"), t.get("b"), t.get("c"), t["x"], t["w"],
                kernel, chunk,
            )  # fmt: skip

        return _per_slice(
            one, info.batch_size, [(tensors[n], dims[n]) for n in names]
        ), 0


def log_inhibition(kernel: Kernel, x, w, chunk: int):
    """s for torch tensors x (batch, n_in) and w (n_in, n_out) through `kernel`."""
    return LogInhibition.apply(x, w, kernel, chunk)
