"""Train a SynaNN on MNIST and write its artifacts.

    KERAS_BACKEND=jax python training/mnist.py                  # the default run
    KERAS_BACKEND=torch python training/mnist.py --model mlp --epochs 30
    python training/mnist.py --epochs 2 --steps-per-epoch 5     # a smoke run

Selection (best checkpoint, learning-rate plateaus) uses a validation split
carved from the training set; the test set is evaluated once, at the end.
Writes to --output-dir: history.csv/json, best.keras, metrics.json,
accuracy.png, loss.png, beta.png, and backup/ (the state --resume reads).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `training` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras
import numpy as np

from keras_synann import Synapse
from keras_synann.models import MODELS, get_model
from keras_synann.ops import IMPLEMENTATIONS
from training import allocator, cli, data, distribute, environment, plots, xla_flags

DEFAULTS = {
    "model": "lenet",
    "epochs": 10,
    "batch_size": 128,
    "learning_rate": 2e-3,
    "schedule": "cosine",
}
SCHEDULES = ("cosine", "step", "constant", "plateau")
MIXED_POLICIES = {"bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
#: Testing hook: SIGKILL this process after this many completed epochs.
KILL_ENV = "SYNANN_KILL_AFTER_EPOCH"
#: Testing hook, "CODE@PROCESS": that process exits with CODE once it has done
#: everything (tests of the Cloud TPU tool's per-worker exit statuses).
EXIT_ENV = "SYNANN_TEST_EXIT"


class UsageError(Exception):
    """A bad command-line argument (one-line message)."""


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        prog="mnist.py",
        description=(
            "Train a Synaptic Neural Network on MNIST with the backend in "
            "KERAS_BACKEND (jax, tensorflow or torch)."
        ),
        epilog=(
            "Default: lenet, 10 epochs, Adam 2e-3 with cosine decay, batch 128, "
            "55,000/5,000 train/validation split (README.md: measured accuracy "
            "and time)."
        ),
    )
    add = p.add_argument
    add(
        "--model",
        default=DEFAULTS["model"],
        choices=tuple(MODELS),
        help="(default: %(default)s)",
    )
    add("--epochs", type=int, default=DEFAULTS["epochs"], help="(default: %(default)s)")
    add(
        "--batch-size",
        type=int,
        default=DEFAULTS["batch_size"],
        help="global batch size, split across replicas (default: %(default)s)",
    )
    add(
        "--learning-rate",
        type=float,
        default=DEFAULTS["learning_rate"],
        help="Adam's (initial) learning rate (default: %(default)s)",
    )
    add(
        "--schedule",
        default=DEFAULTS["schedule"],
        choices=SCHEDULES,
        help="learning-rate schedule: cosine (decay to 1%% over the run), step "
        "(/10 at 40%% and again at 80%% of the epochs), constant, or plateau "
        "(x0.2 after 5 epochs without validation-loss progress, as the "
        "reference) (default: %(default)s)",
    )
    add(
        "--source",
        default="idx",
        choices=("idx", "tfds"),
        help="idx: the MNIST IDX files in --data-dir; tfds: tensorflow-datasets "
        "(default: %(default)s)",
    )
    add(
        "--data-dir",
        help=f"IDX files with a SHA256SUMS (default: ${data.DATA_DIR_ENV}, else "
        "the carried training/data/mnist); for tfds, its data_dir (e.g. gs://...)",
    )
    add(
        "--val-size",
        type=int,
        default=5000,
        help="validation samples carved from the training set (default: %(default)s)",
    )
    add("--output-dir", help="artifacts (default: runs/<model>-<backend>)")
    add(
        "--seed",
        type=int,
        default=0,
        help="seeds weights, shuffling and the validation split (default: %(default)s)",
    )
    add(
        "--distribution",
        default="auto",
        help="distribution strategy (training/distribute/) (default: %(default)s)",
    )
    add(
        "--steps-per-epoch",
        type=int,
        help="train on only this many batches per epoch (smoke runs)",
    )
    add(
        "--mixed-precision",
        nargs="?",
        const="bfloat16",
        choices=tuple(MIXED_POLICIES),
        help="compute in bfloat16 (or float16), keep weights in float32",
    )
    add(
        "--dense-baseline",
        action="store_true",
        help="put keras.layers.Dense where the Synapse layer is (for comparisons)",
    )
    add(
        "--implementation",
        default="auto",
        choices=IMPLEMENTATIONS,
        help="how the Synapse layer computes (default: %(default)s, the fastest "
        "measured for the device; see keras_synann.ops.log_inhibition)",
    )
    add(
        "--series-order",
        type=int,
        default=None,
        metavar="K",
        help="approximate the Synapse layer's log-sum by its Taylor series to "
        "order K, computed as matmuls (faster, not exact; see "
        "keras_synann.ops.log_inhibition_series); default: exact",
    )
    add(
        "--jit-compile",
        default="auto",
        choices=("auto", "on", "off"),
        help="compile the train step (XLA on jax and tensorflow, torch.compile on "
        "torch); auto: Keras's choice, which leaves tensorflow on CPU and torch "
        "uncompiled (default: %(default)s)",
    )
    add(
        "--tensorboard",
        nargs="?",
        const="",
        metavar="LOGDIR",
        help="write TensorBoard logs (Keras's callback; needs TensorFlow installed) "
        "into LOGDIR, a local path or gs://... (default: OUTPUT_DIR/tensorboard)",
    )
    add(
        "--resume",
        action="store_true",
        help="continue from the last completed epoch in --output-dir",
    )
    add(
        "--verbose",
        type=int,
        choices=(0, 1, 2),
        help="Keras fit verbosity: 0 silent, 1 progress bar, 2 one line per epoch "
        "(default: 1 in a terminal, else 2, as in log files)",
    )
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for name in ("epochs", "batch_size", "val_size"):
        if getattr(args, name) < 1:
            raise UsageError(
                f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
            )
    for name in ("steps_per_epoch", "series_order"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.series_order is not None and args.implementation != "auto":
        raise UsageError(
            "--implementation selects a kernel for the exact layer; it does not "
            f"combine with --series-order (got --implementation {args.implementation})"
        )
    if args.series_order is not None and args.dense_baseline:
        raise UsageError(
            "--series-order applies to the Synapse layer, not --dense-baseline"
        )
    if not (args.learning_rate > 0 and math.isfinite(args.learning_rate)):
        raise UsageError(
            f"--learning-rate must be a positive number, got {args.learning_rate}"
        )
    if args.verbose is None:
        args.verbose = 1 if sys.stdout.isatty() else 2
    if args.output_dir is None:
        args.output_dir = f"runs/{args.model}-{keras.backend.backend()}"
    if args.tensorboard == "":
        args.tensorboard = str(Path(args.output_dir) / "tensorboard")
    return args


def learning_rate(args, steps_per_epoch: int):
    """A float (constant, plateau) or a per-step schedule, so resuming is exact."""
    total = args.epochs * steps_per_epoch
    lr = args.learning_rate
    if args.schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(lr, total, alpha=0.01)
    if args.schedule == "step":
        bounds = [max(1, int(total * 0.4)), max(2, int(total * 0.8))]
        return keras.optimizers.schedules.PiecewiseConstantDecay(
            bounds, [lr, lr / 10, lr / 100]
        )
    return lr


class EpochLog(keras.callbacks.Callback):
    """Appends one row per epoch (metrics, learning rate, seconds) and writes
    history.csv and history.json after each epoch."""

    def __init__(self, output_dir: Path, rows: list[dict], write: bool = True):
        super().__init__()
        self.output_dir = output_dir
        self.rows = rows
        self.write = write

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch + 1}
        row.update({k: float(v) for k, v in (logs or {}).items()})
        lr = self.model.optimizer.learning_rate
        row["learning_rate"] = float(keras.ops.convert_to_numpy(lr))
        row["seconds"] = time.perf_counter() - self._start
        self.rows.append(row)
        if self.write:
            write_history(self.output_dir, self.rows)


class KillAfterEpoch(keras.callbacks.Callback):
    """Testing hook: SIGKILLs the process once `epochs` epochs are complete."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 >= self.epochs:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_history(output_dir: Path, rows: list[dict]) -> None:
    _atomic_write(output_dir / "history.json", json.dumps(rows, indent=1) + "\n")
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = [",".join(keys)]
    lines += [",".join(str(row.get(k, "")) for k in keys) for row in rows]
    _atomic_write(output_dir / "history.csv", "\n".join(lines) + "\n")


