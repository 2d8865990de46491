"""`log_inhibition` as jax primitives, differentiable to every order.

    s = forward(x, W)                 (batch, n_in), (n_in, n_out) -> (batch, n_out)
    (dx, dW) = adjoint(x, W, u)       the vjp of sum(u * s)
    ds = tangent(x, W, tx, tW)        the jvp of s along (tx, tW)
    contract(..., slot, power)        the family every higher derivative is
                                      made of (`kernels.rules`)

`define` makes the forward, adjoint, tangent and contract primitives of one
implementation. Each primitive has (the pattern of
jax's FFI guide and jax-finufft):

- a JVP rule, written with these primitives (`rules.Algebra`): so `jax.jvp`,
  `jacfwd`, `hessian` and forward-over-reverse work, and reverse mode comes
  from transposing the tangent;
- a transpose rule for its linear operands: `tangent` transposes to the
  implementation's fused `adjoint` (so `jax.grad` runs one fused kernel
  forward and one backward), `adjoint` to `tangent`, `contract` to
  `contract`;
- a batching rule: a mapped batch of samples with shared weights folds into
  the batch; anything else (per-sample weight gradients, `vmap(grad)`) maps
  one slice at a time with `lax.map`;
- lowerings: `forward` and `adjoint` to the implementation's kernel per
  platform (the C loops as an XLA FFI call on a CPU, Pallas on a GPU), and to
  the keras.ops reference (`kernels.reference`) on every other platform and
  whenever the module is lowered for export (`jax.export`, jax2tf, Keras's
  `model.export`); `contract` likewise where the implementation has one;
  `tangent` to the reference always.

So `jax.jit` runs the kernel while a serialized module holds only standard
ops. Eager calls run a jitted bind. When jax2onnx is imported, every
primitive gets a jax2onnx plugin that converts it as the reference
(`kernels.jax.onnx`).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from keras_synann.kernels import reference, rules

#: A kernel's forward f(x, kernel, **params) -> s and adjoint
#: b(x, kernel, u, **params) -> (dx, dkernel) (and optionally its contract),
#: traceable by jax.
Pair = tuple[Callable, ...]

#: Which operands of each primitive are per sample (leading batch axis) and
#: which are weights ("w"): the batching rules fold a mapped batch of samples
#: into the batch when no weight operand is mapped.
_SAMPLE, _WEIGHT = "s", "w"


def _zero(t):
    return None if type(t) is ad.Zero else t


def _ct(t):
    return None if type(t) is ad.Zero else t


@functools.cache
def _jitted(primitive: Primitive, params: tuple):
    return jax.jit(lambda *args: primitive.bind(*args, **dict(params)))


def _jitted_bind(primitive: Primitive, *args, **params):
    """An eager call: the primitive alone, compiled (its lowering is per platform)."""
    return _jitted(primitive, tuple(sorted(params.items())))(*args)


# --- contract: one primitive per implementation -----------------------------------


def _contract_operands(slot: str) -> tuple[str, ...]:
    return tuple(s for s in rules.SLOTS if s != slot)


def _contract_abstract(*args, slot, power, chunk, **_):
    del power, chunk
    x, kernel = args[-2], args[-1]
    shape = {
        "a": (x.shape[0], kernel.shape[0]),
        "b": kernel.shape,
        "c": (x.shape[0], kernel.shape[1]),
    }[slot]
    return ShapedArray(shape, x.dtype)


def _reference_contract(*args, slot, power, chunk, **_):
    operands = dict(zip(_contract_operands(slot), args[:2], strict=True))
    return reference.contract(
        slot, power, operands.get("a"), operands.get("b"), operands.get("c"),
        args[2], args[3], chunk,
    )  # fmt: skip


def _bind_contract(contract_p, params, x, kernel):
    """contract(slot, power, a, b, c) through `contract_p` (operand of slot None)."""
    extra = {k: v for k, v in params.items() if k not in ("slot", "power")}

    def bind(slot, power, a=None, b=None, c=None):
        operands = {"a": a, "b": b, "c": c}
        filled = [operands[s] for s in _contract_operands(slot)]
        return contract_p.bind(*filled, x, kernel, slot=slot, power=power, **extra)

    return bind


def _contract_algebra(contract_p, params, x, kernel) -> rules.Algebra:
    """An algebra of contractions alone (for `contract`'s own rules)."""
    bind = _bind_contract(contract_p, params, x, kernel)
    return rules.Algebra(
        x,
        kernel,
        contract=bind,
        adjoint=lambda u: (-bind("a", 1, None, kernel, u), -bind("b", 1, x, None, u)),
        tangent=lambda tx, tw: -(bind("c", 1, x, tw) + bind("c", 1, tx, kernel)),
    )


def _define_contract(name: str, fast: Mapping[str, Callable]) -> Primitive:
    """The `{name}_contract` primitive: per-platform `fast` lowerings (unless
    exporting), the reference elsewhere, and its JVP, transpose and batching."""
    contract_p = Primitive(f"{name}_contract")
    contract_p.def_impl(functools.partial(_jitted_bind, contract_p))
    contract_p.def_abstract_eval(_contract_abstract)
    reference_rule = mlir.lower_fun(_reference_contract, multiple_results=False)
    mlir.register_lowering(contract_p, reference_rule)
    for platform, fn in fast.items():
        mlir.register_lowering(
            contract_p,
            _unless_exporting(mlir.lower_fun(fn, False), reference_rule),
            platform=platform,
        )

    def jvp(primals, tangents, *, slot, power, **params):
        names = _contract_operands(slot)
        *filled, x, kernel = primals
        *t_filled, tx, tw = (_zero(t) for t in tangents)
        out = contract_p.bind(*primals, slot=slot, power=power, **params)
        alg = _contract_algebra(contract_p, params, x, kernel)
        d = alg.contract_jvp(
            slot,
            power,
            dict(zip(names, filled, strict=True)),
            dict(zip(names, t_filled, strict=True)),
            tx,
            tw,
        )
        return out, (jnp.zeros_like(out) if d is None else d)

    def transpose(ct, *args, slot, power, **params):
        names = _contract_operands(slot)
        *filled, x, kernel = args
        if ad.is_undefined_primal(x) or ad.is_undefined_primal(kernel):
            raise ValueError(f"{contract_p.name} is linear in its operands only")
        ct = _ct(ct)
        bind = _bind_contract(contract_p, params, x, kernel)
        out = []
        for i, operand in enumerate(names):
            if not ad.is_undefined_primal(filled[i]) or ct is None:
                out.append(None)
                continue
            other = names[1 - i]
            out.append(bind(operand, power, **{other: filled[1 - i], slot: ct}))
        return [*out, None, None]

    def batch(args, dims, *, slot, power, **params):
        kinds = {
            "a": (_WEIGHT, _SAMPLE, _SAMPLE, _WEIGHT),  # b, c, x, W
            "b": None,  # sums over the batch: per mapped slice
            "c": (_SAMPLE, _WEIGHT, _SAMPLE, _WEIGHT),  # a, b, x, W
        }[slot]
        return _batch(
            contract_p, kinds, args, dims, {"slot": slot, "power": power, **params}
        )

    ad.primitive_jvps[contract_p] = jvp
    ad.primitive_transposes[contract_p] = transpose
    batching.primitive_batchers[contract_p] = batch
    return contract_p


# --- one implementation's forward, adjoint and tangent ---------------------------


def define(name: str, kernels: Mapping[str, Pair]) -> Callable:
    """`f(x, kernel, **params) -> s`, differentiable to every order.

    Args:
        name: the primitives are `{name}_forward`, `{name}_adjoint` and
            `{name}_tangent`.
        kernels: platform ("cpu", "cuda", "rocm") -> (forward, adjoint) or
            (forward, adjoint, contract), contract(p, q, x, kernel, slot=,
            power=, **params) computing `reference.contract` with p, q the
            operands not left out. Each is called with the primitive's
            params as keywords; `chunk`
            (input units per log, <= n_in) is always among them, since the
            reference needs it.

    Returns:
        f(x, kernel, **params); params must be hashable.
    """
    contract_p = _define_contract(
        name, {k: v[2] for k, v in kernels.items() if len(v) > 2}
    )
    forward = Primitive(f"{name}_forward")
    adjoint = Primitive(f"{name}_adjoint")
    adjoint.multiple_results = True
    tangent = Primitive(f"{name}_tangent")
    for primitive in (forward, adjoint, tangent):
        primitive.def_impl(functools.partial(_jitted_bind, primitive))
    forward.def_abstract_eval(
        lambda x, kernel, **_: ShapedArray((x.shape[0], kernel.shape[1]), x.dtype)
    )
    tangent.def_abstract_eval(
        lambda x, kernel, tx, tw, **_: ShapedArray(
            (x.shape[0], kernel.shape[1]), x.dtype
        )
    )
    adjoint.def_abstract_eval(
        lambda x, kernel, u, **_: (
            ShapedArray(x.shape, x.dtype),
            ShapedArray(kernel.shape, kernel.dtype),
        )
    )
    reference_forward = mlir.lower_fun(_reference_forward, multiple_results=False)
    reference_adjoint = mlir.lower_fun(_reference_adjoint, multiple_results=True)
    mlir.register_lowering(forward, reference_forward)
    mlir.register_lowering(adjoint, reference_adjoint)
    mlir.register_lowering(
        tangent, mlir.lower_fun(_reference_tangent, multiple_results=False)
    )
    for platform, (fast_forward, fast_adjoint, *_) in kernels.items():
        mlir.register_lowering(
            forward,
            _unless_exporting(mlir.lower_fun(fast_forward, False), reference_forward),
            platform=platform,
        )
        mlir.register_lowering(
            adjoint,
            _unless_exporting(mlir.lower_fun(fast_adjoint, True), reference_adjoint),
            platform=platform,
        )

    def algebra(x, kernel, params) -> rules.Algebra:
        return rules.Algebra(
            x,
            kernel,
            contract=_bind_contract(contract_p, params, x, kernel),
            adjoint=lambda u: tuple(adjoint.bind(x, kernel, u, **params)),
            tangent=lambda tx, tw: tangent.bind(x, kernel, tx, tw, **params),
        )

    def forward_jvp(primals, tangents, **params):
        x, kernel = primals
        s = forward.bind(x, kernel, **params)
        # Both tangents, zeros included: the transpose is then the fused adjoint.
        tx, tw = (ad.instantiate_zeros(t) for t in tangents)
        return s, tangent.bind(x, kernel, tx, tw, **params)

    def tangent_jvp(primals, tangents, **params):
        x, kernel, tx, tw = primals
        out = tangent.bind(*primals, **params)
        d = algebra(x, kernel, params).tangent_jvp(
            tx, tw, *(_zero(t) for t in tangents)
        )
        return out, (jnp.zeros_like(out) if d is None else d)

    def tangent_transpose(ct, x, kernel, tx, tw, **params):
        if ad.is_undefined_primal(x) or ad.is_undefined_primal(kernel):
            raise ValueError(f"{tangent.name} is linear in its tangents only")
        ct = _ct(ct)
        if ct is None:
            return [None] * 4
        d_x, d_w = adjoint.bind(x, kernel, ct, **params)
        return [
            None,
            None,
            d_x if ad.is_undefined_primal(tx) else None,
            d_w if ad.is_undefined_primal(tw) else None,
        ]

    def adjoint_jvp(primals, tangents, **params):
        x, kernel, u = primals
        outs = adjoint.bind(*primals, **params)
        d = algebra(x, kernel, params).adjoint_jvp(u, *(_zero(t) for t in tangents))
        return outs, [
            jnp.zeros_like(o) if t is None else t for o, t in zip(outs, d, strict=True)
        ]

    def adjoint_transpose(cts, x, kernel, u, **params):
        if ad.is_undefined_primal(x) or ad.is_undefined_primal(kernel):
            raise ValueError(f"{adjoint.name} is linear in its upstream only")
        c_dx, c_dw = (_ct(c) for c in cts)
        u_bar = algebra(x, kernel, params).tangent(c_dx, c_dw)
        return [None, None, u_bar]

    ad.primitive_jvps[forward] = forward_jvp
    ad.primitive_jvps[tangent] = tangent_jvp
    ad.primitive_transposes[tangent] = tangent_transpose
    ad.primitive_jvps[adjoint] = adjoint_jvp
    ad.primitive_transposes[adjoint] = adjoint_transpose
    batching.primitive_batchers[forward] = functools.partial(
        _batch_rule, forward, (_SAMPLE, _WEIGHT)
    )
    batching.primitive_batchers[tangent] = functools.partial(
        _batch_rule, tangent, (_SAMPLE, _WEIGHT, _SAMPLE, _WEIGHT)
    )
    batching.primitive_batchers[adjoint] = functools.partial(_batch_rule, adjoint, None)

    def log_inhibition(x, kernel, **params):
        if "jax2onnx" in sys.modules:  # Keras's model.export(format="onnx")
            from keras_synann.kernels.jax import onnx

            onnx.register(forward.name, _reference_forward)
            onnx.register(adjoint.name, _reference_adjoint)
            onnx.register(tangent.name, _reference_tangent)
            onnx.register(contract_p.name, _reference_contract)
        return forward.bind(x, kernel, **params)

    return log_inhibition


def _reference_forward(x, kernel, *, chunk, **_):
    return reference.forward(x, kernel, chunk)


def _reference_adjoint(x, kernel, u, *, chunk, **_):
    return list(reference.backward(x, kernel, u, chunk))


def _reference_tangent(x, kernel, tx, tw, *, chunk, **_):
    return reference.tangent(x, kernel, tx, tw, chunk)


def _unless_exporting(rule, reference_rule):
    """`rule`, except where the module is lowered for export: `reference_rule`."""

    def lowering(ctx, *args, **params):
        if ctx.module_context.lowering_parameters.for_export:
            return reference_rule(ctx, *args, **params)
        return rule(ctx, *args, **params)

    return lowering


# --- batching ------------------------------------------------------------------


def _batch_rule(primitive, kinds, args, dims, **params):
    return _batch(primitive, kinds, args, dims, params)


def _batch(primitive, kinds, args, dims, params):
    """vmap: fold the mapped axis into the batch where only per-sample operands
    are mapped (`kinds` says which are); else one primitive call per slice."""
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
