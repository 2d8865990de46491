"""keras_synann.kernels: the dispatch, the C loops and their build, on the active backend.

"auto"'s choice is checked against fixed answers for environments the tests
set up (this process: float32 on one CPU with a compiler; float64; no
compiler; several jax devices; each tracer). The C loops must load here: a
machine without them (no packaged library, no compiler) fails the tests
that need them instead of skipping them. (Their build per CPU level:
test_cpu_levels.py.)
"""

import ast
import contextlib
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops

import keras_synann
from keras_synann import kernels
from keras_synann import ops as synann_ops
from keras_synann.kernels import cpu_compile, cpu_levels, reference, rules
from keras_synann.kernels.base import Implementation
from keras_synann.testing import value_and_grad

BACKEND = keras.backend.backend()
REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(keras_synann.__file__).parent


def _data(batch, n, beta_max=0.9, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.01, 0.99, (batch, n)).astype("float32")
    kernel = rng.uniform(0.0, beta_max, (n, n)).astype("float32")
    return x, kernel


def _tensors(batch=3, n=8):
    return tuple(ops.convert_to_tensor(a) for a in _data(batch, n))


def _require(implementation, x, kernel):
    """Skips unless `implementation` applies to x and kernel here; the C
    loops ("cpu") must apply (float32 on a CPU)."""
    x, kernel = ops.convert_to_tensor(x), ops.convert_to_tensor(kernel)
    reasons = kernels.not_supported_reasons(implementation, x, kernel)
    assert implementation != "cpu" or not reasons, reasons
    if reasons:
        pytest.skip(f"implementation={implementation!r}: {'; '.join(reasons)}")


