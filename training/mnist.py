"""Train a SynaNN on MNIST and write its artifacts.

    KERAS_BACKEND=jax python training/mnist.py                  # the default run
    KERAS_BACKEND=torch python training/mnist.py --model mlp --epochs 30
    python training/mnist.py --epochs 2 --steps-per-epoch 5     # a smoke run

Selection (best checkpoint, learning-rate plateaus) uses a validation split
carved from the training set; the test set is evaluated once, at the end.
Writes to --output-dir: history.csv/json, best.keras, metrics.json,
accuracy.png, loss.png, beta.png, and backup/ (the state --resume reads).
With --checkpoint-dir (jax), every epoch's complete training state goes there
instead of backup/, written by all processes together, and --resume continues
from it with any number of processes (training/checkpoints.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `training` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras
import numpy as np

from keras_synann import Synapse
from keras_synann.models import MODELS, get_model
from keras_synann.ops import IMPLEMENTATIONS
from training import (
    allocator,
    callbacks,
    checkpoints,
    cli,
    data,
    distribute,
    environment,
    history,
    plots,
    preemption,
    stall,
    status,
    xla_flags,
)
from training.distribute import cluster

DEFAULTS = {
    "model": "lenet",
    "epochs": 10,
    "batch_size": 128,
    "learning_rate": 2e-3,
    "schedule": "cosine",
}
SCHEDULES = ("cosine", "step", "constant", "plateau")
MIXED_POLICIES = {"bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
KILL_ENV = callbacks.KILL_ENV
FAULT_ENV = callbacks.FAULT_ENV
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
            "55,000/5,000 train/validation split (docs/training.md: measured accuracy "
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
        help="the optimizer's (initial) learning rate (default: %(default)s)",
    )
    add(
        "--optimizer",
        default="adam",
        choices=("adam", "sgd"),
        help="adam, or sgd (the reference PyTorch recipe: --optimizer sgd "
        "--momentum 0.5 --learning-rate 0.012 --schedule constant) "
        "(default: %(default)s)",
    )
    add(
        "--momentum",
        type=float,
        default=None,
        metavar="M",
        help="SGD's momentum, in [0, 1) (default: 0; only with --optimizer sgd)",
    )
    add(
        "--filters",
        default=None,
        metavar="A,B",
        help="lenet's two convolutions' filters (default: 16,32; the reference "
        "PyTorch net: 10,20)",
    )
    add(
        "--dropout",
        type=float,
        default=None,
        metavar="P",
        help="the model's dropout rate, in [0, 1) (default: the model's, 0.25; "
        "the reference PyTorch net: 0.5)",
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
        help="write TensorBoard logs into LOGDIR (default: OUTPUT_DIR/tensorboard); "
        "needs the tensorboard package (tensorflow: Keras's callback; gs://... "
        "needs TensorFlow installed)",
    )
    add(
        "--checkpoint-dir",
        metavar="URI",
        help="jax: write every epoch's training state here (a gs:// bucket, or "
        "a path every process can read), all processes together; --resume "
        "continues from it with any process count",
    )
    add(
        "--resume",
        action="store_true",
        help="continue from the last completed epoch in --checkpoint-dir, else "
        "in --output-dir (one process); with nothing to resume, start at epoch 1",
    )
    add(
        "--stall-timeout",
        default="auto",
        metavar="SECONDS",
        help="end the run (exit status 75) when no training step completes "
        "for this long; auto: 600 s for a phase's first step (compilation), "
        "then max(60 s, 5 x the slowest step so far); 0: off "
        "(training/stall.py) (default: %(default)s)",
    )
    add(
        "--status-file",
        metavar="PATH",
        help="where each process writes how it ended, one line of JSON; "
        "{process} becomes the process index (training/status.py) "
        "(default: the chief alone, in OUTPUT_DIR/status.json)",
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
    if args.momentum is not None:
        if args.optimizer != "sgd":
            raise UsageError("--momentum applies to --optimizer sgd only")
        if not 0 <= args.momentum < 1:
            raise UsageError(f"--momentum must be in [0, 1), got {args.momentum}")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        raise UsageError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.filters is not None:
        if args.model != "lenet":
            raise UsageError(f"--filters applies to --model lenet, not {args.model}")
        try:
            args.filters = tuple(int(f) for f in args.filters.split(","))
        except ValueError:
            args.filters = ()
        if len(args.filters) != 2 or min(args.filters) < 1:
            raise UsageError("--filters takes two positive integers, e.g. 10,20")
    if not (args.learning_rate > 0 and math.isfinite(args.learning_rate)):
        raise UsageError(
            f"--learning-rate must be a positive number, got {args.learning_rate}"
        )
    try:
        args.stall_bound = stall.parse_timeout(args.stall_timeout)
    except ValueError:
        raise UsageError(
            f"--stall-timeout must be auto, 0 or a positive number of seconds, "
            f"got {args.stall_timeout!r}"
        ) from None
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
    """Resolves --distribution (joining the other processes of a multi-process
    run) and checks the batch and --checkpoint-dir against it (one-line errors)."""
    try:
        strategy = distribute.resolve(args.distribution)
    except cluster.JoinError:
        raise
    except Exception as e:
        message = " ".join(str(e).split())
        raise UsageError(
            f"distribution {args.distribution!r} cannot run here: {message}"
        ) from None
    try:
        strategy.check_batch(args.batch_size)
    except ValueError as e:
        raise UsageError(f"--{e}") from None
    if args.checkpoint_dir:
        check_checkpoint_dir(args.checkpoint_dir, strategy.backend)
    return strategy


def check_checkpoint_dir(uri: str, backend: str) -> None:
    """--checkpoint-dir needs jax and orbax-checkpoint; gs:// without
    TensorFlow needs gcsfs too (one-line errors)."""
    import importlib.util

    if backend != "jax":
        raise UsageError(
            f"--checkpoint-dir needs the jax backend (orbax-checkpoint), not "
            f"{backend}; there --resume continues from OUTPUT_DIR/backup"
        )
    if importlib.util.find_spec("orbax") is None:
        raise UsageError(
            "--checkpoint-dir needs orbax-checkpoint: pip install '.[checkpoint]' "
            "('.[gcs]' for gs:// paths)"
        )
    remote = uri.startswith("gs://")
    if remote and not any(importlib.util.find_spec(m) for m in ("gcsfs", "tensorflow")):
        raise UsageError(
            f"--checkpoint-dir {uri} needs gcsfs (or TensorFlow) to reach gs://: "
            "pip install '.[gcs]'"
        )


def prepare_output(args, strategy) -> Path:
    """The output directory, created by the chief; a fresh run (no --resume)
    removes the backup an earlier run left there."""
    out = Path(args.output_dir)
    if strategy.is_chief:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(
                f"--output-dir {out} cannot be created: {e.strerror or e}"
            ) from None
        backup_dir = out / "backup"
        if not args.resume and backup_dir.exists():
            shutil.rmtree(backup_dir)  # a fresh run must not restore an old state
    return out


def resume_epoch(args, strategy, out: Path) -> tuple[int, int]:
    """The completed epochs the run continues after (0: it starts at epoch 1)
    and the steps of the next epoch already done (a partial checkpoint saved
    when a run was stopped; else 0): with --resume, the last complete
    checkpoint in --checkpoint-dir, else the backup in --output-dir (one
    process)."""
    epoch = _resume_epoch(args, strategy, out)
    steps = 0
    if args.checkpoint_dir and args.resume and epoch < args.epochs:
        steps = checkpoints.partial_steps(args.checkpoint_dir, epoch + 1)
        steps = strategy.agree(steps)
    if steps:
        print(
            f"Resuming {args.checkpoint_dir} after epoch {epoch} and {steps} steps "
            f"of epoch {epoch + 1} (saved when a run was stopped)."
        )
    return epoch, steps


def _resume_epoch(args, strategy, out: Path) -> int:
    if args.checkpoint_dir:
        done = checkpoints.completed_epochs(args.checkpoint_dir)
        if not args.resume:
            if done:
                raise UsageError(
                    f"--checkpoint-dir {args.checkpoint_dir} already holds epochs "
                    f"up to {done[-1]} of a run; pass --resume to continue it, or "
                    "choose an empty directory"
                )
            return 0
        where, epoch = args.checkpoint_dir, strategy.agree(done[-1] if done else 0)
    elif not args.resume:
        return 0
    elif strategy.backend == "jax" and strategy.process_count > 1:
        print(
            f"Nothing to resume in {out}: with {strategy.process_count} processes "
            "--resume continues only from --checkpoint-dir; starting at epoch 1."
        )
        return 0
    else:
        where, epoch = out, backup_epoch(out / "backup")
    if epoch > args.epochs:
        raise UsageError(
            f"{where} already holds {epoch} epochs; --epochs {args.epochs} is fewer"
        )
    partial = args.checkpoint_dir and checkpoints.partial_steps(args.checkpoint_dir, 1)
    if epoch == 0 and not partial:
        print(
            f"Nothing to resume in {where} (no completed epoch); starting at epoch 1."
        )
    elif epoch:
        print(f"Resuming {where} after epoch {epoch} of {args.epochs}.")
    return epoch


def build_model(args, strategy, steps_per_epoch: int):
    """The compiled model, built in the strategy's scope."""
    with strategy.scope():
        shape = {"filters": args.filters, "dropout": args.dropout}
        model = get_model(
            args.model,
            synapse=not args.dense_baseline,
            implementation=args.implementation,
            series_order=args.series_order,
            **{k: v for k, v in shape.items() if v is not None},
        )
        rate = learning_rate(args, steps_per_epoch)
        if args.optimizer == "sgd":
            optimizer = keras.optimizers.SGD(rate, momentum=args.momentum or 0.0)
        else:
            optimizer = keras.optimizers.Adam(rate)
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            jit_compile={"auto": "auto", "on": True, "off": False}[args.jit_compile],
        )
    return model


