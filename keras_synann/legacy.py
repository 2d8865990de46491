"""Reading models saved by tf.keras (Keras 2) with the reference Synapse layer.

The reference layer was saved as class `Synapse` with config key `output_dim`
and an (n, n) kernel: `keras_synann.Synapse` accepts both, so a legacy `.h5`
file loads into Keras 3 on any backend:

    model = keras_synann.load_legacy_model("synann_mnist.h5")

or, for its weights only, into a Keras 3 model of the same architecture:

    keras_synann.load_legacy_weights(model, "synann_weights.h5")

The reference PyTorch script saves `model.state_dict()` to a `.pth` file; its
Synapse module keeps `weight` of shape (out_features, in_features) with
beta_ij = weight[i, j], the transpose of this layer's kernel.
`load_reference_state_dict` puts it into a `Synapse` layer:

    keras_synann.load_reference_state_dict(layer, "model.pth")

Note: the reference code mixed the samples of a batch (see docs/layer.md); the
loaded model computes the paper's per-sample formula, so its predictions
equal the reference's at batch size 1.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import keras
import numpy as np

from keras_synann.layers import Synapse


def _check_h5(path) -> str:
    path = os.fspath(path)
    if not path.endswith((".h5", ".hdf5")):
        raise ValueError(
            "Expected a legacy HDF5 file ending in .h5 or .hdf5 "
            f"(use keras.saving.load_model for .keras files). Received: {path}"
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"No such legacy model file: {path}")
    return path


def load_legacy_model(path, custom_objects: dict | None = None, compile: bool = False):
    """Load a tf.keras `.h5` model that uses the reference `Synapse` layer.

    Args:
        path: the `.h5` file.
        custom_objects: more custom classes the file needs, by name.
        compile: also restore the training configuration (optimizer, loss).

    Returns:
        A Keras 3 model whose Synapse layers are `keras_synann.Synapse`.
    """
    objects = {"Synapse": Synapse, **(custom_objects or {})}
    return keras.saving.load_model(
        _check_h5(path), custom_objects=objects, compile=compile
    )


def load_legacy_weights(model, path) -> None:
    """Load the weights of a tf.keras `.h5` file (model or weights file) into `model`.

    `model` must have the file's architecture, built with `keras_synann.Synapse`
    where the reference used its `Synapse` layer.
    """
    model.load_weights(_check_h5(path))


def _read_state_dict(source) -> Mapping:
    if isinstance(source, Mapping):
        return source
    path = os.fspath(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No such state_dict file: {path}")
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"Reading {path} needs torch (pip install torch), or pass the "
            "state_dict as a mapping of NumPy arrays"
        ) from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state_dict")
    return state


def _as_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def load_reference_state_dict(layer, source, key: str | None = None) -> None:
    """Load the reference PyTorch Synapse module's weight into a `Synapse` layer.

    Args:
        layer: a `keras_synann.Synapse` (built or not; an unbuilt layer is
            built for the weight's size).
        source: a `.pth` file written by `torch.save(model.state_dict(), ...)`
            (reading it needs torch), or the state_dict itself (a mapping of
            names to tensors or arrays).
        key: the weight's name in the state_dict, such as `"fcn.weight"` in
            the reference script's net. Default: its only square 2-D
            `weight` (the Synapse module's; its Linear layers are not square).

    The module's `weight[i, j]` is beta_ij; the layer's kernel is its
    transpose. The module's `bias` is not used by its forward pass and is
    ignored. The loaded layer computes the paper's per-sample formula, which
    equals the reference's output at batch size 1 (docs/layer.md).
    """
    if not isinstance(layer, Synapse):
        raise TypeError(f"Expected a keras_synann.Synapse layer, got {layer!r}")
    state = _read_state_dict(source)
    if key is None:
        square = [
            name
            for name, value in state.items()
            if name.rsplit(".", 1)[-1] == "weight"
            and _as_numpy(value).ndim == 2
            and _as_numpy(value).shape[0] == _as_numpy(value).shape[1]
        ]
        if len(square) != 1:
            raise ValueError(
                "Pass `key`, the Synapse module's weight name: the state_dict has "
                f"{len(square)} square 2-D weights ({', '.join(square) or 'none'})"
            )
        (key,) = square
    if key not in state:
        raise KeyError(f"{key!r} is not in the state_dict ({', '.join(state)})")
    weight = _as_numpy(state[key]).astype("float32")
    n = weight.shape[0]
    if weight.ndim != 2 or weight.shape != (n, n):
        raise ValueError(
            f"{key} has shape {weight.shape}; a Synapse weight is square (n, n)"
        )
    if not layer.built:
        layer.build((None, n))
    if tuple(layer.kernel.shape) != (n, n):
        raise ValueError(
            f"{key} is ({n}, {n}); the layer's kernel is {tuple(layer.kernel.shape)}"
        )
    layer.kernel.assign(weight.T)
