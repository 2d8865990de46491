"""Where a computation runs and what records it: every device and tracer check
the kernels make, one function per question.

`context(x, kernel)` answers both for the running backend; the registry
decides with it which implementation applies (a GPU-only kernel on a CPU,
compiled C loops under a tracer that would bake their result into a graph
as a constant) and which form of it a tracer records. Backend modules are
imported inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import dataclasses

import keras


def backend() -> str:
    """The Keras backend: "jax", "tensorflow" or "torch"."""
    return keras.backend.backend()


def on_cpu(x) -> bool:
    """Whether `x` is computed on the host CPU (under jax: the default device)."""
    name = backend()
    if name == "jax":
        import jax

        return jax.default_backend() == "cpu"
    if name == "tensorflow":
        return tensorflow_on_cpu()
    if name == "torch":
        return x.device.type == "cpu"
    return True


def dtypes(*tensors) -> str:
    """The tensors' dtypes in words, for messages: "x float64, kernel float32"."""
    names = ("x", "kernel", "upstream")
    return ", ".join(
        f"{name} {keras.backend.standardize_dtype(t.dtype)}"
        for name, t in zip(names, tensors, strict=False)
    )


@dataclasses.dataclass(frozen=True)
class Context:
    """What "auto"'s choice depends on besides shapes and dtypes.

    Attributes:
        device: the kind of device the computation runs on ("cpu", "cuda",
            "gpu", "tpu"; "" where it is not one kind).
        where: the same in words, for reasons ("jax has 2 cpu device(s)").
        tracer: what records the computation (a TF_* or TORCH_* string, or a
            torch tracer in words); None where nothing does (eager).
        cacheable: whether the choice may be cached (not while torch's
            compiler traces the dispatch).
    """

    device: str
    where: str
    tracer: str | None = None
    cacheable: bool = True


#: What a kernel that runs on one kind of device needs, per backend, in words.
NEEDS = {
    ("jax", "cpu"): "jax on a single CPU device",
    ("torch", "cpu"): "CPU tensors",
    ("tensorflow", "cpu"): "tensorflow on the CPU",
}


def context(x, kernel) -> Context:
    """Where `x` and `kernel` are computed under the running backend, and what
    records the computation."""
    name = backend()
    if name == "jax":
        count, platform = jax_devices()
        device = platform if count == 1 else ""
        return Context(device, f"jax has {count} {platform} device(s)")
    if name == "torch":
        tracer = torch_tracer(x, kernel)
        same = x.device.type == kernel.device.type
        return Context(
            x.device.type if same else "",
            f"received tensors on {x.device}",
            tracer,
            cacheable=tracer != TORCH_COMPILE,
        )
    on_cpu = tensorflow_on_cpu()
    return Context(
        "cpu" if on_cpu else "",
        "it sees the CPU only" if on_cpu else "it sees a GPU or TPU",
        tensorflow_context(x, kernel),
    )


# --- jax -------------------------------------------------------------------


def jax_devices() -> tuple[int, str]:
    """(number of jax devices, platform of the first): (1, "cpu") on a plain CPU."""
    import jax

    devices = jax.devices()
    return len(devices), devices[0].platform


# --- tensorflow --------------------------------------------------------------


def tensorflow_on_cpu() -> bool:
    """Whether tensorflow sees no GPU or TPU (so computes on the host CPU)."""
    import tensorflow as tf

    return not (
        tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU")
    )


#: What `tensorflow_context` answers (None: eager execution).
TF_XLA = "an XLA-compiled graph (jit_compile=True, or a TPU)"
TF_SAVING = "a SavedModel being written"
TF_TRAINING = "a graph that a gradient tape records"
TF_INFERENCE = "a graph that no gradient tape records"
TF_KERAS_STEP = "a Keras predict or evaluate step (a graph no gradient tape records)"
TF_FORWARD = "a graph that a forward accumulator (forward-mode autodiff) records"