def settings(args) -> dict:
    """The run's settings, recorded in each checkpoint."""
    keys = ("model", "epochs", "batch_size", "learning_rate", "schedule", "seed")
    keys += ("optimizer", "momentum", "filters", "dropout")
    return {k: getattr(args, k) for k in keys} | {"synapse": not args.dense_baseline}


class Training:
    """The callbacks of one run and the state they carry over from the epochs
    already completed: history rows, the best epoch (in memory when there is a
    --checkpoint-dir or several processes, else best.keras) and, with
    --checkpoint-dir, the checkpointer."""

    def __init__(
        self, args, strategy, model, out: Path, initial_epoch: int, steps: int = 0
    ):
        self.args, self.strategy, self.out = args, strategy, out
        self.save = None
        self.rows: list[dict] = []
        self.best = None
        self.checkpointer = None
        plateau_start = None
        several_jax = strategy.backend == "jax" and strategy.process_count > 1
        in_memory = bool(args.checkpoint_dir) or several_jax
        if args.checkpoint_dir:
            self.checkpointer = checkpoints.Checkpointer(args.checkpoint_dir)
        if in_memory:
            self.best = callbacks.BestWeights()
        if self.checkpointer is not None and (initial_epoch or steps):
            with strategy.scope():
                if steps:  # K steps into the next epoch
                    saved, weights = self.checkpointer.restore(
                        model, initial_epoch + 1, partial=True
                    )
                else:
                    saved, weights = self.checkpointer.restore(model, initial_epoch)
            self.rows = [row for row in saved.history if row["epoch"] <= initial_epoch]
            self.best = callbacks.BestWeights(
                epoch=saved.best_epoch, value=saved.best_value, weights=weights
            )
            plateau_start = saved.plateau
        elif initial_epoch:
            self.rows = [r for r in history.read(out) if r["epoch"] <= initial_epoch]
        self.callbacks = self._callbacks(model, plateau_start)
        if self.save is not None:
            self.save.step_offset = steps

    def _callbacks(self, model, plateau_start) -> list:
        """The stall watchdog (first: its epoch-end phase covers the others'
        epoch-end work), learning-rate plateaus, the epoch log, the best
        weights and the checkpoints (every process), then on the chief only
        the best checkpoint and the backup (one process without
        --checkpoint-dir) and TensorBoard; then the testing hooks."""
        args, strategy = self.args, self.strategy
        found = []
        if args.stall_bound != -1.0:
            watchdog = getattr(strategy, "watchdog", None)
            found.append(
                stall.StallWatchdog(
                    stall.Bounds(fixed=args.stall_bound),
                    process_index=strategy.process_index,
                    process_count=strategy.process_count,
                    on_stall=watchdog.failed if watchdog is not None else None,
                )
            )
        plateau = None
        if args.schedule == "plateau":
            plateau = keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss", factor=0.2, patience=5, min_lr=1e-5
            )
            found.append(plateau)
        found.append(callbacks.EpochLog(self.out, self.rows, write=strategy.is_chief))
        if self.best is not None:
            found.append(self.best)
        if self.checkpointer is not None:
            # Saves the partial epoch when asked to stop (training/preemption.py).
            self.save = callbacks.SaveCheckpoint(
                self.checkpointer,
                self.rows,
                self.best,
                plateau=plateau,
                plateau_start=plateau_start,
                settings=settings(args),
                processes=strategy.process_count,
                stop_request=preemption.request,
            )
            found.append(self.save)
        if strategy.is_chief and self.best is None:
            best_so_far = max(
                (row.get("val_accuracy", -1.0) for row in self.rows), default=None
            )
            found += [
                keras.callbacks.ModelCheckpoint(
                    str(self.out / "best.keras"),
                    monitor="val_accuracy",
                    mode="max",
                    save_best_only=True,
                    initial_value_threshold=best_so_far,
                ),
                keras.callbacks.BackupAndRestore(
                    str(self.out / "backup"), delete_checkpoint=False
                ),
            ]
        if strategy.is_chief and args.tensorboard:
            if keras.backend.backend() == "tensorflow":
                found.append(keras.callbacks.TensorBoard(args.tensorboard))
            else:  # no TensorFlow needed: tensorboard's own writer
                found.append(callbacks.EventFileTensorBoard(args.tensorboard))
        try:
            found += callbacks.testing_hooks(strategy.process_index)
        except ValueError as e:
            raise UsageError(str(e)) from None
        return found

    def best_model(self, model):
        """The model to report (every process): the best epoch's weights."""
        if self.best is not None:
            weights = self.best.weights
            return self.strategy.restore_best(model, weights=weights)
        return self.strategy.restore_best(model, self.out / "best.keras")

    def close(self) -> None:
        """After training, also when it raised (Keras then skips on_train_end):
        the stall watchdog stops, a signal no longer waits for a save."""
        for callback in self.callbacks:
            if isinstance(callback, stall.StallWatchdog):
                callback.on_train_end()
        if self.save is not None and self.save.stop_request is not None:
            self.save.stop_request.active = False
        if self.checkpointer is not None:
            self.checkpointer.close()


