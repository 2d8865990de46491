"""`log_inhibition` as four jax primitives, differentiable to every order.

    s = forward(x, W)                 (batch, n_in), (n_in, n_out) -> (batch, n_out)
    (dx, dW) = adjoint(x, W, u)       the vjp of sum(u * s)
    ds = tangent(x, W, tx, tW)        the jvp of s along (tx, tW)
    t = contract(p, q, x, W)          T_p's gradient in `slot` (`kernels.rules`),
                                      p, q the operands not left out

Each takes the implementation's `base.Kernel` as a static parameter,
`kernel`, with `chunk` (and `contract` its `slot` and `power`), and has, at
module level (the pattern of jax's FFI guide and jax-finufft):

- a JVP rule written with these primitives (`rules.Algebra`): so `jax.jvp`,
  `jacfwd`, `hessian` and forward-over-reverse work, and reverse mode comes
  from transposing the tangent;
- a transpose rule for its linear operands: `tangent` transposes to the
  fused `adjoint` (so `jax.grad` runs one fused kernel forward and one
  backward), `adjoint` to `tangent`, `contract` to `contract`;
- a batching rule: a mapped batch of samples with shared weights folds into
  the batch; anything else (per-sample weight gradients, `vmap(grad)`) maps
  one slice at a time with `lax.map`;
- a lowering: the kernel's operation (the tangent from its contract), or
  the keras.ops reference (`kernels.reference`) wherever the module is
  lowered for export (`jax.export`, jax2tf, Keras's `model.export`).

So `jax.jit` runs the kernel while a serialized module holds only standard
ops. Eager calls run a jitted bind. When jax2onnx is imported, every
primitive gets a jax2onnx plugin that converts it as the reference
(`kernels.jax.onnx`).
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from keras_synann.kernels import reference, rules
from keras_synann.kernels.rules import Kernel

forward_p = Primitive("log_inhibition")
adjoint_p = Primitive("log_inhibition_adjoint")
adjoint_p.multiple_results = True
tangent_p = Primitive("log_inhibition_tangent")
contract_p = Primitive("log_inhibition_contract")


def log_inhibition(kernel: Kernel, x, w, chunk: int):
    """s for jax arrays x (batch, n_in) and w (n_in, n_out) through `kernel`."""
    if "jax2onnx" in sys.modules:  # Keras's model.export(format="onnx")
        from keras_synann.kernels.jax import onnx

        for primitive, operation in _OPERATIONS.items():
            onnx.register(primitive.name, _as_reference(operation))
    return forward_p.bind(x, w, kernel=kernel, chunk=int(chunk))


# --- the operations of a kernel, as each primitive computes them ---------------------


def _forward(kernel, x, w, *, chunk):
    return kernel.forward(x, w, chunk)


def _adjoint(kernel, x, w, u, *, chunk):
    return list(kernel.adjoint(x, w, u, chunk))


def _tangent(kernel, x, w, tx, tw, *, chunk):
    def contract(slot, power, a, b):
        return kernel.contract(slot, power, a, b, None, x, w, chunk)

    return rules.tangent(contract, x, w, tx, tw)


def _contract(kernel, p, q, x, w, *, slot, power, chunk):
    given = dict(zip(rules.operand_slots(slot), (p, q), strict=True))
    a, b, c = (given.get(s) for s in rules.SLOTS)
    return kernel.contract(slot, power, a, b, c, x, w, chunk)


_OPERATIONS = {
    forward_p: _forward,
    adjoint_p: _adjoint,
    tangent_p: _tangent,
    contract_p: _contract,
}


def _as_reference(operation):
    """`operation` of the reference, whatever the `kernel` parameter says."""

    def reference_operation(*args, kernel, **params):
        del kernel
        return operation(reference.KERNEL, *args, **params)

    return reference_operation


def _lowering(operation, multiple_results: bool):
    """Lowers `operation` of the kernel, or of the reference for export."""

    def rule(ctx, *args, **params):
        if ctx.module_context.lowering_parameters.for_export:
            fn = functools.partial(_as_reference(operation), **params)
        else:
            fn = functools.partial(operation, params.pop("kernel"), **params)
        return mlir.lower_fun(fn, multiple_results=multiple_results)(ctx, *args)

    return rule


@functools.cache
def _jitted(primitive: Primitive, params: tuple):
    return jax.jit(lambda *args: primitive.bind(*args, **dict(params)))


def _jitted_bind(primitive: Primitive, *args, **params):
    """An eager call: the primitive alone, compiled."""
    return _jitted(primitive, tuple(sorted(params.items())))(*args)


for _primitive, _operation in _OPERATIONS.items():
    _primitive.def_impl(functools.partial(_jitted_bind, _primitive))
    mlir.register_lowering(
        _primitive, _lowering(_operation, _primitive.multiple_results)
    )


def _output(x, w):
    return ShapedArray((x.shape[0], w.shape[1]), x.dtype)


forward_p.def_abstract_eval(lambda x, w, **_: _output(x, w))
tangent_p.def_abstract_eval(lambda x, w, tx, tw, **_: _output(x, w))
adjoint_p.def_abstract_eval(
    lambda x, w, u, **_: (ShapedArray(x.shape, x.dtype), ShapedArray(w.shape, w.dtype))
)
contract_p.def_abstract_eval(
    lambda p, q, x, w, *, slot, **_: ShapedArray(
        rules.contract_shape(slot, x.shape, w.shape), x.dtype
    )
)


# --- autodiff rules ---------------------------------------------------------------


def _nonzero(t):
    """A tangent or cotangent, None for jax's symbolic zero."""
    return None if type(t) is ad.Zero else t


