"""The command line of training/mnist.py: its flags, their defaults and their
checks, in one place; and the conventions of this project's scripts
(training/mnist.py, benchmarks/, cloud/tpu.py): every error is one line on
stderr, `PROG: error: MESSAGE`, and bad arguments exit with status 2.

    parse_args(argv, backend)  the checked flags (UsageError: one line);
                               read_args, then check
    batch_size(argv)           the global batch that training arguments ask for
                               (cloud/ checks it against a slice's devices)

Standard library only: cloud/tpu.py imports this module and runs without the
project's dependencies. The model and implementation names come from
keras_synann when `parse_args` checks them.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import math
import re
import sys
from pathlib import Path

PROG = "mnist.py"
SCHEDULES = ("cosine", "step", "constant", "plateau")
MIXED_POLICIES = {"bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
#: --callbacks SPEC: MODULE:NAME or MODULE:NAME(ARGS); MODULE a dotted module
#: name or a path to a .py file, ARGS Python literals.
CALLBACK_SPEC = re.compile(
    r"(?P<module>.+):(?P<name>[A-Za-z_]\w*)(?:\((?P<args>.*)\))?"
)


class UsageError(ValueError):
    """A bad command-line argument (one-line message; exit status 2)."""


class Parser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors are one line (exit status 2), or
    raise `UsageError` when `raise_errors` is set."""

    raise_errors = False

    def error(self, message):
        if self.raise_errors:
            raise UsageError(message)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def error(prog: str, message: object) -> None:
    """Print `PROG: error: MESSAGE` on one line of stderr."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message (its type's name if it has none)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def build_parser(models=None, implementations=None) -> Parser:
    """training/mnist.py's flags. `models` and `implementations` (keras_synann's
    names) become the choices of --model and --implementation; without them
    any name passes here (the training run checks it)."""
    p = Parser(
        prog=PROG,
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
    add("--model", default="lenet", choices=models, help="(default: %(default)s)")
    add("--epochs", type=int, default=10, help="(default: %(default)s)")
    add(
        "--batch-size",
        type=int,
        default=128,
        help="global batch size, split across replicas (default: %(default)s)",
    )
    add(
        "--learning-rate",
        type=float,
        default=2e-3,
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
        metavar="M",
        help="SGD's momentum, in [0, 1) (default: 0; only with --optimizer sgd)",
    )
    add(
        "--filters",
        metavar="A,B",
        help="lenet's two convolutions' filters (default: 16,32; the reference "
        "PyTorch net: 10,20)",
    )
    add(
        "--dropout",
        type=float,
        metavar="P",
        help="the model's dropout rate, in [0, 1) (default: the model's, 0.25; "
        "the reference PyTorch net: 0.5)",
    )
    add(
        "--schedule",
        default="cosine",
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
        help="IDX files with a SHA256SUMS (default: $SYNANN_DATA_DIR, else "
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
        choices=implementations,
        help="how the Synapse layer computes (default: %(default)s, the fastest "
        "measured for the device; see keras_synann.ops.log_inhibition)",
    )
    add(
        "--series-order",
        type=int,
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
        "(training/supervisor/stall.py) (default: %(default)s)",
    )
    add(
        "--status-file",
        metavar="PATH",
        help="where each process writes how it ended, one line of JSON; "
        "{process} becomes the process index (training/supervisor/status.py) "
        "(default: the chief alone, in OUTPUT_DIR/status.json)",
    )
    add(
        "--callbacks",
        nargs="+",
        action="extend",
        default=[],
        metavar="SPEC",
        help="your Keras callbacks, added to fit's: MODULE:NAME, a callback, a "
        "callback class or a function returning callbacks, or MODULE:NAME(ARGS) "
        "to call it with Python literals; MODULE is an importable module or a "
        "path to a .py file (e.g. 'my_callbacks.py:LogEvery(10)')",
    )
    add(
        "--verbose",
        type=int,
        choices=(0, 1, 2),
        help="Keras fit verbosity: 0 silent, 1 progress bar, 2 one line per epoch "
        "(default: 1 in a terminal, else 2, as in log files)",
    )
    return p


def parse_args(argv=None, backend: str = "jax") -> argparse.Namespace:
    """training/mnist.py's flags from `argv` (default sys.argv), checked for
    the Keras `backend`: argparse's own errors exit with status 2, the others
    raise UsageError."""
    args = read_args(argv, backend)
    check(args, backend)
    return args


def read_args(argv=None, backend: str = "jax") -> argparse.Namespace:
    """The flags with their defaults, before `check` (argparse's own errors
    exit with status 2)."""
    from keras_synann.models import MODELS
    from keras_synann.ops import IMPLEMENTATIONS

    args = build_parser(tuple(MODELS), IMPLEMENTATIONS).parse_args(argv)
    if args.verbose is None:
        args.verbose = 1 if sys.stdout.isatty() else 2
    if args.output_dir is None:
        args.output_dir = f"runs/{args.model}-{backend}"
    if args.tensorboard == "":
        args.tensorboard = str(Path(args.output_dir) / "tensorboard")
    return args


def batch_size(argv) -> int:
    """The global batch size training arguments `argv` ask for, the default
    when they name none (the rest of `argv` is not looked at). UsageError
    for a bad value."""
    parser = build_parser()
    parser.raise_errors = True
    args, _ = parser.parse_known_args(list(argv))
    _at_least_one(args, "batch_size")
    return args.batch_size


def check(args: argparse.Namespace, backend: str) -> None:
    """Raise UsageError (one line) for flags that do not go together, values out
    of range, or what the flags need and this installation lacks. Sets
    `args.filters` (a tuple) and `args.stall_bound` (stall.Bounds's fixed bound:
    None derived, -1.0 off)."""
    for name in ("epochs", "batch_size", "val_size", "steps_per_epoch", "series_order"):
        _at_least_one(args, name)
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
        args.filters = _filters(args.filters, args.model)
    if not (args.learning_rate > 0 and math.isfinite(args.learning_rate)):
        raise UsageError(
            f"--learning-rate must be a positive number, got {args.learning_rate}"
        )
    args.stall_bound = _stall_bound(args.stall_timeout)
    for spec in args.callbacks:
        callback_spec(spec)
    if args.tensorboard is not None and not _installed("tensorboard"):
        raise UsageError(
            "--tensorboard needs the tensorboard package: pip install "
            "'.[tensorboard]', or leave out --tensorboard"
        )
    if args.checkpoint_dir:
        _check_checkpoint_dir(args.checkpoint_dir, backend)


def callback_spec(spec: str) -> tuple[str, str, tuple, dict | None]:
    """--callbacks SPEC as (module, name, args, kwargs); kwargs is None when
    SPEC has no parentheses (use the object as it is)."""
    match = CALLBACK_SPEC.fullmatch(spec.strip())
    if match is None:
        raise UsageError(
            f"--callbacks {spec!r} is not MODULE:NAME or MODULE:NAME(ARGS), "
            "e.g. my_callbacks.py:LogEvery(10)"
        )
    if match["args"] is None:
        return match["module"], match["name"], (), None
    try:
        call = ast.parse(f"f({match['args']})", mode="eval").body
        args = tuple(ast.literal_eval(a) for a in call.args)
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        if None in kwargs:
            raise ValueError("**")
    except (SyntaxError, ValueError):
        raise UsageError(
            f"--callbacks {spec!r}: the arguments in parentheses must be Python "
            "literals (numbers, strings, lists, ...), e.g. LogEvery(10, name='a')"
        ) from None
    return match["module"], match["name"], args, kwargs


def _at_least_one(args, name: str) -> None:
    value = getattr(args, name)
    if value is not None and value < 1:
        raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _filters(raw: str, model: str) -> tuple[int, int]:
    if model != "lenet":
        raise UsageError(f"--filters applies to --model lenet, not {model}")
    try:
        filters = tuple(int(f) for f in raw.split(","))
    except ValueError:
        filters = ()
    if len(filters) != 2 or min(filters) < 1:
        raise UsageError("--filters takes two positive integers, e.g. 10,20")
    return filters


def _stall_bound(raw: str) -> float | None:
    """--stall-timeout: "auto" (None: derived), 0 (off: -1.0), or seconds."""
    if raw.strip().lower() == "auto":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value >= 0:  # negative or nan
        raise UsageError(
            "--stall-timeout must be auto, 0 or a positive number of seconds, "
            f"got {raw!r}"
        )
    return -1.0 if value == 0 else value


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _check_checkpoint_dir(uri: str, backend: str) -> None:
    """--checkpoint-dir needs jax and orbax-checkpoint; gs:// without
    TensorFlow needs gcsfs too."""
    if backend != "jax":
        raise UsageError(
            f"--checkpoint-dir needs the jax backend (orbax-checkpoint), not "
            f"{backend}; there --resume continues from OUTPUT_DIR/backup"
        )
    if not _installed("orbax"):
        raise UsageError(
            "--checkpoint-dir needs orbax-checkpoint: pip install '.[checkpoint]' "
            "('.[gcs]' for gs:// paths)"
        )
    if uri.startswith("gs://") and not (
        _installed("gcsfs") or _installed("tensorflow")
    ):
        raise UsageError(
            f"--checkpoint-dir {uri} needs gcsfs (or TensorFlow) to reach gs://: "
            "pip install '.[gcs]'"
        )
