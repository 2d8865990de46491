"""keras_synann: the Synaptic Neural Network (SynaNN) for Keras 3.

Public API:
    Synapse             the fully connected synapse graph layer
    ValueRange          the clipping constraint Synapse uses for beta
    load_legacy_model   load a tf.keras .h5 model saved with the reference layer
    load_legacy_weights load such a file's weights into a Keras 3 model
    synacnn, lenet, mlp the reference MNIST models (get_model(name), MODELS)
    ops                 the math on keras.ops tensors (synapse, synapse_graph,
                        log_inhibition, log_inhibition_series,
                        series_error_bound, surprisal helpers)
"""

from keras_synann import ops
from keras_synann.layers import Synapse, ValueRange
from keras_synann.legacy import load_legacy_model, load_legacy_weights
from keras_synann.models import MODELS, get_model, lenet, mlp, synacnn

__version__ = "0.1.0"

__all__ = [
    "MODELS",
    "Synapse",
    "ValueRange",
    "load_legacy_model",
    "load_legacy_weights",
    "get_model",
    "lenet",
    "mlp",
    "ops",
    "synacnn",
    "__version__",
]