def read_history(output_dir: Path) -> list[dict]:
    path = output_dir / "history.json"
    return json.loads(path.read_text()) if path.is_file() else []


def backup_epoch(backup_dir: Path) -> int:
    """The number of completed epochs the backup holds (0 if none)."""
    path = backup_dir / "training_metadata.json"
    return int(json.loads(path.read_text())["epoch"]) if path.is_file() else 0


def set_seed(seed: int) -> None:
    """`keras.utils.set_random_seed`, without importing TensorFlow on jax/torch
    (that function seeds TensorFlow too whenever it can import it)."""
    hide = keras.backend.backend() != "tensorflow" and "tensorflow" not in sys.modules
    if hide:
        sys.modules["tensorflow"] = None  # makes `import tensorflow` fail
    try:
        keras.utils.set_random_seed(seed)
    finally:
        if hide:
            del sys.modules["tensorflow"]


def load_data(args) -> tuple[data.Splits, int]:
    """The splits, the training set cut to --steps-per-epoch batches when
    given, and the number of steps per epoch."""
    if args.source == "tfds":
        splits = data.load_tfds(args.data_dir, val_size=args.val_size, seed=args.seed)
    else:
        splits = data.load_mnist(args.data_dir, val_size=args.val_size, seed=args.seed)
    if args.steps_per_epoch is not None:
        n = min(len(splits.y_train), args.steps_per_epoch * args.batch_size)
        splits.x_train, splits.y_train = splits.x_train[:n], splits.y_train[:n]
    return splits, math.ceil(len(splits.y_train) / args.batch_size)


