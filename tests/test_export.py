"""Exported and traced models compute the Keras model's numbers (default
arguments: implementation="auto"), loaded where keras_synann cannot be imported.

The model is `Input(32) -> Dense(24, sigmoid) -> Synapse() -> Dense(4)` (and
the same on `Input((5, 32))`), with beta moved well away from its initial
range (uniform in [0, 0.6)). Each test exports every artifact its backend
supports, then loads them all in one fresh interpreter (`python -I`, with
keras_synann blocked from importing) and compares with the Keras model's
predictions to 1e-5 relative (max |difference| / max |prediction|). Traces
that stay in the process (torch.compile, jit_compile, jax.jit) are compared
in the test itself.

Tests marked `export` need the [export] extra (onnx, onnxscript, onnxruntime,
tf2onnx) or, under jax, tensorflow (the cross env) or jax2onnx (the jax-onnx
env): tox installs them where they resolve.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_synann import Synapse

BACKEND = keras.backend.backend()
#: Largest relative error allowed: max |artifact - keras| / max |keras|.
RTOL = 1e-5
SHAPES = {"rank2": (32,), "rank3": (5, 32)}

#: Runs in the fresh interpreter: loads each artifact of manifest.json and
#: saves its outputs. It cannot import keras_synann (nor needs to).
LOADER = r"""
import importlib.abc, json, sys
from pathlib import Path

class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "keras_synann":
            raise ImportError(f"{name} is not importable here")

sys.meta_path.insert(0, _Block())
try:
    import keras_synann  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("keras_synann was importable")

import numpy as np

directory = Path(sys.argv[1])
for name, entry in json.loads((directory / "manifest.json").read_text()).items():
    x = np.load(directory / entry["input"])
    path = str(directory / name)
    kind = entry["kind"]
    if kind == "tf_saved_model":
        import tensorflow as tf
        loaded = tf.saved_model.load(path)
        y = getattr(loaded, entry.get("endpoint", "serve"))(tf.constant(x)).numpy()
    elif kind == "onnx":
        import onnxruntime
        session = onnxruntime.InferenceSession(path)
        y = session.run(None, {session.get_inputs()[0].name: x})[0]
    elif kind == "torch.export":
        import torch
        y = torch.export.load(path).module()(torch.from_numpy(x)).detach().numpy()
    elif kind == "torch.jit":
        import torch
        y = torch.jit.load(path)(torch.from_numpy(x)).detach().numpy()
    elif kind == "jax.export":
        import jax
        from jax import export
        y = np.asarray(export.deserialize(Path(path).read_bytes()).call(x))
    else:
        raise SystemExit(f"unknown artifact kind {kind}")
    np.save(directory / f"out_{name}.npy", y)
    print(name, "loaded")
