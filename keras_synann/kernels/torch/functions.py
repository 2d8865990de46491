"""`log_inhibition` as torch autograd Functions, differentiable to every order.

    s = LogInhibition(x, W)             one implementation's fused forward
    (dx, dW) = Adjoint(x, W, u)         its fused backward, the vjp of sum(u * s)
    ds = Tangent(x, W, tx, tW)          the jvp (keras.ops reference)
    Contract(slot, power, ...)          the family every higher derivative is
                                        made of (`kernels.rules`)

Each Function (torch's "Extending torch.func with autograd.Function") has
`setup_context`, a `backward` built from these Functions (so
`create_graph=True` differentiates it again: gradient penalties,
Hessian-vector products), a `jvp` (`torch.func.jvp`, `jacfwd`,
`torch.autograd.forward_ad`) and a `vmap` rule (`torch.func.vmap`, per-sample
gradients with `vmap(grad)`): a mapped batch of samples with shared weights
folds into the batch; anything else runs one slice at a time.

An implementation is any object with `forward(x, W, chunk) -> s` and
`adjoint(x, W, u, chunk) -> (dx, dW)` on plain tensors, and optionally
`contract` and `tangent` (else those of `kernels.reference` run). The forwards take
their inputs as they are (autograd runs them without recording): under
torch.compile, which traces a Function's forward and differentiates it for
forward mode, a detached input would drop the tangent.
"""

from __future__ import annotations

import torch

from keras_synann.kernels import reference, rules


