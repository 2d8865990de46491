"""The implementations of `log_inhibition` under tensorflow, in "auto"'s order.

    cpu   the C loops as numpy functions (float32, CPU; eager calls and
          graphs a gradient tape records)                     cpu.py
    ops   the keras.ops reference (every device and graph)    reference.py

Each module says why it does not apply (`not_supported_reasons`, a list)
and computes s with `gradients`' custom gradients, which give every
derivative (`kernels.rules`).
"""

from keras_synann.kernels import devices

#: "auto"'s order of preference.
PRIORITY = ("cpu", "ops")
#: Implementation name -> its module in this package.
MODULES = {"cpu": "cpu", "ops": "reference"}


def context(x, kernel) -> tuple:
    """What the choice depends on besides shapes and dtypes."""
    return (devices.tensorflow_context(x, kernel), devices.tensorflow_on_cpu())


def load(name: str):
    """The module of implementation `name` (ImportError where it needs a package
    that is missing)."""
    # (import statements, not importlib: torch's compiler follows them)
    if name == "cpu":
        from keras_synann.kernels.tensorflow import cpu as module
    elif name == "ops":
        from keras_synann.kernels.tensorflow import reference as module
    else:
        raise KeyError(name)
    return module


def compiling() -> bool:
    """Never: only torch's compiler traces Python code such as the dispatch."""
    return False
