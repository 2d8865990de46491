"""The implementations of `log_inhibition` under torch, in "auto"'s order.

    triton     fused Triton kernels (float32 CUDA tensors)      triton.py
    cpu        the C loops through ctypes (float32 CPU tensors) cpu.py
    torch      eager torch with reused buffers                  eager.py
    ops        the keras.ops reference (every device, tracer)   reference.py

Each module says why it does not apply (`not_supported_reasons`, a list)
and computes s with `functions`' autograd Functions, which give every
derivative (`kernels.rules`). No implementation applies under a tracer but
"ops": torch.jit.trace, torch.compile, torch.export and torch.onnx record
torch operations only.
"""

from keras_synann.kernels import devices

#: "auto"'s order of preference.
PRIORITY = ("triton", "cpu", "torch", "ops")
#: Implementation name -> its module in this package.
MODULES = {"triton": "triton", "cpu": "cpu", "torch": "eager", "ops": "reference"}


def context(x, kernel) -> tuple:
    """What the choice depends on besides shapes and dtypes."""
    return (x.device.type, kernel.device.type, devices.torch_tracer(x, kernel))


def load(name: str):
    """The module of implementation `name` (ImportError where it needs a package
    that is missing)."""
    # (import statements, not importlib: torch's compiler follows them)
    if name == "triton":
        from keras_synann.kernels.torch import triton as module
    elif name == "cpu":
        from keras_synann.kernels.torch import cpu as module
    elif name == "torch":
        from keras_synann.kernels.torch import eager as module
    elif name == "ops":
        from keras_synann.kernels.torch import reference as module
    else:
        raise KeyError(name)
    return module


def compiling() -> bool:
    """Whether torch's compiler is tracing (the dispatch then caches nothing)."""
    import torch

    return torch.compiler.is_compiling()