def set_precision(args) -> None:
    """The dtype policy: float32, or mixed bfloat16/float16 compute."""
    policy = MIXED_POLICIES.get(args.mixed_precision, "float32")
    keras.config.set_dtype_policy(policy)


def resolve_strategy(args) -> distribute.Strategy:
    """Resolves --distribution and checks the batch against it (one-line errors)."""
    try:
        strategy = distribute.resolve(args.distribution)
    except Exception as e:
        message = " ".join(str(e).split())
        raise UsageError(
            f"distribution {args.distribution!r} cannot run here: {message}"
        ) from None
    try:
        strategy.check_batch(args.batch_size)
    except ValueError as e:
        raise UsageError(f"--{e}") from None
    if args.resume and not strategy.can_resume:
        raise UsageError(
            f"--resume is not supported with {strategy.process_count} jax "
            "processes (only the chief holds the backup); rerun without --resume"
        )
    return strategy


def prepare_output(args, strategy) -> tuple[Path, int, list[dict]]:
    """The output directory (created by the chief), the epochs already
    completed and their history rows (with --resume), else (out, 0, [])."""
    out = Path(args.output_dir)
    backup_dir = out / "backup"
    if strategy.is_chief:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(
                f"--output-dir {out} cannot be created: {e.strerror or e}"
            ) from None
    if not args.resume:
        if strategy.is_chief and backup_dir.exists():
            shutil.rmtree(backup_dir)  # a fresh run must not restore an old state
        return out, 0, []
    initial_epoch = backup_epoch(backup_dir)
    if initial_epoch > args.epochs:
        raise UsageError(
            f"{out} already holds {initial_epoch} epochs; --epochs {args.epochs} is fewer"
        )
    if initial_epoch == 0:
        print(f"Nothing to resume in {out} (no completed epoch); starting at epoch 1.")
        return out, 0, []
    rows = [row for row in read_history(out) if row["epoch"] <= initial_epoch]
    print(f"Resuming {out} after epoch {initial_epoch} of {args.epochs}.")
    return out, initial_epoch, rows