def _run(script, tmp_path, **env):
    """Runs `script` in a fresh interpreter with the repository importable;
    returns its stdout. `env` entries set (or, as None, remove) variables."""
    full = {**os.environ, "PYTHONPATH": str(REPO), "KERAS_BACKEND": BACKEND}
    full.update(env)
    command = [sys.executable, "-c", textwrap.dedent(script)]
    try:
        return subprocess.check_output(
            command,
            cwd=tmp_path,
            env={k: v for k, v in full.items() if v is not None},
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    except subprocess.CalledProcessError as e:
        pytest.fail(e.stderr[-3000:])


# --- the package's shape ------------------------------------------------------


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports, anywhere in it (functions too).

    `from a.b import c` imports a.b.c where that is a module, else a.b.
    """
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [
                f"{node.module}.{alias.name}"
                if f"{node.module}.{alias.name}" in modules
                else node.module
                for alias in node.names
            ]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def test_package_imports_point_one_way():
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    graph = {_module_name(p): _imports(p, modules) - {_module_name(p)} for p in paths}
    # The kernels never reach up to the math, the layer or the models.
    for name, targets in graph.items():
        if name.startswith("keras_synann.kernels"):
            above = {t for t in targets if not t.startswith("keras_synann.kernels")}
            assert not above, f"{name} imports {above}"
    assert "keras_synann.kernels" in graph["keras_synann.ops"]
    # No cycle: a depth-first search finds no edge back into its own path.
    state = {}

    def visit(name, path):
        state[name] = "open"
        for target in sorted(graph[name]):
            assert state.get(target) != "open", " -> ".join([*path, target])
            if target not in state:
                visit(target, [*path, target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert len(graph) >= 20, sorted(graph)  # the walk saw the whole package


def test_c_sources_ship_as_package_files():
    for name in ("cpu_loops.c", "cpu_ffi.c"):
        text = cpu_compile.source(name)
        assert (PACKAGE / "kernels" / name).read_text() == text
    assert "synann_forward" in cpu_compile.source("cpu_loops.c")
    assert "XLA_FFI_CallFrame" in cpu_compile.source("cpu_ffi.c")


# --- the C loops against the reference ----------------------------------------


@pytest.mark.parametrize("implementation", ["torch", "cpu"])
@pytest.mark.parametrize(
    "shape, case",
    [
        ((5, 13), "floored"),  # factors at the floor: no gradient through them
        ((33, 40), "floored"),
        ((6, 300), "small"),  # small betas: several chunk products per log
        ((6, 300), "negative"),  # negative betas: factors above 1
        ((4, 500), "large"),  # betas near 1: one log per chunk, products underflow
        ((1, 70), "small"),  # one sample; outputs past the last whole vector
    ],
)
def test_cpu_kernels_match_the_reference(shape, case, implementation):
    if implementation == "torch" and BACKEND != "torch":
        pytest.skip("the eager torch kernel runs under torch")
    x, kernel = _data(*shape, beta_max={"small": 0.05, "large": 0.999}.get(case, 0.99))
    _require(implementation, x, kernel)
    if case == "floored":
        x[0, :3] = 1.0
        kernel[:2, :] = 1.0
    if case == "negative":
        kernel -= 0.03
    upstream = np.random.default_rng(4).normal(size=shape).astype("float32")
    # Under tensorflow the loops also run in a graph a tape records (fit).
    graphs = [False, True] if BACKEND == "tensorflow" else [False]
    for graph in graphs:
        results = {}
        for impl in ("ops", implementation):

            def loss(x, kernel, impl=impl):
                out = synann_ops.synapse_graph(
                    x, kernel, chunk_size=6, implementation=impl
                )
                return ops.sum(out * ops.convert_to_tensor(upstream))

            value, grads = value_and_grad(loss, graph=graph)(x, kernel)
            results[impl] = [ops.convert_to_numpy(a) for a in (value, *grads)]
            s = synann_ops.log_inhibition(x, kernel, 6, implementation=impl)
            results[impl].append(ops.convert_to_numpy(s))
        for ours, theirs in zip(results[implementation], results["ops"], strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


# --- "auto" in environments set up here ----------------------------------------


def test_auto_takes_the_c_loops_for_float32_on_a_cpu():
    x, kernel = _tensors()
    _require("cpu", x, kernel)
    assert synann_ops.resolve_implementation("auto", x, kernel) == "cpu"
    assert synann_ops.resolve_implementation("ops", x, kernel) == "ops"


def _float64(x, kernel):
    if BACKEND == "jax":
        import jax

        return jax.numpy.asarray(x, "float64"), jax.numpy.asarray(kernel, "float64")
    return ops.cast(x, "float64"), ops.cast(kernel, "float64")


def test_auto_with_float64():
    x, kernel = _data(3, 8)
    expected = {"jax": "ops", "tensorflow": "ops", "torch": "torch"}[BACKEND]
    context = _jax_x64() if BACKEND == "jax" else contextlib.nullcontext()
    with context:
        x64, kernel64 = _float64(x, kernel)
        assert keras.backend.standardize_dtype(x64.dtype) == "float64"
        assert synann_ops.resolve_implementation("auto", x64, kernel64) == expected
        with pytest.raises(
            ValueError,
            match=r"implementation='cpu' does not apply: the C loops compute in "
            r"float32 \(received x float64, kernel float64\)\. "
            r"Use implementation='auto' or 'ops'\.",
        ):
            synann_ops.log_inhibition(x64, kernel64, implementation="cpu")


def _jax_x64():
    import jax

    # jax >= 0.8 spells it jax.enable_x64; older ones, jax.experimental.
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    import jax.experimental

    return jax.experimental.enable_x64(True)


_NO_COMPILER = """
    import shutil, warnings
    import numpy as np
    from keras import ops
    from keras_synann import ops as synann_ops

    assert all(shutil.which(cc) is None for cc in ("cc", "gcc", "clang"))
    x = np.full((3, 8), 0.5, "float32")
    kernel = np.full((8, 8), 0.25, "float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        print(synann_ops.resolve_implementation("auto", x, kernel))
        s = synann_ops.log_inhibition(x, kernel)
        synann_ops.log_inhibition(x, kernel)
    np.testing.assert_allclose(ops.convert_to_numpy(s), 8 * np.log(1 - 0.125), rtol=1e-6)
    ours = [w for w in caught if "C compiler" in str(w.message)]
    print(len(ours), ours[0].category.__name__)
    print(ours[0].message)
    try:
        synann_ops.log_inhibition(x, kernel, implementation="cpu")
    except ValueError as e:
        print(e)
"""


def test_auto_without_a_compiler_warns_once_and_falls_back(tmp_path):
    """Without a packaged library (a source tree) and with no compiler."""
    empty = tmp_path / "bin"
    empty.mkdir()
    out = _run(
        _NO_COMPILER,
        tmp_path,
        CC=str(tmp_path / "no-such-cc"),
        PATH=str(empty),
        KERAS_SYNANN_CACHE=str(tmp_path / "cache"),
    ).splitlines()
    expected = {"jax": "ops", "tensorflow": "ops", "torch": "torch"}[BACKEND]
    assert out[0] == expected
    assert out[1] == "1 UserWarning"
    assert "several times slower" in out[2] and "$CC" in out[2] and "gcc" in out[2]
    level = cpu_levels.choose()[0]
    assert out[3] == (
        f"implementation='cpu' does not apply: this installation carries no C "
        f"loops for {level}; no C compiler found ($CC, cc, gcc, clang). Use "
        "implementation='auto' or 'ops'."
    )
    assert not (tmp_path / "cache").exists()


@pytest.mark.skipif(BACKEND != "jax", reason="jax devices")
def test_auto_with_several_jax_devices_keeps_the_reference(tmp_path):
    script = """
        import jax
        import numpy as np
        from keras_synann import ops as synann_ops

        assert len(jax.devices()) == 2
        x = np.full((4, 8), 0.5, "float32")
        kernel = np.full((8, 8), 0.25, "float32")
        print(synann_ops.resolve_implementation("auto", x, kernel))
        try:
            synann_ops.log_inhibition(x, kernel, implementation="cpu")
        except ValueError as e:
            print(e)
    """
    out = _run(
        script, tmp_path, XLA_FLAGS="--xla_force_host_platform_device_count=2"
    ).splitlines()
    assert out == [
        "ops",
        "implementation='cpu' does not apply: the C loops need jax on a single "
        "CPU device (jax has 2 cpu device(s)). Use implementation='auto' or 'ops'.",
    ]


# --- the registry ----------------------------------------------------------------


def test_the_registry_is_one_table_of_kernels():
    for backend in ("jax", "tensorflow", "torch"):
        names = kernels.priority(backend)
        assert names[-1] == "ops" and len(set(names)) == len(names), names
    assert set(kernels.NAMES) == {row.name for row in kernels.REGISTRY}
    assert synann_ops.IMPLEMENTATIONS == ("auto", *kernels.NAMES)
    for name in kernels.priority():
        kernel, error = kernels.find(name).load()
        if kernel is None:
            assert error.endswith("is not installed"), error
        else:
            assert isinstance(kernel, rules.Kernel), name


def test_an_implementation_is_a_kernel_module_and_one_row(monkeypatch):
    """What adding an implementation takes: a module whose KERNEL gives
    forward, adjoint and contract, and a row declaring what it supports.
    This probe counts its calls and computes with the reference."""
    calls = []

    def counted(name, operation):
        def call(*args):
            calls.append(name)
            return operation(*args)

        return call

    module = types.ModuleType("keras_synann.kernels._probe")
    module.KERNEL = rules.Kernel(
        *(counted(n, getattr(reference, n)) for n in ("forward", "adjoint", "contract"))
    )
    monkeypatch.setitem(sys.modules, module.__name__, module)
    row = Implementation("probe", BACKEND, "_probe", "the probe", dtypes=("float32",))
    monkeypatch.setattr(kernels, "REGISTRY", (row, *kernels.REGISTRY))
    monkeypatch.setattr(kernels, "_AUTO", {})
    x, kernel = _tensors(4, 9)
    assert kernels.resolve("auto", x, kernel) is row

    def loss(implementation):
        def fn(x, kernel):
            s = kernels.log_inhibition(x, kernel, 4, implementation)
            return ops.sum(s * s)

        return fn

    ours = value_and_grad(loss("auto"))(x, kernel)
    assert {"forward", "adjoint"} <= set(calls), calls
    theirs = value_and_grad(loss("ops"))(x, kernel)
    for a, b in zip((ours[0], *ours[1]), (theirs[0], *theirs[1]), strict=True):
        np.testing.assert_allclose(
            ops.convert_to_numpy(a), ops.convert_to_numpy(b), rtol=1e-6, atol=1e-7
        )
    # The row's data alone refuses: "auto" passes it over, an explicit request
    # says why.
    context = _jax_x64() if BACKEND == "jax" else contextlib.nullcontext()
    with context:
        x64, kernel64 = _float64(*_data(4, 9))
        assert kernels.resolve("auto", x64, kernel64) is not row
        assert kernels.not_supported_reasons("probe", x64, kernel64) == [
            "the probe compute in float32 (received x float64, kernel float64)"
        ]


def test_an_implementation_of_another_backend_says_so():
    x, kernel = _tensors()
    other = {"jax": "triton", "tensorflow": "pallas", "torch": "pallas"}[BACKEND]
    home = {"triton": "torch", "pallas": "jax"}[other]
    with pytest.raises(
        ValueError,
        match=rf"implementation='{other}' does not apply: it needs the {home} "
        rf"backend \(Keras runs {BACKEND}\)\. Use implementation='auto' or 'ops'\.",
    ):
        synann_ops.log_inhibition(x, kernel, implementation=other)


# --- under each tracer ---------------------------------------------------------


def _choices(runs, picked, check) -> dict[str, str]:
    """{run: what "auto" picked in it}: `picked` is the list a probe in the
    function appends "auto"'s choice to; check(name, output) checks each run."""
    choices = {}
    for name, run in runs.items():
        picked.clear()
        out = run()
        choices[name] = picked[0]
        check(name, out)
    return choices


@pytest.mark.skipif(BACKEND != "torch", reason="torch tracers")
def test_torch_tracers_take_the_reference():
    import torch

    x, kernel = _tensors()
    _require("cpu", x, kernel)
    picked = []

    def fn(x, kernel):
        picked.append(synann_ops.resolve_implementation("auto", x, kernel))
        return synann_ops.log_inhibition(x, kernel)

    class Module(torch.nn.Module):
        def forward(self, x, kernel):
            return fn(x, kernel)

    expected = ops.convert_to_numpy(
        synann_ops.log_inhibition(x, kernel, implementation="ops")
    )
    assert picked == [], picked
    runs = {
        "eager": lambda: fn(x, kernel),
        "torch.jit.trace": lambda: torch.jit.trace(fn, (x, kernel), check_trace=False)(
            x * 0.5, kernel
        ),
        "torch.compile": lambda: torch.compile(fn, fullgraph=True)(x * 0.5, kernel),
        "torch.export": lambda: torch.export.export(Module(), (x, kernel)).module()(
            x * 0.5, kernel
        ),
    }
    # Traced functions run on other inputs: a constant baked into a graph would show.
    halved = ops.convert_to_numpy(
        synann_ops.log_inhibition(x * 0.5, kernel, implementation="ops")
    )

    def check(name, out):
        want = expected if name == "eager" else halved
        np.testing.assert_allclose(
            ops.convert_to_numpy(out), want, rtol=1e-5, atol=1e-6
        )

    assert _choices(runs, picked, check) == {
        "eager": "cpu",
        "torch.jit.trace": "ops",
        "torch.compile": "ops",
        "torch.export": "ops",
    }


@pytest.mark.skipif(BACKEND != "torch", reason="torch tracers")
@pytest.mark.parametrize("implementation", ["cpu", "torch"])
def test_torch_tracers_refuse_an_explicit_kernel_they_cannot_record(implementation):
    import torch

    x, kernel = _tensors()
    _require(implementation, x, kernel)

    def fn(x, kernel):
        return synann_ops.log_inhibition(x, kernel, implementation=implementation)

    with pytest.raises(
        ValueError,
        match=rf"implementation='{implementation}' does not apply: torch.jit.trace ",
    ):
        torch.jit.trace(fn, (x, kernel))
    with pytest.raises(Exception, match="torch.compile / torch.export"):
        torch.compile(fn, fullgraph=True)(x, kernel)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tensorflow graphs")
def test_tensorflow_takes_the_c_loops_in_eager_calls_and_training_graphs_only(
    tmp_path,
):
    import tensorflow as tf

    x, kernel = (tf.constant(a) for a in _data(6, 40, beta_max=0.5))
    _require("cpu", x, kernel)
    picked = []

    def forward(x):
        picked.append(synann_ops.resolve_implementation("auto", x, kernel))
        return synann_ops.log_inhibition(x, kernel)

    def taped(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = tf.reduce_sum(forward(x))
        return value, tape.gradient(value, x)

    class Module(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec((None, 40))])
        def serve(self, x):
            return forward(x)

    expected = synann_ops.log_inhibition(x, kernel, implementation="ops").numpy()
    runs = {
        "eager": lambda: forward(x),
        "tf.function": lambda: tf.function(forward)(x),
        "tf.function, tape": lambda: tf.function(taped)(x)[0],
        "jit_compile, tape": lambda: tf.function(taped, jit_compile=True)(x)[0],
        "tf.saved_model.save": lambda: tf.saved_model.save(
            Module(), str(tmp_path / "saved")
        ),
    }

    def check(name, out):
        if out is not None:  # (saving returns nothing)
            out = out.numpy()
            want = expected.sum() if out.ndim == 0 else expected
            np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)

    assert _choices(runs, picked, check) == {
        "eager": "cpu",
        "tf.function": "ops",
        "tf.function, tape": "cpu",
        "jit_compile, tape": "ops",
        "tf.saved_model.save": "ops",
    }
    # An explicit request runs wherever the loops can: not inside XLA.
    with pytest.raises(
        ValueError,
        match=r"implementation='cpu' does not apply: an XLA-compiled graph "
        r"\(jit_compile=True, or a TPU\) cannot hold the C loops' call back "
        r"into Python\.",
    ):
        tf.function(
            lambda x: synann_ops.log_inhibition(x, kernel, implementation="cpu"),
            jit_compile=True,
        )(x)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tensorflow graphs")
def test_tensorflow_keras_predict_and_evaluate_take_the_c_loops(tmp_path):
    """Keras's predict and evaluate steps run in this process: "auto" takes the
    loops there, while an exported graph stays portable."""
    import tensorflow as tf

    x, kernel = _data(6, 40, beta_max=0.5)
    _require("cpu", x, kernel)
    picked = []

    class Probe(keras.layers.Layer):
        def call(self, inputs):
            w = ops.convert_to_tensor(kernel)
            picked.append(synann_ops.resolve_implementation("auto", inputs, w))
            return synann_ops.log_inhibition(inputs, w)

    model = keras.Sequential([keras.Input((40,)), Probe()])
    model.compile(loss="mse")
    picked.clear()  # (building traced the layer symbolically)
    expected = ops.convert_to_numpy(
        synann_ops.log_inhibition(x, kernel, implementation="ops")
    )
    np.testing.assert_allclose(
        model.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6
    )
    assert set(picked) == {"cpu"}, picked
    picked.clear()
    model.evaluate(x, expected, verbose=0)
    assert set(picked) == {"cpu"}, picked
    picked.clear()
    serve = tf.function(model.__call__, input_signature=[tf.TensorSpec((None, 40))])
    serve.get_concrete_function()
    assert set(picked) == {"ops"}, picked


@pytest.mark.skipif(BACKEND != "jax", reason="jax lowering")
def test_jax_runs_the_loops_under_jit_and_exports_the_reference():
    import jax
    from jax import export

    x, kernel = _tensors(5, 24)
    _require("cpu", x, kernel)
    assert synann_ops.resolve_implementation("auto", x, kernel) == "cpu"

    def loss(x, kernel):
        return jax.numpy.sum(synann_ops.log_inhibition(x, kernel) ** 2)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    compiled = step.lower(x, kernel).as_text()
    assert "keras_synann_forward" in compiled and "keras_synann_backward" in compiled
    exported = export.export(step)(x, kernel)
    text = exported.mlir_module()
    assert "custom_call" not in text, text
    restored = export.deserialize(exported.serialize())

    def reference(x, kernel):
        return jax.numpy.sum(
            synann_ops.log_inhibition(x, kernel, implementation="ops") ** 2
        )

    expected = jax.value_and_grad(reference, argnums=(0, 1))(x, kernel)
    for got in (step(x, kernel), restored.call(x, kernel)):
        for ours, theirs in zip(
            jax.tree.leaves(got), jax.tree.leaves(expected), strict=True
        ):
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(BACKEND != "jax", reason="jax tracing")
def test_jax_traces_the_loops_without_importing_jax2onnx(tmp_path):
    """The jax2onnx plugins are registered only once jax2onnx is imported by
    someone else (Keras's ONNX export): the layer never imports it."""
    out = _run(
        """
        import sys
        import jax
        import numpy as np
        from keras_synann import ops
        x = np.full((3, 8), 0.5, "float32")
        kernel = np.full((8, 8), 0.1, "float32")
        jax.jit(lambda x, k: ops.log_inhibition(x, k, implementation="cpu"))(x, kernel)
        print("jax2onnx" in sys.modules)
        """,
        tmp_path,
    )
    assert out.split() == ["False"]


@pytest.mark.skipif(BACKEND != "jax", reason="jax transformations")
def test_jax_vmap_of_the_loops_and_their_gradient():
    import jax

    x, kernel = _data(12, 20)
    x = x.reshape(3, 4, 20)
    _require("cpu", x[0], kernel)

    def s(x, kernel, implementation="cpu"):
        return synann_ops.log_inhibition(x, kernel, implementation=implementation)

    def grad(x, kernel, implementation="cpu"):
        return jax.grad(
            lambda x, k: jax.numpy.sum(s(x, k, implementation) ** 2), argnums=(0, 1)
        )(x, kernel)

    mapped = jax.vmap(s, in_axes=(0, None))(x, kernel)
    mapped_grads = jax.jit(jax.vmap(grad, in_axes=(0, None)))(x, kernel)
    both_mapped = jax.vmap(s)(x, np.stack([kernel, kernel * 0.5, kernel * 0.1]))
    for k in range(3):
        np.testing.assert_allclose(
            mapped[k], s(x[k], kernel, "ops"), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            both_mapped[k],
            s(x[k], kernel * [1.0, 0.5, 0.1][k], "ops"),
            rtol=1e-5,
            atol=1e-6,
        )
        for ours, theirs in zip(
            (g[k] for g in mapped_grads), grad(x[k], kernel, "ops"), strict=True
        ):
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