def _zeros_where_none(values, likes):
    return [
        jnp.zeros_like(o) if v is None else v
        for v, o in zip(values, likes, strict=True)
    ]


def _algebra(x, w, kernel, chunk) -> rules.Algebra:
    params = {"kernel": kernel, "chunk": chunk}

    def contract(slot, power, a=None, b=None, c=None):
        given = {"a": a, "b": b, "c": c}
        filled = [given[s] for s in rules.operand_slots(slot)]
        return contract_p.bind(*filled, x, w, slot=slot, power=power, **params)

    return rules.Algebra(
        x,
        w,
        contract=contract,
        adjoint=lambda u: tuple(adjoint_p.bind(x, w, u, **params)),
        tangent=lambda tx, tw: tangent_p.bind(x, w, tx, tw, **params),
    )


def _linear_only(primitive, x, w):
    if ad.is_undefined_primal(x) or ad.is_undefined_primal(w):
        raise ValueError(f"{primitive.name} is not linear in x and the kernel")


def _forward_jvp(primals, tangents, **params):
    x, w = primals
    s = forward_p.bind(x, w, **params)
    # Both tangents, zeros included: the transpose is then the fused adjoint.
    tx, tw = (ad.instantiate_zeros(t) for t in tangents)
    return s, tangent_p.bind(x, w, tx, tw, **params)


def _tangent_jvp(primals, tangents, *, kernel, chunk):
    x, w, tx, tw = primals
    out = tangent_p.bind(*primals, kernel=kernel, chunk=chunk)
    d = _algebra(x, w, kernel, chunk).tangent_jvp(
        tx, tw, *(_nonzero(t) for t in tangents)
    )
    return out, _zeros_where_none([d], [out])[0]


def _tangent_transpose(ct, x, w, tx, tw, **params):
    _linear_only(tangent_p, x, w)
    ct = _nonzero(ct)
    if ct is None:
        return [None] * 4
    d_x, d_w = adjoint_p.bind(x, w, ct, **params)
    return [
        None,
        None,
        d_x if ad.is_undefined_primal(tx) else None,
        d_w if ad.is_undefined_primal(tw) else None,
    ]


def _adjoint_jvp(primals, tangents, *, kernel, chunk):
    x, w, u = primals
    outs = adjoint_p.bind(*primals, kernel=kernel, chunk=chunk)
    d = _algebra(x, w, kernel, chunk).adjoint_jvp(u, *(_nonzero(t) for t in tangents))
    return outs, _zeros_where_none(d, outs)


def _adjoint_transpose(cts, x, w, u, *, kernel, chunk):
    _linear_only(adjoint_p, x, w)
    c_dx, c_dw = (_nonzero(c) for c in cts)
    return [None, None, _algebra(x, w, kernel, chunk).tangent(c_dx, c_dw)]