def build_model(args, strategy, steps_per_epoch: int):
    """The compiled model, built in the strategy's scope."""
    with strategy.scope():
        model = get_model(
            args.model,
            synapse=not args.dense_baseline,
            implementation=args.implementation,
            series_order=args.series_order,
        )
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate(args, steps_per_epoch)),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            jit_compile={"auto": "auto", "on": True, "off": False}[args.jit_compile],
        )
    return model


def make_callbacks(args, strategy, out: Path, rows: list[dict]) -> list:
    """Learning-rate plateaus, the epoch log and, on the chief only, the best
    checkpoint, the backup --resume reads and TensorBoard."""
    callbacks = []
    if args.schedule == "plateau":
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss", factor=0.2, patience=5, min_lr=1e-5
            )
        )
    callbacks.append(EpochLog(out, rows, write=strategy.is_chief))
    if strategy.is_chief:
        best_so_far = max((row.get("val_accuracy", -1.0) for row in rows), default=None)
        callbacks += [
            keras.callbacks.ModelCheckpoint(
                str(out / "best.keras"),
                monitor="val_accuracy",
                mode="max",
                save_best_only=True,
                initial_value_threshold=best_so_far,
            ),
            keras.callbacks.BackupAndRestore(
                str(out / "backup"), delete_checkpoint=False
            ),
        ]
        if args.tensorboard:
            callbacks.append(keras.callbacks.TensorBoard(args.tensorboard))
    if os.environ.get(KILL_ENV):
        callbacks.append(KillAfterEpoch(int(os.environ[KILL_ENV])))
    return callbacks


def check_tensorboard(args) -> None:
    """--tensorboard writes through tf.summary: TensorFlow and TensorBoard."""
    import importlib.util

    if not args.tensorboard:
        return
    missing = [
        name
        for name in ("tensorflow", "tensorboard")
        if importlib.util.find_spec(name) is None
    ]
    if missing:
        raise UsageError(
            "--tensorboard writes through TensorFlow's tf.summary, which needs "
            f"{' and '.join(missing)}: pip install '.[tensorboard]', or leave out "
            "--tensorboard"
        )


def evaluate(args, strategy, model, splits: data.Splits, rows: list[dict]) -> dict:
    """Validation and test metrics of `model`, its predictions for ten test
    images, and the run's settings: the contents of metrics.json."""
    eval_batch = 512 * strategy.num_replicas
    val = strategy.evaluate(model, splits.x_val, splits.y_val, batch_size=eval_batch)
    test = strategy.evaluate(model, splits.x_test, splits.y_test, batch_size=eval_batch)
    best_epoch = (
        max(rows, key=lambda r: r.get("val_accuracy", -1.0))["epoch"] if rows else 0
    )
    print(f"Best epoch (validation): {best_epoch}; val accuracy {val['accuracy']:.4%}")
    print(f"Test accuracy: {test['accuracy']:.4%} (loss {test['loss']:.4f})")
    sample = slice(0, 10)
    logits = strategy.predict(model, splits.x_test[sample], batch_size=eval_batch)
    predicted = np.argmax(logits, axis=-1).tolist()
    labels = splits.y_test[sample].tolist()
    print(f"Predicted {predicted} for test samples 0-9 labelled {labels}")
    train_seconds = sum(row["seconds"] for row in rows)
    return {
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "val_accuracy": val["accuracy"],
        "val_loss": val["loss"],
        "best_epoch": best_epoch,
        "epochs": len(rows),
        "model": args.model,
        "synapse": not args.dense_baseline,
        "series_order": args.series_order,
        "backend": keras.backend.backend(),
        "distribution": strategy.name,
        "process_count": strategy.process_count,
        "devices": list(strategy.devices),
        "num_replicas": strategy.num_replicas,
        "train_seconds": round(train_seconds, 2),
        "seconds_per_epoch": round(train_seconds / max(1, len(rows)), 2),
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "schedule": args.schedule,
        "mixed_precision": args.mixed_precision,
        "compute_dtype": keras.config.dtype_policy().compute_dtype,
        "seed": args.seed,
        "source": args.source,
        "samples": splits.sizes(),
        "environment": environment.versions(keras.backend.backend()),
        "keras_version": keras.__version__,
        # What main() set up for the CPU (allocator.py, xla_flags.py).
        "cpu_settings": getattr(args, "cpu_settings", {}),
    }