def tensorflow_context(*tensors) -> str | None:
    """What tensorflow is building when `tensors` are computed (a TF_* constant),
    or None when it executes eagerly.

    A graph that XLA compiles; a graph written into a
    SavedModel; a graph a forward accumulator records (in graphs,
    `tf.custom_gradient` gives forward mode the JVP of its inner ops, not of
    its gradient function, so only plain ops are right there); a graph a
    gradient tape records (a training step); a step of Keras's `predict` or
    `evaluate` (which no tape records, and which never leaves this process);
    any other
    graph (an inference graph: `predict`, or a function that a converter such
    as tf2onnx or TFLite reads). The checks use tensorflow's internal
    helpers (XLA control-flow context, save context, tape); where one is
    missing, the answer is the one that keeps the portable path.
    """
    import tensorflow as tf

    if tf.executing_eagerly():
        return None
    try:
        from tensorflow.python.framework import ops as tf_ops
        from tensorflow.python.ops import control_flow_util
        from tensorflow.python.saved_model import save_context
    except ImportError:
        return TF_XLA
    if control_flow_util.GraphOrParentsInXlaContext(tf_ops.get_default_graph()):
        return TF_XLA
    if save_context.in_save_context():
        return TF_SAVING
    try:
        from tensorflow.python.eager import forwardprop_util

        if forwardprop_util.pack_tangents(list(tensors)).tangents:
            return TF_FORWARD
    except (ImportError, AttributeError):
        pass
    try:
        from tensorflow.python.eager import record
    except ImportError:
        return TF_INFERENCE
    if record.should_record_backprop(list(tensors)):
        return TF_TRAINING
    if _in_keras_step(tf_ops.get_default_graph()):
        return TF_KERAS_STEP
    return TF_INFERENCE


#: The functions Keras's tensorflow trainer traces for fit, evaluate and predict
#: (keras/src/backend/tensorflow/trainer.py); exporters trace other functions.
_KERAS_STEPS = (
    "one_step_on_data",
    "multi_step_on_data",
    "one_step_on_iterator",
    "multi_step_on_iterator",
)


def _in_keras_step(graph) -> bool:
    """Whether `graph`, or a graph it is nested in, is one of Keras's steps.

    Keras runs these in this process only, so they may call back into
    Python; should Keras rename them, the answer is False (the portable
    path: slower, never wrong).
    """
    while graph is not None:
        name = getattr(graph, "name", "") or ""
        if name.startswith(_KERAS_STEPS):
            return True
        graph = getattr(graph, "outer_graph", None)
    return False


# --- torch -------------------------------------------------------------------


#: What `torch_tracer` answers under torch.jit.trace and torch's compiler.
TORCH_JIT_TRACE = "torch.jit.trace"
TORCH_COMPILE = "torch.compile / torch.export"


def torch_tracer(*tensors) -> str | None:
    """The torch tracer recording these tensors, in words, or None when eager.

    torch.jit.trace (and the TorchScript ONNX exporter), torch.compile and
    torch.export (dynamo, or make_fx with fake or functional tensors, which
    torch.onnx's dynamo exporter uses). A tracer records torch operations
    only: a value computed outside torch (the C loops) or read into Python
    (`.item()`) would enter its graph as a constant.
    """
    import torch

    if torch.jit.is_tracing():
        return TORCH_JIT_TRACE
    if torch.jit.is_scripting():
        return "torch.jit.script"
    if torch.compiler.is_compiling():
        return TORCH_COMPILE
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    for t in tensors:
        if isinstance(t, FakeTensor | FunctionalTensor):
            return f"a traced {type(t).__name__} (torch.export, make_fx)"
    for key in ("FAKE", "PROXY", "FUNCTIONAL"):
        mode_key = getattr(torch._C._TorchDispatchModeKey, key, None)
        if mode_key is not None and torch._C._get_dispatch_mode(mode_key) is not None:
            return f"a torch {key.lower()} tracing mode (torch.export, make_fx)"
    return None
