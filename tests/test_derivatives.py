"""Derivatives of every order through Synapse, on the active backend.

Each implementation that can run here (the fused GPU kernels in their
interpreters) against float64 references that share no code with it:

- `keras_synann.testing.check_derivatives`: every transform of the backend
  (gradient penalties, Hessian-vector products reverse over reverse and
  forward over reverse, a third order, forward mode, Jacobians, vectorising
  maps, per-sample gradients) against the same transform of the plain
  formula in float64, eagerly and compiled (jax.jit, tf.function,
  torch.compile), with the layer's variants;
- NumPy closed forms: the first-order gradient and a Hessian-vector product
  (central differences of the closed-form gradient, in float64), which
  involve no autodiff at all.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops

from keras_synann import kernels
from keras_synann import ops as synann_ops
from keras_synann.testing import (
    TRANSFORMS,
    check_derivatives,
    derivative_inputs,
    numpy_synapse_graph,
    numpy_synapse_graph_grads,
    synapse_derivatives,
    value_and_grad,
)

BACKEND = keras.backend.backend()
#: Implementations under this backend; the GPU kernels in their interpreters.
NAMES = kernels.priority(BACKEND)


def _require(implementation):
    """Skips where `implementation` cannot run on this machine (with the
    reasons); the C loops ("cpu") must run here."""
    x, kernel = (ops.convert_to_tensor(a, "float32") for a in derivative_inputs()[:2])
    reasons = kernels.not_supported_reasons(implementation, x, kernel)
    assert implementation != "cpu" or not reasons, reasons
    if reasons:
        pytest.skip(f"implementation={implementation!r}: {'; '.join(reasons)}")


@pytest.mark.parametrize("implementation", NAMES)
def test_every_transform_of_every_implementation(implementation):
    _require(implementation)
    errors = check_derivatives(implementation)
    assert set(errors) == set(TRANSFORMS[BACKEND])


#: torch.compile refuses double backward for any function (AOTAutograd: "does
#: not currently support double backward"; with donated buffers it says
#: create_graph must be False): these raise inside it, for plain torch too.
_TORCH_COMPILE_REFUSES = {"gradient_penalty", "hvp", "third_order"}


@pytest.mark.slow
@pytest.mark.parametrize("transform", TRANSFORMS[BACKEND])
def test_every_transform_compiled(transform):
    """Inside jax.jit, tf.function or torch.compile, with "auto"."""
    if BACKEND == "torch" and transform in _TORCH_COMPILE_REFUSES:
        with pytest.raises(RuntimeError, match="double backward|create_graph"):
            check_derivatives("auto", compiled=True, transforms=(transform,))
        return
    check_derivatives("auto", compiled=True, transforms=(transform,))


_CORE = ("grad", "gradient_penalty", "hvp", "jvp", "forward_over_reverse_hvp", "vmap")


@pytest.mark.parametrize(
    "variant",
    [
        {"use_alpha": True},
        {"zero_diagonal": True},
        {"series_order": 3},
        {"floored": True},
    ],
    ids=lambda v: next(iter(v)),
)
def test_variants(variant):
    check_derivatives("auto", transforms=_CORE, **variant)


def test_mixed_precision_inputs():
    """float16 inputs, float32 accumulation: the float16 casts bound the error."""
    errors = check_derivatives(
        "auto", input_dtype="float16", transforms=_CORE, rtol=1e-2
    )
    assert max(errors.values()) < 1e-2


def test_floored_factors_pass_no_gradient():
    """Where 1 - beta x is floored the factor is the constant 1e-6: every
    derivative through it is 0, as the plain formula with max() defines."""
    x, kernel, *_ = derivative_inputs(floored=True)
    x, kernel = x.astype("float32"), kernel.astype("float32")

    def loss(x, kernel):
        return ops.sum(synann_ops.log_inhibition(x, kernel)[0, 1:3])

    _, (_, d_kernel) = value_and_grad(loss)(x, kernel)
    d_kernel = ops.convert_to_numpy(d_kernel)
    # Rows 0 and 1 of columns 1, 2 meet x = 1 in sample 0: floored factors.
    np.testing.assert_array_equal(d_kernel[:2, 1:3], 0.0)
    assert np.all(d_kernel[2:, 1:3] != 0.0)


@pytest.mark.parametrize("implementation", NAMES)
def test_gradient_and_hessian_vector_product_against_numpy_closed_forms(implementation):
    """For L = sum(y ** 2): the closed-form gradient (float64 NumPy), and
    central differences of it along v for d/dx <dL/dx, v>: no autodiff at
    all on the reference side."""
    _require(implementation)
    x, kernel, _, vx, vw = derivative_inputs(batch=4, n=7, seed=3)

    def closed_form(x):
        return numpy_synapse_graph_grads(
            x, kernel, 2.0 * numpy_synapse_graph(x, kernel)
        )

    eps = 1e-5
    hvp = (closed_form(x + eps * vx)[0] - closed_form(x - eps * vx)[0]) / (2 * eps)
    ours = synapse_derivatives(implementation, ("grad", "hvp"), (x, kernel, vx, vw))
    for got, want in zip(
        (*ours["grad"], *ours["hvp"]), (*closed_form(x), hvp), strict=True
    ):
        assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))


def test_gradient_penalty_example_trains():
    """examples/gradient_penalty.py, as a user runs it, on this backend."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, str(root / "examples" / "gradient_penalty.py")],
        capture_output=True,
        text=True,
        timeout=600,
        env={
            **os.environ,
            "KERAS_BACKEND": BACKEND,
            "PYTHONPATH": str(root),
        },
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = re.search(r"gradient penalty ([0-9.]+) -> ([0-9.]+)", result.stdout)
    assert found, result.stdout
    first, last = map(float, found.groups())
    assert last < 0.8 * first