def run(args, strategy: distribute.Strategy) -> dict:
    """Trains, restores the best checkpoint, evaluates on test, writes artifacts."""
    check_tensorboard(args)
    out, initial_epoch, rows = prepare_output(args, strategy)
    splits, steps_per_epoch = load_data(args)
    # A resumed run draws new random numbers (shuffles, dropout masks) rather
    # than replaying those of its first epochs; it matches an uninterrupted
    # run within noise, not bit for bit.
    set_seed(args.seed + initial_epoch)
    model = build_model(args, strategy, steps_per_epoch)
    callbacks = make_callbacks(args, strategy, out, rows)
    print(
        f"Training {args.model} on {keras.backend.backend()} ({strategy.name}, "
        f"{strategy.num_replicas} replica(s)); train/val/test = "
        + "/".join(str(n) for n in splits.sizes().values())
        + f", epochs {initial_epoch + 1}..{args.epochs}."
    )
    strategy.fit(
        model,
        splits.x_train,
        splits.y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(splits.x_val, splits.y_val),
        callbacks=callbacks,
        initial_epoch=initial_epoch,
        verbose=args.verbose,
    )
    # Every process reports the chief's best checkpoint.
    model = strategy.restore_best(model, out / "best.keras")
    metrics = evaluate(args, strategy, model, splits, rows)
    if strategy.is_chief:
        write_artifacts(out, model, rows, metrics)
    return metrics


def write_artifacts(out: Path, model, rows: list[dict], metrics: dict) -> None:
    _atomic_write(out / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    title = f"{metrics['model']} ({metrics['backend']})"
    plots.curve(rows, "accuracy", out / "accuracy.png", f"{title}: accuracy")
    plots.curve(rows, "loss", out / "loss.png", f"{title}: loss")
    synapses = [layer for layer in model.layers if isinstance(layer, Synapse)]
    if synapses:
        beta = keras.ops.convert_to_numpy(synapses[0].beta)
        plots.beta_heatmap(beta, out / "beta.png", f"{title}: learned beta")
    print(f"Wrote {out}/metrics.json, history.csv, best.keras and plots.")


def check_environment() -> None:
    """With SYNANN_PINS=FILE, stop unless the installed versions are FILE's."""
    pins = os.environ.get(environment.PINS_ENV)
    if pins:
        environment.check_pins(pins)


def main(argv=None) -> int:
    # Before jax starts its backend; both are off with SYNANN_MALLOC=0 and
    # SYNANN_XLA_FLAGS=0 (training/allocator.py, training/xla_flags.py).
    cpu_settings = {"malloc": allocator.tune_malloc()}
    xla_flags_before = os.environ.get("XLA_FLAGS")
    cpu_settings["xla_flags"] = xla_flags.tune_xla_cpu(keras.backend.backend())
    strategy = None
    try:
        args = parse_args(argv)
        args.cpu_settings = cpu_settings
        check_environment()
        set_precision(args)
        strategy = resolve_strategy(args)
        print(
            environment.banner(
                keras.backend.backend(),
                strategy.process_index,
                strategy.process_count,
                strategy.devices,
            ),
            flush=True,
        )
        run(args, strategy)
        code, _, process = os.environ.get(EXIT_ENV, "").partition("@")
        if code and int(process or 0) == strategy.process_index:
            print(f"{EXIT_ENV}: exiting with {code} as asked", file=sys.stderr)
            return int(code)
    except (UsageError, data.DataError, environment.PinMismatch) as e:
        cli.error("mnist.py", e)
        return 2 if isinstance(e, UsageError) else 1
    finally:
        if strategy is not None:
            strategy.close()
        _restore_env("XLA_FLAGS", xla_flags_before)  # for callers in this process
    return 0


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


if __name__ == "__main__":
    sys.exit(main())
