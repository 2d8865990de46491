"""training/mnist.py end to end on tiny synthetic IDX files, and its flags
(training/cli.py).

Most runs call `main()` in this process (fast); the checks of the flags call
the parser; a subprocess runs the script as users do (`python
training/mnist.py`), once to the end and once killed mid-training.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import faults
import keras
import numpy as np
import pytest

from training import cli, mnist, xla_flags

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "mnist.py"
METRIC_KEYS = {
    "test_accuracy",
    "val_accuracy",
    "epochs",
    "model",
    "backend",
    "devices",
    "train_seconds",
    "cpu_settings",
}


def _args(mnist_dir, out, *extra):
    return [
        "--data-dir", str(mnist_dir), "--output-dir", str(out), "--val-size", "16",
        "--batch-size", "16", "--verbose", "0", *extra,
    ]  # fmt: skip


def _script(args, env=None, timeout=300):
    env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _accuracy(model_path, mnist_dir) -> float:
    """Accuracy of a saved model on the test files, computed here."""
    from training import data

    splits = data.load_mnist(mnist_dir, val_size=16)
    logits = keras.saving.load_model(model_path).predict(splits.x_test, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == splits.y_test))


def _epochs(out):
    return [row["epoch"] for row in json.loads((out / "history.json").read_text())]


def test_script_end_to_end(mnist_dir, tmp_path):
    """The script as users run it: its outputs, and a finished run's status
    (the stall watchdog on, its bound derived)."""
    out = tmp_path / "run"
    result = _script(_args(mnist_dir, out, "--epochs", "2", "--steps-per-epoch", "2"))
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((out / "status.json").read_text())
    assert record["status"] == "ok" and record["exit"] == 0
    assert "Test accuracy:" in result.stdout and "Predicted" in result.stdout
    for name in ("best.keras", "history.csv", "history.json", "metrics.json"):
        assert (out / name).is_file(), name
    for name in ("accuracy.png", "loss.png", "beta.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    metrics = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    assert metrics["model"] == "lenet" and metrics["epochs"] == 2
    assert metrics["backend"] == keras.backend.backend()
    assert metrics["samples"]["train"] == 32  # 2 steps of 16
    assert metrics["process_count"] == 1 and metrics["devices"]
    # The XLA flags the script set for itself (jax on a recent jaxlib), as
    # training/xla_flags.py decides for this environment.
    expected_flags = xla_flags.tune_xla_cpu(keras.backend.backend(), dict(os.environ))
    assert metrics["cpu_settings"]["xla_flags"] == expected_flags
    # The reported test accuracy is the best checkpoint's on the test files.
    assert metrics["test_accuracy"] == pytest.approx(
        _accuracy(out / "best.keras", mnist_dir), abs=1e-6
    )
    assert f"Test accuracy: {metrics['test_accuracy']:.4%}" in result.stdout
    assert result.stdout.startswith("Environment: python ")  # the log's first line
    header = (out / "history.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "accuracy", "val_accuracy", "loss", "val_loss"} <= set(header)
    assert _epochs(out) == [1, 2]


def test_mlp_learns_and_leaves_tensorflow_alone(mnist_dir, tmp_path, capsys):
    out = tmp_path / "mlp"
    tf_loaded = "tensorflow" in sys.modules
    xla_flags_before = os.environ.get("XLA_FLAGS")
    code = mnist.main(
        _args(
            mnist_dir, out, "--model", "mlp", "--epochs", "6", "--learning-rate", "0.01"
        )
    )
    assert code == 0
    assert os.environ.get("XLA_FLAGS") == xla_flags_before  # main() restored it
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_accuracy"] >= 0.5  # the synthetic classes are easy
    assert "Test accuracy:" in capsys.readouterr().out
    if keras.backend.backend() != "tensorflow" and not tf_loaded:
        assert "tensorflow" not in sys.modules


def test_dense_baseline_has_no_beta_heatmap(mnist_dir, tmp_path):
    out = tmp_path / "dense"
    args = _args(mnist_dir, out, "--model", "mlp", "--epochs", "1", "--dense-baseline")
    assert mnist.main(args) == 0
    assert json.loads((out / "metrics.json").read_text())["synapse"] is False
    assert (out / "accuracy.png").is_file() and not (out / "beta.png").exists()


def test_series_order_run(mnist_dir, tmp_path):
    out = tmp_path / "series"
    args = _args(
        mnist_dir, out, "--model", "mlp", "--epochs", "1", "--series-order", "3"
    )
    assert mnist.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["series_order"] == 3 and metrics["synapse"] is True
    model = keras.saving.load_model(out / "best.keras")
    assert model.get_layer("synapse").series_order == 3


def test_mixed_precision_run(mnist_dir, tmp_path):
    out = tmp_path / "bf16"
    args = _args(mnist_dir, out, "--model", "mlp", "--epochs", "1", "--mixed-precision")
    assert mnist.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mixed_precision"] == "bfloat16"
    assert metrics["compute_dtype"] == "bfloat16"
    model = keras.saving.load_model(out / "best.keras")
    assert model.dtype_policy.name == "mixed_bfloat16"
    assert model.get_layer("synapse").compute_dtype == "bfloat16"
    assert model.get_layer("synapse").kernel.dtype == "float32"


def test_tfds_source(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    out = tmp_path / "tfds"
    args = ["--source", "tfds", "--val-size", "8", "--batch-size", "16"]
    args += [
        "--model",
        "mlp",
        "--epochs",
        "1",
        "--output-dir",
        str(out),
        "--verbose",
        "0",
    ]
    with tfds.testing.mock_data(num_examples=40):
        assert mnist.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["source"] == "tfds" and metrics["samples"]["test"] == 40


def test_resume_after_kill(mnist_dir, tmp_path):
    out = tmp_path / "resumed"
    args = _args(mnist_dir, out, "--model", "mlp", "--epochs", "3")
    killed = _script([*args, *faults.spec("kill_after(1)")])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert _epochs(out) == [1] and not (out / "metrics.json").exists()
    first = json.loads((out / "history.json").read_text())[0]

    assert mnist.main([*args, "--resume"]) == 0
    rows = json.loads((out / "history.json").read_text())
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert rows[0] == first  # the completed epoch is kept, not re-run
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 3

    # Resuming a finished run trains nothing more and reports the same run.
    assert mnist.main([*args, "--resume"]) == 0
    assert _epochs(out) == [1, 2, 3]


def test_fresh_run_ignores_old_backup(mnist_dir, tmp_path):
    out = tmp_path / "fresh"
    args = _args(mnist_dir, out, "--model", "mlp", "--epochs", "1")
    assert mnist.main(args) == 0
    assert mnist.main(args) == 0  # without --resume: starts again at epoch 1
    assert _epochs(out) == [1]


@pytest.mark.any_backend
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--epochs", "-1"], "--epochs must be >= 1"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--learning-rate", "0"], "--learning-rate must be a positive number"),
        (["--series-order", "0"], "--series-order must be >= 1"),
        (
            ["--series-order", "2", "--implementation", "ops"],
            "does not combine with --series-order",
        ),
        (["--series-order", "2", "--dense-baseline"], "not --dense-baseline"),
        (["--momentum", "0.5"], "--momentum applies to --optimizer sgd only"),
        (["--optimizer", "sgd", "--momentum", "1"], "--momentum must be in [0, 1)"),
        (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
        (["--filters", "10"], "--filters takes two positive integers"),
        (["--model", "mlp", "--filters", "10,20"], "applies to --model lenet"),
        (["--callbacks", "no_colon"], "is not MODULE:NAME or MODULE:NAME(ARGS)"),
        (["--callbacks", "m:f(x)"], "must be Python literals"),
    ],
)
def test_bad_arguments(extra, message):
    with pytest.raises(cli.UsageError) as error:
        cli.parse_args(extra)
    assert "\n" not in str(error.value) and message in str(error.value)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--learning-rate", "0"], "--learning-rate must be a positive number"),
        (
            ["--distribution", "no-such-strategy"],
            "distribution 'no-such-strategy' cannot run here",
        ),
    ],
)
def test_bad_arguments_are_one_line_with_status_2(
    mnist_dir, tmp_path, capsys, extra, message
):
    out = tmp_path / "bad"
    code = mnist.main(_args(mnist_dir, out, *extra))
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and message in err, err
    # Read from the flags, the status file says so too.
    record = json.loads((out / "status.json").read_text())
    assert (record["status"], record["exit"]) == ("usage", 2)


@pytest.mark.any_backend
def test_callbacks_from_the_command_line_join_fit(mnist_dir, tmp_path):
    """--callbacks MODULE:NAME(ARGS), as docs/training.md shows it: Keras's
    EarlyStopping, made with those arguments, stops the run after epoch 2."""
    out = tmp_path / "early"
    spec = 'keras.callbacks:EarlyStopping(monitor="loss", min_delta=100, patience=0)'
    args = _args(mnist_dir, out, "--model", "mlp", "--epochs", "5")
    assert mnist.main([*args, "--callbacks", spec]) == 0
    assert _epochs(out) == [1, 2]


@pytest.mark.any_backend
@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module_xyz:f", "No module named 'no_such_module_xyz'"),
        ("keras.callbacks:NoSuchCallback", "keras.callbacks has no 'NoSuchCallback'"),
        ("keras.callbacks:EarlyStopping(bogus=1)", "unexpected keyword argument"),
        ("keras.layers:Dense(3)", "gave a Dense, not a keras.callbacks.Callback"),
        ("missing_file.py:f", "no such file"),
    ],
)
def test_callbacks_that_name_no_callback_are_one_line_errors(spec, message):
    from training import callbacks

    with pytest.raises(cli.UsageError, match=message) as error:
        callbacks.load(spec)
    assert "\n" not in str(error.value)


def test_the_reference_pytorch_recipe_from_flags(mnist_dir, tmp_path):
    """SGD with momentum and the reference LeNet's filters (10, 20) and
    dropout (0.5), as the reference PyTorch script trains."""
    out = tmp_path / "reference"
    recipe = [
        "--optimizer", "sgd", "--momentum", "0.5", "--learning-rate", "0.012",
        "--schedule", "constant", "--filters", "10,20", "--dropout", "0.5",
        "--epochs", "1",
    ]  # fmt: skip
    assert mnist.main(_args(mnist_dir, out, *recipe)) == 0
    model = keras.saving.load_model(out / "best.keras")
    assert model.get_layer("conv1").filters == 10
    assert model.get_layer("conv2").filters == 20
    assert model.get_layer("dropout").rate == 0.5
    assert model.get_layer("dropout2d").rate == 0.5
    optimizer = model.optimizer.get_config()
    assert isinstance(model.optimizer, keras.optimizers.SGD)
    assert optimizer["momentum"] == 0.5
    assert optimizer["learning_rate"] == pytest.approx(0.012)


@pytest.mark.any_backend
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "many"], "invalid int value"),
        (["--model", "resnet"], "argument --model: invalid choice: 'resnet'"),
        (["--schedule", "wobbly"], "argument --schedule: invalid choice: 'wobbly'"),
    ],
)
def test_argparse_errors_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def _corrupt_labels(directory):
    path = directory / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-4] + b"\x00\x00\x00\x00")


def _label_ten(directory):
    import hashlib

    from conftest import write_idx

    name = "t10k-labels-idx1-ubyte.gz"
    write_idx(directory / name, [10] * 32)
    digest = hashlib.sha256((directory / name).read_bytes()).hexdigest()
    sums = [
        line if not line.endswith(name) else f"{digest}  {name}"
        for line in (directory / "SHA256SUMS").read_text().splitlines()
    ]
    (directory / "SHA256SUMS").write_text("\n".join(sums) + "\n")


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda d: d.rename(d.with_name("gone")), "does not exist"),
        (_corrupt_labels, "checksum mismatch"),
        (lambda d: (d / "SHA256SUMS").unlink(), "SHA256SUMS"),
        (_label_ten, "test labels out of range"),
    ],
)
def test_bad_data(mnist_dir, tmp_path, capsys, spoil, message):
    spoil(mnist_dir)
    code = mnist.main(_args(mnist_dir, tmp_path / "bad", "--model", "mlp"))
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and message in err, err


@pytest.mark.any_backend
def test_script_bad_argument_exit_code(tmp_path):
    result = _script(["--model", "resnet", "--output-dir", str(tmp_path)], timeout=120)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("mnist.py: error: argument --model: invalid choice")
    )


@pytest.mark.any_backend
def test_a_backend_keras_cannot_load_is_one_line():
    result = _script(["--epochs", "1"], env={"KERAS_BACKEND": "no_such_backend"})
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("mnist.py: error: Keras cannot load its backend")
    assert "set KERAS_BACKEND to an installed one" in line


@pytest.mark.any_backend
def test_help_lists_the_options():
    text = cli.build_parser().format_help()
    for flag in (
        "--model", "--epochs", "--batch-size", "--learning-rate", "--schedule",
        "--data-dir", "--output-dir", "--seed", "--distribution",
        "--steps-per-epoch", "--mixed-precision", "--resume", "--source",
        "--series-order", "--stall-timeout", "--status-file", "--callbacks",
    ):  # fmt: skip
        assert flag in text


@pytest.mark.any_backend
def test_the_batch_size_cloud_checks_is_the_scripts():
    """cloud/ reads --batch-size with this parser (its abbreviation and
    default included) and looks at nothing else."""
    assert cli.batch_size([]) == cli.build_parser().get_default("batch_size")
    assert cli.batch_size(["x; y", "--batch-size=512", "--unknown", "1"]) == 512
    assert cli.batch_size(["--batch", "96", "--epochs", "2"]) == 96
    with pytest.raises(cli.UsageError, match="--batch-size must be >= 1, got 0"):
        cli.batch_size(["--batch-size", "0"])
    with pytest.raises(cli.UsageError, match="invalid int value: 'x'"):
        cli.batch_size(["--batch-size", "x"])


@pytest.mark.any_backend
def test_output_dir_that_cannot_be_made_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = mnist.main(["--output-dir", str(blocker / "x"), "--model", "mlp"])
    assert code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"mnist.py: error: --output-dir {blocker / 'x'}")
    assert "cannot be created" in lines[-1]
    assert "Traceback" not in err


def test_resume_with_nothing_to_resume_says_so(mnist_dir, tmp_path, capsys):
    out = tmp_path / "new"
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    extra = ["--tensorboard"] if tensorboard else []
    args = _args(mnist_dir, out, "--model", "mlp", "--epochs", "1", "--resume")
    assert mnist.main([*args, *extra]) == 0
    printed = capsys.readouterr().out
    assert f"Nothing to resume in {out} (no completed epoch)" in printed
    assert _epochs(out) == [1]
    if tensorboard:
        events = list((out / "tensorboard").rglob("events.out.tfevents*"))
        assert events, sorted(p.name for p in out.rglob("*"))


@pytest.mark.any_backend
def test_tensorboard_without_tensorboard_is_one_line(mnist_dir, tmp_path, capsys):
    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed: --tensorboard works")
    code = mnist.main(_args(mnist_dir, tmp_path / "tb", "--tensorboard"))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "pip install '.[tensorboard]'" in err


#: Runs training/mnist.py with TensorFlow unimportable, as where only the
#: tensorboard package is installed.
_WITHOUT_TENSORFLOW = """
import runpy, sys
sys.modules["tensorflow"] = None  # `import tensorflow` raises ImportError
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    assert sys.modules.get("tensorflow") is None, "TensorFlow was imported"
"""


@pytest.mark.any_backend  # training/callbacks.py's writer, the same under jax and torch
@pytest.mark.skipif(
    keras.backend.backend() == "tensorflow",
    reason="under tensorflow, Keras's own TensorBoard callback writes the logs",
)
def test_tensorboard_logs_without_tensorflow_read_back(mnist_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )

    out, logdir = tmp_path / "run", tmp_path / "logs"
    args = _args(mnist_dir, out, "--model", "mlp", "--epochs", "2")
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TENSORFLOW, str(SCRIPT), *args,
         "--tensorboard", str(logdir)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((out / "history.json").read_text())
    for split, prefix in (("train", ""), ("validation", "val_")):
        events = EventAccumulator(str(logdir / split))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        assert {"epoch_loss", "epoch_accuracy"} <= tags, tags
        for metric in ("loss", "accuracy"):
            scalars = events.Scalars(f"epoch_{metric}")
            assert [s.step for s in scalars] == [0, 1]
            np.testing.assert_allclose(
                [s.value for s in scalars],
                [row[prefix + metric] for row in history],
                rtol=1e-6,
            )
    events = EventAccumulator(str(logdir / "train"))
    events.Reload()
    rates = [s.value for s in events.Scalars("epoch_learning_rate")]
    np.testing.assert_allclose(rates, [row["learning_rate"] for row in history])


@pytest.mark.any_backend
def test_pinned_versions_are_checked_before_training(
    mnist_dir, tmp_path, capsys, monkeypatch
):
    from training import environment

    pins = tmp_path / "pins.txt"
    pins.write_text(f"keras=={keras.__version__}\nnumpy==0.0.1\n")
    out = tmp_path / "pinned"
    monkeypatch.setenv(environment.PINS_ENV, str(pins))
    assert mnist.main(_args(mnist_dir, out, "--model", "mlp")) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("mnist.py: error: this environment is not the tested one")
    assert f"numpy {np.__version__} (pinned 0.0.1)" in last and "keras" not in last
    assert not (out / "history.json").exists()  # stopped before training
