"""Train a SynaNN on MNIST and write its artifacts.

    KERAS_BACKEND=jax python training/mnist.py                  # the default run
    KERAS_BACKEND=torch python training/mnist.py --model mlp --epochs 30
    KERAS_BACKEND=jax python training/mnist.py --epochs 2 --steps-per-epoch 5  # smoke

Selection (best checkpoint, learning-rate plateaus) uses a validation split
carved from the training set; the test set is evaluated once, at the end.
Writes to --output-dir: history.csv/json, best.keras, metrics.json,
status.json, accuracy.png, loss.png, beta.png, and backup/ (the state --resume
reads). With --checkpoint-dir (jax), every epoch's complete training state
goes there instead of backup/, written by all processes together, and
--resume continues from it with any number of processes.

The flags are in training/cli.py (`--help`); how a run ends (exit statuses,
status files, signals, stalls, several processes) in training/supervisor/.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `training` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
    import keras
except (ImportError, ValueError) as e:  # KERAS_BACKEND unset or not installed
    sys.exit(
        f"mnist.py: error: Keras cannot load its backend ({e}); set KERAS_BACKEND "
        "to an installed one: jax, tensorflow or torch"
    )
import numpy as np

from keras_synann.models import get_model
from training import checkpoints, cli, data, distribute, environment, outputs, resume
from training.distribute.cluster import JoinError
from training.fitting import Fitting
from training.supervisor import Supervisor
from training.tuning import tuned

#: Errors that end a run with their one-line message (exit status 1).
ONE_LINE_ERRORS = (data.DataError, environment.PinMismatch, checkpoints.CheckpointError)


def main(argv=None) -> int:
    """Train as `python training/mnist.py ARGV` does; the exit status."""
    with tuned(keras.backend.backend()) as cpu_settings:  # before jax starts
        supervisor = Supervisor(one_line=ONE_LINE_ERRORS)
        return supervisor.run(train, argv, supervisor, cpu_settings)


def train(argv, supervisor: Supervisor, cpu_settings: dict) -> None:
    """One run: the flags, the strategy, the data, the model, fit, then the
    best epoch's model evaluated and written."""
    backend = keras.backend.backend()
    args = cli.read_args(argv, backend)
    supervisor.report_to(args)  # the status file, for the errors below too
    cli.check(args, backend)
    policy = cli.MIXED_POLICIES.get(args.mixed_precision, "float32")
    keras.config.set_dtype_policy(policy)
    if backend == "jax":  # seeded before joining: no collective agrees on a seed
        distribute.set_seed(args.seed)
    strategy = join(args, supervisor)
    # After joining: a process whose versions differ stops every process.
    environment.check_pins_in_env()
    devices = strategy.devices
    index, count = strategy.process_index, strategy.process_count
    print(environment.banner(backend, index, count, devices), flush=True)

    out = outputs.prepare(args.output_dir, strategy.is_chief)
    start = resume.start(args, strategy, out)
    splits, steps_per_epoch = load_data(args)
    # A resumed run draws new random numbers (shuffles, dropout masks) rather
    # than replaying those of its first epochs; it matches an uninterrupted
    # run within noise, not bit for bit.
    distribute.set_seed(args.seed + start.epoch)
    model = build_model(args, strategy, steps_per_epoch)
    fitting = Fitting(args, strategy, supervisor, model, out, start)
    sizes = "/".join(str(n) for n in splits.sizes().values())
    print(
        f"Training {args.model} on {backend} ({strategy.name}, "
        f"{strategy.num_replicas} replica(s)); train/val/test = {sizes}, "
        f"epochs {start.epoch + 1}..{args.epochs}."
    )
    fitting.fit(model, splits, steps_per_epoch)

    model = fitting.best_model(model)
    metrics = evaluate(args, strategy, model, splits, fitting.rows, cpu_settings)
    if strategy.is_chief:
        outputs.write(out, model, fitting.rows, metrics)
        if fitting.best is not None:  # best.keras from the best epoch's weights
            strategy.save(model, out / "best.keras")


def join(args, supervisor: Supervisor) -> distribute.Strategy:
    """The --distribution strategy (joining the other processes of a
    multi-process run), handed to the supervisor, and the batch checked
    against it (one-line errors)."""
    try:
        strategy = distribute.resolve(args.distribution)
    except JoinError:
        raise
    except Exception as e:
        raise cli.UsageError(
            f"distribution {args.distribution!r} cannot run here: "
            + " ".join(str(e).split())
        ) from None
    supervisor.joined(strategy, args)
    try:
        strategy.check_batch(args.batch_size)
    except ValueError as e:
        raise cli.UsageError(f"--{e}") from None
    return strategy


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


def build_model(args, strategy, steps_per_epoch: int) -> keras.Model:
    """The compiled model, built in the strategy's scope."""
    shape = {"filters": args.filters, "dropout": args.dropout}
    with strategy.scope():
        model = get_model(
            args.model,
            synapse=not args.dense_baseline,
            implementation=args.implementation,
            series_order=args.series_order,
            **{k: v for k, v in shape.items() if v is not None},
        )
        model.compile(
            optimizer=optimizer(args, steps_per_epoch),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            jit_compile={"auto": "auto", "on": True, "off": False}[args.jit_compile],
        )
    return model


def optimizer(args, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Adam or SGD at a constant rate (constant, plateau) or on a per-step
    schedule (cosine, step), so that a resumed run continues it exactly."""
    total, rate = args.epochs * steps_per_epoch, args.learning_rate
    if args.schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(rate, total, alpha=0.01)
    elif args.schedule == "step":
        bounds = [max(1, int(total * 0.4)), max(2, int(total * 0.8))]
        rate = keras.optimizers.schedules.PiecewiseConstantDecay(
            bounds, [rate, rate / 10, rate / 100]
        )
    if args.optimizer == "sgd":
        return keras.optimizers.SGD(rate, momentum=args.momentum or 0.0)
    return keras.optimizers.Adam(rate)


def evaluate(args, strategy, model, splits, rows: list[dict], cpu_settings) -> dict:
    """Validation and test metrics of `model` (every process gets the same),
    its predictions for ten test images, printed; the contents of
    metrics.json."""
    batch = 512 * strategy.num_replicas
    val = strategy.evaluate(model, splits.x_val, splits.y_val, batch_size=batch)
    test = strategy.evaluate(model, splits.x_test, splits.y_test, batch_size=batch)
    metrics = outputs.metrics(args, strategy, splits, rows, (val, test), cpu_settings)
    best = metrics["best_epoch"]
    print(f"Best epoch (validation): {best}; val accuracy {val['accuracy']:.4%}")
    print(f"Test accuracy: {test['accuracy']:.4%} (loss {test['loss']:.4f})")
    logits = strategy.predict(model, splits.x_test[:10], batch_size=batch)
    predicted = np.argmax(logits, axis=-1).tolist()
    labels = splits.y_test[:10].tolist()
    print(f"Predicted {predicted} for test samples 0-9 labelled {labels}")
    return metrics


if __name__ == "__main__":
    sys.exit(main())