def _algebra(x, kernel, impl, chunk) -> rules.Algebra:
    return rules.Algebra(
        x,
        kernel,
        contract=lambda slot, power, a=None, b=None, c=None: Contract.apply(
            slot, power, a, b, c, x, kernel, impl, chunk
        ),
        adjoint=lambda u: Adjoint.apply(x, kernel, u, impl, chunk),
        tangent=lambda tx, tw: Tangent.apply(x, kernel, tx, tw, impl, chunk),
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
    """s = impl.forward(x, W), with its derivatives of every order."""

    @staticmethod
    def forward(x, kernel, impl, chunk):
        return impl.forward(x, kernel, chunk)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, kernel, impl, chunk = inputs
        ctx.save_for_backward(x, kernel)
        ctx.save_for_forward(x, kernel)
        ctx.impl, ctx.chunk = impl, chunk

    @staticmethod
    def backward(ctx, u):
        x, kernel = ctx.saved_tensors
        d_x, d_w = Adjoint.apply(x, kernel, u, ctx.impl, ctx.chunk)
        return d_x, d_w, None, None

    @staticmethod
    def jvp(ctx, tx, tw, *_):
        x, kernel = ctx.saved_tensors
        return Tangent.apply(
            x, kernel, _or_zeros(tx, x), _or_zeros(tw, kernel), ctx.impl, ctx.chunk
        )

    @staticmethod
    def vmap(info, in_dims, x, kernel, impl, chunk):
        x_dim, w_dim = in_dims[:2]
        if w_dim is None:
            out = _fold(
                lambda xs, w: LogInhibition.apply(xs, w, impl, chunk),
                info.batch_size,
                [(x, x_dim)],
                [kernel],
            )
        else:
            out = _per_slice(
                lambda xs, w: LogInhibition.apply(xs, w, impl, chunk),
                info.batch_size,
                [(x, x_dim), (kernel, w_dim)],
            )
        return out, 0


class Adjoint(torch.autograd.Function):
    """(dx, dW) = impl.adjoint(x, W, u): the fused vjp, itself differentiable."""

    @staticmethod
    def forward(x, kernel, u, impl, chunk):
        return tuple(impl.adjoint(x, kernel, u, chunk))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, kernel, u, impl, chunk = inputs
        ctx.save_for_backward(x, kernel, u)
        ctx.save_for_forward(x, kernel, u)
        ctx.impl, ctx.chunk = impl, chunk

    @staticmethod
    def backward(ctx, g_dx, g_dw):
        x, kernel, u = ctx.saved_tensors
        alg = _algebra(x, kernel, ctx.impl, ctx.chunk)
        x_bar, w_bar, u_bar = alg.adjoint_vjp(
            u, g_dx, g_dw, want=ctx.needs_input_grad[:3]
        )
        return x_bar, w_bar, u_bar, None, None

    @staticmethod
    def jvp(ctx, tx, tw, tu, *_):
        x, kernel, u = ctx.saved_tensors
        alg = _algebra(x, kernel, ctx.impl, ctx.chunk)
        d_dx, d_dw = alg.adjoint_jvp(u, tx, tw, tu)
        return _or_zeros(d_dx, x), _or_zeros(d_dw, kernel)

    @staticmethod
    def vmap(info, in_dims, x, kernel, u, impl, chunk):
        out = _per_slice(
            lambda *a: Adjoint.apply(*a, impl, chunk),
            info.batch_size,
            list(zip((x, kernel, u), in_dims[:3], strict=True)),
        )
        return out, (0, 0)


class Tangent(torch.autograd.Function):
    """ds = -sum_j (x dW + dx W) / f: the jvp of LogInhibition."""

    @staticmethod
    def forward(x, kernel, tx, tw, impl, chunk):
        return getattr(impl, "tangent", reference.tangent)(x, kernel, tx, tw, chunk)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, kernel, tx, tw, impl, chunk = inputs
        ctx.save_for_backward(x, kernel, tx, tw)
        ctx.save_for_forward(x, kernel, tx, tw)
        ctx.impl, ctx.chunk = impl, chunk

    @staticmethod
    def backward(ctx, ct):
        x, kernel, tx, tw = ctx.saved_tensors
        alg = _algebra(x, kernel, ctx.impl, ctx.chunk)
        bars = alg.tangent_vjp(tx, tw, ct, want=ctx.needs_input_grad[:4])
        return (*bars, None, None)

    @staticmethod
    def jvp(ctx, sx, sw, stx, stw, *_):
        x, kernel, tx, tw = ctx.saved_tensors
        alg = _algebra(x, kernel, ctx.impl, ctx.chunk)
        out = alg.tangent_jvp(tx, tw, sx, sw, stx, stw)
        return _or_zeros(out, x.new_empty((x.shape[0], kernel.shape[1])))

    @staticmethod
    def vmap(info, in_dims, x, kernel, tx, tw, impl, chunk):
        def call(*a):
            return Tangent.apply(*a, impl, chunk)

        x_dim, w_dim, tx_dim, tw_dim = in_dims[:4]
        if w_dim is None and tw_dim is None:
            out = _fold(
                lambda xs, txs, w, tws: call(xs, w, txs, tws),
                info.batch_size,
                [(x, x_dim), (tx, tx_dim)],
                [kernel, tw],
            )
        else:
            out = _per_slice(
                call,
                info.batch_size,
                list(zip((x, kernel, tx, tw), in_dims[:4], strict=True)),
            )
        return out, 0


class Contract(torch.autograd.Function):
    """One partial derivative of T_p (`reference.contract`), slot left None."""

    @staticmethod
    def forward(slot, power, a, b, c, x, kernel, impl, chunk):
        contract = getattr(impl, "contract", reference.contract)
        return contract(slot, power, a, b, c, x, kernel, chunk)

    @staticmethod
    def setup_context(ctx, inputs, output):
        slot, power, a, b, c, x, kernel, impl, chunk = inputs
        operands = {"a": a, "b": b, "c": c}
        del operands[slot]
        ctx.names = tuple(operands)
        ctx.save_for_backward(*operands.values(), x, kernel)
        ctx.save_for_forward(*operands.values(), x, kernel)
        ctx.slot, ctx.power, ctx.impl, ctx.chunk = slot, power, impl, chunk

    @staticmethod
    def _unpack(ctx):
        *filled, x, kernel = ctx.saved_tensors
        alg = _algebra(x, kernel, ctx.impl, ctx.chunk)
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
    def jvp(ctx, _slot, _power, ta, tb, tc, tx, tw, _impl, _chunk):
        operands, alg = Contract._unpack(ctx)
        tangents = {s: t for s, t in zip(rules.SLOTS, (ta, tb, tc), strict=True)}
        tangents = {s: tangents[s] for s in operands}
        out = alg.contract_jvp(ctx.slot, ctx.power, operands, tangents, tx, tw)
        if out is None:
            shape = _contract_shape(ctx.slot, alg.x, alg.w)
            out = alg.x.new_zeros(shape)
        return out

    @staticmethod
    def vmap(info, in_dims, slot, power, a, b, c, x, kernel, impl, chunk):
        dims = dict(zip(("a", "b", "c", "x", "w"), in_dims[2:7], strict=True))
        tensors = {"a": a, "b": b, "c": c, "x": x, "w": kernel}
        weights_mapped = dims["b"] is not None or dims["w"] is not None
        if slot != "b" and not weights_mapped:
            sample_names = [n for n in ("a", "c") if n != slot]

            def call(*args):
                *samples, xs, bb, w = args
                ops_ = dict(zip(sample_names, samples, strict=True))
                return Contract.apply(
                    slot, power, ops_.get("a"), bb, ops_.get("c"), xs, w, impl, chunk
                )

            out = _fold(
                call,
                info.batch_size,
                [(tensors[n], dims[n]) for n in (*sample_names, "x")],
                [b, kernel],
            )
            return out, 0
        names = [n for n in ("a", "b", "c", "x", "w") if tensors[n] is not None]

        def one(*args):
            t = dict(zip(names, args, strict=True))
            return Contract.apply(
                slot, power, t.get("a"), t.get("b"), t.get("c"), t["x"], t["w"],
                impl, chunk,
            )  # fmt: skip

        return _per_slice(
            one, info.batch_size, [(tensors[n], dims[n]) for n in names]
        ), 0


def _contract_shape(slot, x, kernel):
    return {
        "a": (x.shape[0], kernel.shape[0]),
        "b": tuple(kernel.shape),
        "c": (x.shape[0], kernel.shape[1]),
    }[slot]


def log_inhibition(x, kernel, impl, chunk: int):
    """s for torch tensors x (batch, n_in) and kernel (n_in, n_out) through `impl`."""
    return LogInhibition.apply(x, kernel, impl, chunk)