def _contract_jvp(primals, tangents, *, slot, power, kernel, chunk):
    names = rules.operand_slots(slot)
    *filled, x, w = primals
    *t_filled, tx, tw = (_nonzero(t) for t in tangents)
    out = contract_p.bind(*primals, slot=slot, power=power, kernel=kernel, chunk=chunk)
    d = _algebra(x, w, kernel, chunk).contract_jvp(
        slot,
        power,
        dict(zip(names, filled, strict=True)),
        dict(zip(names, t_filled, strict=True)),
        tx,
        tw,
    )
    return out, _zeros_where_none([d], [out])[0]


def _contract_transpose(ct, *args, slot, power, kernel, chunk):
    names = rules.operand_slots(slot)
    *filled, x, w = args
    _linear_only(contract_p, x, w)
    ct = _nonzero(ct)
    alg = _algebra(x, w, kernel, chunk)
    out = []
    for i, name in enumerate(names):
        if not ad.is_undefined_primal(filled[i]) or ct is None:
            out.append(None)
            continue
        out.append(alg.contract(name, power, **{names[1 - i]: filled[1 - i], slot: ct}))
    return [*out, None, None]


ad.primitive_jvps[forward_p] = _forward_jvp
ad.primitive_jvps[tangent_p] = _tangent_jvp
ad.primitive_transposes[tangent_p] = _tangent_transpose
ad.primitive_jvps[adjoint_p] = _adjoint_jvp
ad.primitive_transposes[adjoint_p] = _adjoint_transpose
ad.primitive_jvps[contract_p] = _contract_jvp
ad.primitive_transposes[contract_p] = _contract_transpose


# --- batching ---------------------------------------------------------------------

#: Which operands of each primitive are per sample (leading batch axis) and
#: which are weights ("w"): the batching rules fold a mapped batch of samples
#: into the batch when no weight operand is mapped. None: never folded.
_SAMPLE, _WEIGHT = "s", "w"
_KINDS = {
    forward_p: (_SAMPLE, _WEIGHT),
    tangent_p: (_SAMPLE, _WEIGHT, _SAMPLE, _WEIGHT),
    adjoint_p: None,
}
_CONTRACT_KINDS = {
    "a": (_WEIGHT, _SAMPLE, _SAMPLE, _WEIGHT),  # b, c, x, W
    "b": None,  # sums over the batch: per mapped slice
    "c": (_SAMPLE, _WEIGHT, _SAMPLE, _WEIGHT),  # a, b, x, W
}


def _batch(primitive, args, dims, **params):
    """vmap: fold the mapped axis into the batch where only per-sample operands
    are mapped; else one primitive call per slice."""
    if primitive is contract_p:
        kinds = _CONTRACT_KINDS[params["slot"]]
    else:
        kinds = _KINDS[primitive]
    not_mapped = None  # (batching.not_mapped, where jax exports it)
    foldable = kinds is not None and all(
        d is not_mapped for k, d in zip(kinds, dims, strict=True) if k == _WEIGHT
    )
    if not foldable:
        return _batch_map(primitive, args, dims, params)
    size = next(
        a.shape[d] for a, d in zip(args, dims, strict=True) if d is not not_mapped
    )
    folded = []
    batch = None
    for a, d, k in zip(args, dims, kinds, strict=True):
        if k == _WEIGHT:
            folded.append(a)
            continue
        a = (
            jnp.moveaxis(a, d, 0)
            if d is not not_mapped
            else jnp.broadcast_to(a, (size, *a.shape))
        )
        batch = a.shape[1]
        folded.append(a.reshape(size * batch, *a.shape[2:]))
    out = primitive.bind(*folded, **params)
    return out.reshape(size, batch, *out.shape[1:]), 0


def _batch_map(primitive, args, dims, params):
    """vmap by `lax.map`: one call of the primitive per mapped slice."""
    not_mapped = None  # (batching.not_mapped, where jax exports it)
    mapped = [
        jnp.moveaxis(a, d, 0)
        for a, d in zip(args, dims, strict=True)
        if d is not not_mapped
    ]

    def one(slices):
        it = iter(slices)
        call_args = [
            a if d is not_mapped else next(it) for a, d in zip(args, dims, strict=True)
        ]
        return primitive.bind(*call_args, **params)

    out = jax.lax.map(one, mapped)
    if primitive.multiple_results:
        return out, [0] * len(out)
    return out, 0


for _primitive in _OPERATIONS:
    batching.primitive_batchers[_primitive] = functools.partial(_batch, _primitive)
