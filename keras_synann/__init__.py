"""keras_synann: the Synaptic Neural Network (SynaNN) for Keras 3.

Public API:
    Synapse             the fully connected synapse graph layer
    ValueRange          the clipping constraint Synapse uses for beta
    ops                 the math on keras.ops tensors (synapse, synapse_graph,
                        log_inhibition, surprisal helpers)
"""

from keras_synann import ops
from keras_synann.layers import Synapse, ValueRange

__version__ = "0.1.0"

__all__ = ["Synapse", "ValueRange", "ops", "__version__"]