"""


def _model(rank: str):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input(SHAPES[rank]),
            keras.layers.Dense(24, activation="sigmoid"),
            Synapse(),
            keras.layers.Dense(4),
        ]
    )
    rng = np.random.default_rng(1)
    model.layers[1].kernel.assign(rng.uniform(0.0, 0.6, (24, 24)).astype("float32"))
    return model


def _input(rank: str, batch: int = 6):
    rng = np.random.default_rng(2)
    return rng.normal(size=(batch, *SHAPES[rank])).astype("float32")


def _cases():
    """(rank, model, input, the model's prediction) for each input rank."""
    for rank in SHAPES:
        model = _model(rank)
        x = _input(rank)
        yield rank, model, x, model.predict(x, verbose=0)


def _relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


class Artifacts:
    """Artifacts written into `directory`, each with the input it runs on and
    the Keras model's prediction for that input."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.manifest = {}
        self.expected = {}

    def add(self, name: str, kind: str, rank: str, expected, **extra):
        self.manifest[name] = {"kind": kind, "input": f"{rank}.npy", **extra}
        self.expected[name] = np.asarray(expected)

    def load_elsewhere(self) -> dict[str, float]:
        """Loads every artifact in a fresh interpreter; their relative errors."""
        for rank in SHAPES:
            np.save(self.directory / f"{rank}.npy", _input(rank))
        (self.directory / "manifest.json").write_text(json.dumps(self.manifest))
        loader = self.directory / "loader.py"
        loader.write_text(LOADER)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        result = subprocess.run(
            [sys.executable, "-I", str(loader), str(self.directory)],
            cwd=self.directory,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        errors = {}
        for name, expected in self.expected.items():
            actual = np.load(self.directory / f"out_{name}.npy")
            errors[name] = _relative_error(actual, expected)
        return errors


def _check(errors: dict[str, float]):
    print("\n".join(f"{BACKEND} {name}: {e:.1e}" for name, e in errors.items()))
    bad = {name: e for name, e in errors.items() if not e <= RTOL}
    assert not bad, bad


def _has(*modules) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


@pytest.mark.export
@pytest.mark.skipif(BACKEND != "torch", reason="torch exporters")
def test_torch_exports_and_traces(tmp_path):
    import torch

    artifacts = Artifacts(tmp_path)
    errors = {}
    for rank, model, x, expected in _cases():
        x_t = torch.from_numpy(x)
        # A dynamic batch: Keras exports through torch.jit tracing (TorchScript).
        model.export(str(tmp_path / f"{rank}.onnx"), format="onnx", verbose=False)
        artifacts.add(f"{rank}.onnx", "onnx", rank, expected)
        # A fixed batch: through torch.export (torch.onnx's dynamo exporter).
        model.export(
            str(tmp_path / f"{rank}.static.onnx"),
            format="onnx",
            verbose=False,
            input_signature=[keras.InputSpec(shape=x.shape, dtype="float32")],
        )
        artifacts.add(f"{rank}.static.onnx", "onnx", rank, expected)
        program = torch.export.export(model, (x_t,))
        torch.export.save(program, str(tmp_path / f"{rank}.pt2"))
        artifacts.add(f"{rank}.pt2", "torch.export", rank, expected)
        traced = torch.jit.trace(model, (x_t,))
        torch.jit.save(traced, str(tmp_path / f"{rank}.jit.pt"))
        artifacts.add(f"{rank}.jit.pt", "torch.jit", rank, expected)
        compiled = torch.compile(model, fullgraph=True)
        with torch.no_grad():
            errors[f"{rank} torch.compile"] = _relative_error(
                compiled(x_t).numpy(), expected
            )
    errors.update(artifacts.load_elsewhere())
    _check(errors)


@pytest.mark.export
@pytest.mark.skipif(BACKEND != "tensorflow", reason="tensorflow exporters")
def test_tensorflow_exports_and_traces(tmp_path):
    import tensorflow as tf

    artifacts = Artifacts(tmp_path)
    errors = {}
    for rank, model, x, expected in _cases():
        model.export(str(tmp_path / f"{rank}.saved"), format="tf_saved_model")
        artifacts.add(f"{rank}.saved", "tf_saved_model", rank, expected)
        model.export(str(tmp_path / f"{rank}.onnx"), format="onnx", verbose=False)
        artifacts.add(f"{rank}.onnx", "onnx", rank, expected)
        compiled = tf.function(lambda x, model=model: model(x), jit_compile=True)
        errors[f"{rank} jit_compile"] = _relative_error(compiled(x).numpy(), expected)
    errors.update(artifacts.load_elsewhere())
    _check(errors)


def _jax_predict(model):
    """The model's inference as a pure function of its input (weights closed over)."""
    weights = [v.value for v in model.trainable_variables]
    others = [v.value for v in model.non_trainable_variables]

    def predict(x):
        return model.stateless_call(weights, others, x)[0]

    return predict


@pytest.mark.skipif(BACKEND != "jax", reason="jax exporters")
def test_jax_export_and_jit(tmp_path):
    import jax
    from jax import export

    artifacts = Artifacts(tmp_path)
    errors = {}
    for rank, model, x, expected in _cases():
        predict = _jax_predict(model)
        errors[f"{rank} jax.jit"] = _relative_error(jax.jit(predict)(x), expected)
        shape = export.symbolic_shape(", ".join(["b", *map(str, SHAPES[rank])]))
        exported = export.export(jax.jit(predict))(
            jax.ShapeDtypeStruct(shape, "float32")
        )
        (tmp_path / f"{rank}.jax").write_bytes(exported.serialize())
        artifacts.add(f"{rank}.jax", "jax.export", rank, expected)
    errors.update(artifacts.load_elsewhere())
    _check(errors)


@pytest.mark.export
@pytest.mark.skipif(BACKEND != "jax", reason="jax exporters")
@pytest.mark.skipif(
    not _has("tensorflow"),
    reason="jax2tf and tf_saved_model under jax need tensorflow (tox: the cross env)",
)
def test_jax_exports_through_tensorflow(tmp_path):
    import tensorflow as tf
    from jax.experimental import jax2tf

    artifacts = Artifacts(tmp_path)
    for rank, model, _, expected in _cases():
        model.export(str(tmp_path / f"{rank}.saved"), format="tf_saved_model")
        artifacts.add(f"{rank}.saved", "tf_saved_model", rank, expected)
        module = tf.Module()
        module.serve = tf.function(
            jax2tf.convert(_jax_predict(model), polymorphic_shapes=["(b, ...)"]),
            input_signature=[tf.TensorSpec((None, *SHAPES[rank]), tf.float32)],
            autograph=False,
        )
        tf.saved_model.save(module, str(tmp_path / f"{rank}.jax2tf"))
        artifacts.add(f"{rank}.jax2tf", "tf_saved_model", rank, expected)
    _check(artifacts.load_elsewhere())


@pytest.mark.export
@pytest.mark.skipif(BACKEND != "jax", reason="jax exporters")
@pytest.mark.skipif(
    not _has("jax2onnx", "onnxruntime"),
    reason="ONNX under jax needs jax2onnx and onnxruntime (tox: the jax-onnx env)",
)
def test_jax_exports_onnx(tmp_path):
    artifacts = Artifacts(tmp_path)
    for rank, model, x, expected in _cases():
        model(x)  # Keras's jax ONNX export refuses a model never called directly
        model.export(str(tmp_path / f"{rank}.onnx"), format="onnx", verbose=False)
        artifacts.add(f"{rank}.onnx", "onnx", rank, expected)
    _check(artifacts.load_elsewhere())
