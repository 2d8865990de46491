"""The implementations of `log_inhibition` under jax, in "auto"'s order.

    pallas   fused Pallas kernels (float32, a single GPU)         pallas.py
    cpu      the C loops as XLA FFI calls (float32, one CPU)      cpu.py
    ops      the keras.ops reference (every device)               reference.py

Each is a set of jax primitives (`primitives`) with JVP, transpose and
batching rules, lowered to the keras.ops reference wherever a module is
exported, so every jax transformation and exporter applies to all of them.
Each module says why it does not apply (`not_supported_reasons`, a list).
"""

from keras_synann.kernels import devices

#: "auto"'s order of preference.
PRIORITY = ("pallas", "cpu", "ops")
#: Implementation name -> its module in this package.
MODULES = {"pallas": "pallas", "cpu": "cpu", "ops": "reference"}


def context(x, kernel) -> tuple:
    """What the choice depends on besides shapes and dtypes."""
    del x, kernel
    return devices.jax_devices()


def load(name: str):
    """The module of implementation `name` (ImportError where it needs a package
    that is missing)."""
    # (import statements, not importlib: torch's compiler follows them)
    if name == "pallas":
        from keras_synann.kernels.jax import pallas as module
    elif name == "cpu":
        from keras_synann.kernels.jax import cpu as module
    elif name == "ops":
        from keras_synann.kernels.jax import reference as module
    else:
        raise KeyError(name)
    return module


def compiling() -> bool:
    """Never: only torch's compiler traces Python code such as the dispatch."""
    return False