def check_tensorboard(args) -> None:
    """--tensorboard needs the tensorboard package; under tensorflow, Keras's
    callback writes through tf.summary (TensorFlow is there)."""
    import importlib.util

    if not args.tensorboard:
        return
    if importlib.util.find_spec("tensorboard") is None:
        raise UsageError(
            "--tensorboard needs the tensorboard package: pip install "
            "'.[tensorboard]', or leave out --tensorboard"
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
    """Trains, restores the best epoch's weights, evaluates on test, writes
    artifacts."""
    check_tensorboard(args)
    out = prepare_output(args, strategy)
    initial_epoch, steps_done = resume_epoch(args, strategy, out)
    splits, steps_per_epoch = load_data(args)
    # A resumed run draws new random numbers (shuffles, dropout masks) rather
    # than replaying those of its first epochs; it matches an uninterrupted
    # run within noise, not bit for bit.
    set_seed(args.seed + initial_epoch)
    model = build_model(args, strategy, steps_per_epoch)
    training = Training(args, strategy, model, out, initial_epoch, steps_done)
    print(
        f"Training {args.model} on {keras.backend.backend()} ({strategy.name}, "
        f"{strategy.num_replicas} replica(s)); train/val/test = "
        + "/".join(str(n) for n in splits.sizes().values())
        + f", epochs {initial_epoch + 1}..{args.epochs}."
    )
    # A partial epoch first (its remaining steps), then the other epochs.
    fits = []
    if steps_done:
        fits.append((initial_epoch, initial_epoch + 1, steps_per_epoch - steps_done))
        initial_epoch += 1
    if initial_epoch < args.epochs or not fits:
        fits.append((initial_epoch, args.epochs, None))
    try:
        for first, last, steps in fits:
            strategy.fit(
                model,
                splits.x_train,
                splits.y_train,
                batch_size=args.batch_size,
                epochs=last,
                validation_data=(splits.x_val, splits.y_val),
                callbacks=training.callbacks,
                initial_epoch=first,
                verbose=args.verbose,
                **({"steps_per_epoch": steps} if steps else {}),
            )
    finally:
        training.close()
    model = training.best_model(model)
    metrics = evaluate(args, strategy, model, splits, training.rows)
    if strategy.is_chief:
        write_artifacts(out, model, training.rows, metrics)
        if training.best is not None:  # best.keras from the best epoch's weights
            strategy.save(model, out / "best.keras")
    return metrics


def write_artifacts(out: Path, model, rows: list[dict], metrics: dict) -> None:
    history.write(out, rows)
    history.atomic_write(out / "metrics.json", json.dumps(metrics, indent=1) + "\n")
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


#: Errors that end a run with a one-line message (exit status 2 for usage).
ONE_LINE_ERRORS = (
    UsageError,
    data.DataError,
    environment.PinMismatch,
    checkpoints.CheckpointError,
    cluster.JoinError,
)


def main(argv=None) -> int:
    # Before jax starts its backend; both are off with SYNANN_MALLOC=0 and
    # SYNANN_XLA_FLAGS=0 (training/allocator.py, training/xla_flags.py).
    cpu_settings = {"malloc": allocator.tune_malloc()}
    xla_flags_before = os.environ.get("XLA_FLAGS")
    cpu_settings["xla_flags"] = xla_flags.tune_xla_cpu(keras.backend.backend())
    strategy = None
    signals = None
    status.configure(None, fresh=True)
    preemption.request = preemption.StopRequest()
    try:
        args = parse_args(argv)
        _, count, index = cluster.coordinator_from_env()
        status.configure(status_template(args, index or 0), index or 0, count or 1)
        args.cpu_settings = cpu_settings
        set_precision(args)
        if keras.backend.backend() == "jax":
            # Seeded before joining: the processes then need no collective
            # step to agree on a seed.
            set_seed(args.seed)
        strategy = resolve_strategy(args)
        status.configure(
            status_template(args, strategy.process_index),
            strategy.process_index,
            strategy.process_count,
        )
        preemption.request = preemption.for_processes(
            strategy.process_count if strategy.backend == "jax" else 1
        )
        watchdog = getattr(strategy, "watchdog", None)
        if watchdog is not None:  # it takes SIGTERM and SIGINT
            watchdog.on_signal = preemption.on_signal
            watchdog.on_end = preemption.report_end
        else:
            signals = preemption.SignalWatcher(
                strategy.process_index, strategy.process_count
            ).start()
        # After joining: a process whose environment differs stops every
        # process at once (its watchdog tells the others).
        check_environment()
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
        strategy.done()
        code, _, process = os.environ.get(EXIT_ENV, "").partition("@")
        if code and int(process or 0) == strategy.process_index:
            print(f"{EXIT_ENV}: exiting with {code} as asked", file=sys.stderr)
            status.report(status.word_for(int(code)), int(code), f"{EXIT_ENV}")
            return int(code)
        status.report("ok", status.EXIT_OK, "finished")
    except ONE_LINE_ERRORS as e:
        code = 2 if isinstance(e, UsageError) else 1
        status.report(status.word_for(code), code, e)  # before the error line
        cli.error("mnist.py", e)
        _failed(strategy, e, code, joined=not isinstance(e, cluster.JoinError))
        return code
    except SystemExit as e:  # argparse's usage errors, the exit testing hook
        if e.code not in (0, None):
            _failed(strategy, f"exited with status {e.code}", e.code)
        raise
    except BaseException as e:
        _failed(strategy, e, 1)
        raise
    finally:
        if signals is not None:
            signals.stop()
        if strategy is not None:
            strategy.close()
        _restore_env("XLA_FLAGS", xla_flags_before)  # for callers in this process
    return 0


def status_template(args, process_index: int) -> str | None:
    """--status-file, else OUTPUT_DIR/status.json for the chief (process 0)
    alone: only the chief writes into the output directory."""
    if args.status_file:
        return args.status_file
    if process_index == 0:
        return str(Path(args.output_dir) / status.DEFAULT_NAME)
    return None


def _failed(strategy, error, code, joined: bool = True) -> None:
    """Tell the other processes of a multi-process jax run that this one
    stops, then end it at once (the others stop too, so there is no one to
    wait for at jax's shutdown). One process, or torch: nothing to do."""
    reason = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, BaseException) and not isinstance(error, ONE_LINE_ERRORS):
        reason = f"{type(error).__name__}: {reason}"
    if isinstance(code, int):
        status.report(status.word_for(code), code, reason)
    if strategy is None:
        if joined and keras.backend.backend() == "jax":
            if distribute.jax.report_failure_before_joining(reason):
                _exit_now(code)
        return
    if strategy.backend == "jax" and strategy.process_count > 1:
        strategy.failed(reason, error if isinstance(error, BaseException) else None)
        if isinstance(error, BaseException) and not isinstance(error, ONE_LINE_ERRORS):
            import traceback

            traceback.print_exc()
        _exit_now(code)


def _exit_now(code) -> None:
    """End a process of a multi-process run without jax's shutdown, which
    waits for every process to shut down too."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1)


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


if __name__ == "__main__":
    sys.exit(main())
