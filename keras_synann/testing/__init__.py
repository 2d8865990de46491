"""Helpers for tests and benchmarks, with no dependency on the code they check.

references     float64 NumPy statements of the paper's formulas
autodiff       value_and_grad, the backend's own
layer_test     run_layer_test: a layer through public Keras APIs only
derivatives    check_derivatives: every derivative transform of the
               backend against the plain formula in float64
transforms     each backend's transforms, as `check_derivatives` runs them
"""

from keras_synann.testing.autodiff import value_and_grad
from keras_synann.testing.derivatives import (
    TRANSFORMS,
    check_derivatives,
    derivative_inputs,
    synapse_derivatives,
)
from keras_synann.testing.layer_test import run_layer_test
from keras_synann.testing.references import (
    numpy_log_inhibition,
    numpy_reference_code_synapse,
    numpy_series_log_inhibition,
    numpy_series_log_inhibition_grads,
    numpy_synapse_graph,
    numpy_synapse_graph_grads,
)

__all__ = [
    "TRANSFORMS",
    "check_derivatives",
    "derivative_inputs",
    "numpy_log_inhibition",
    "numpy_reference_code_synapse",
    "numpy_series_log_inhibition",
    "numpy_series_log_inhibition_grads",
    "numpy_synapse_graph",
    "numpy_synapse_graph_grads",
    "run_layer_test",
    "synapse_derivatives",
    "value_and_grad",
]
