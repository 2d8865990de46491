"""keras_synann: the Synaptic Neural Network (SynaNN) for Keras 3.

Public API:
    Synapse             the fully connected synapse graph layer
    ValueRange          the clipping constraint Synapse uses for beta
    SynapseUniform      the initializer Synapse uses for beta (uniform in [0, 0.01))
    load_legacy_model   load a tf.keras .h5 model saved with the reference layer
    load_legacy_weights load such a file's weights into a Keras 3 model
    load_reference_state_dict  load the reference PyTorch module's weight
                        (a state_dict or .pth file) into a Synapse layer
    synacnn, lenet, mlp the reference MNIST models (get_model(name), MODELS)
    ops                 the math on keras.ops tensors (synapse, synapse_graph,
                        log_inhibition, log_inhibition_series,
                        series_error_bound, surprisal helpers)
"""

from keras_synann import ops
from keras_synann.layers import Synapse, SynapseUniform, ValueRange
from keras_synann.legacy import (
    load_legacy_model,
    load_legacy_weights,
    load_reference_state_dict,
)
from keras_synann.models import MODELS, get_model, lenet, mlp, synacnn

__version__ = "0.1.0"

__all__ = [
    "MODELS",
    "Synapse",
    "SynapseUniform",
    "ValueRange",
    "load_legacy_model",
    "load_legacy_weights",
    "load_reference_state_dict",
    "get_model",
    "lenet",
    "mlp",
    "ops",
    "synacnn",
    "__version__",
]
