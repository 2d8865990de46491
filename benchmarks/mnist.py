"""Train the SynaNN models on real MNIST and print a table of their numbers.

    python -m benchmarks.mnist                                # lenet + mlp on jax
    python -m benchmarks.mnist --models lenet --backends jax torch --seeds 0 1 2
    python -m benchmarks.mnist --models synacnn --steps-per-epoch 5   # smoke run

Each run is `training/mnist.py` in a subprocess (Keras picks its backend once
per process), with the model's benchmark settings below unless overridden.
The Dense baseline (`--dense-baseline`: keras.layers.Dense where the Synapse
is) is timed for --dense-epochs epochs. Seconds per epoch are the median over
epochs after the first (the first includes compilation). Accuracies are of
the checkpoint with the best validation accuracy; with several seeds the
table shows the median run (by validation accuracy) and every test accuracy.

Prints the CPU (model, cores, caches) and the load average with a Markdown
table and writes JSON (--output). `--env NAME=VALUE` sets a variable for the
training runs (for example SYNANN_MALLOC=0 to measure without the script's
malloc settings).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import _machine
from training import cli

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "mnist.py"

#: Per-model settings (the reference's epochs where they fit a CPU).
SETTINGS = {
    "lenet": {
        "epochs": 15,
        "learning_rate": 2e-3,
        "schedule": "cosine",
        "batch_size": 128,
    },
    "mlp": {
        "epochs": 30,
        "learning_rate": 3e-3,
        "schedule": "cosine",
        "batch_size": 100,
    },
    "synacnn": {
        "epochs": 31,
        "learning_rate": 1e-3,
        "schedule": "step",
        "batch_size": 64,
    },
}


#: Extra environment for the training runs (--env).
ENV: dict[str, str] = {}


def train(backend, model, settings, seed, out, extra=(), dense=False) -> dict:
    """Runs training/mnist.py once; returns its metrics and per-epoch seconds."""
    args = [
        sys.executable, str(SCRIPT), "--model", model, "--seed", str(seed),
        "--output-dir", str(out), "--verbose", "2",
    ]  # fmt: skip
    for key, value in settings.items():
        if value is not None:
            args += [f"--{key.replace('_', '-')}", str(value)]
    if dense:
        args.append("--dense-baseline")
    args += list(extra)
    env = {**os.environ, **ENV, "KERAS_BACKEND": backend}
    start = time.perf_counter()
    result = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{backend} {model} failed ({result.returncode}): {tail[0]}")
    metrics = json.loads((Path(out) / "metrics.json").read_text())
    history = json.loads((Path(out) / "history.json").read_text())
    seconds = [row["seconds"] for row in history]
    metrics["epoch_seconds"] = statistics.median(seconds[1:] or seconds)
    metrics["wall_seconds"] = round(time.perf_counter() - start, 1)
    return metrics


def benchmark(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends:
            for model in args.models:
                settings = dict(SETTINGS[model])
                for key in ("epochs", "learning_rate", "schedule", "batch_size",
                            "steps_per_epoch", "implementation",
                            "series_order", "jit_compile"):  # fmt: skip
                    if getattr(args, key) is not None:
                        settings[key] = getattr(args, key)
                runs = []
                for seed in args.seeds:
                    out = Path(tmp) / f"{backend}-{model}-{seed}"
                    runs.append(train(backend, model, settings, seed, out))
                    print(f"# {backend} {model} seed {seed}: test "
                          f"{runs[-1]['test_accuracy']:.4f}, "
                          f"{runs[-1]['epoch_seconds']:.2f} s/epoch", flush=True)  # fmt: skip
                runs.sort(key=lambda m: m["val_accuracy"])
                median = runs[len(runs) // 2]
                row = {
                    "model": model,
                    "backend": backend,
                    "devices": ",".join(median["devices"]),
                    "epochs": median["epochs"],
                    "seeds": args.seeds,
                    "val_accuracy": median["val_accuracy"],
                    "test_accuracy": median["test_accuracy"],
                    "test_accuracies": [m["test_accuracy"] for m in runs],
                    "s_per_epoch": round(median["epoch_seconds"], 2),
                    "wall_s": median["wall_seconds"],
                    "settings": settings,
                }
                if args.dense_epochs:
                    dense_settings = {**settings, "epochs": args.dense_epochs,
                                      "series_order": None}  # fmt: skip
                    dense = train(backend, model, dense_settings, args.seeds[0],
                                  Path(tmp) / f"{backend}-{model}-dense", dense=True)  # fmt: skip
                    row["dense_s_per_epoch"] = round(dense["epoch_seconds"], 2)
                    print(f"# {backend} {model} Dense: "
                          f"{dense['epoch_seconds']:.2f} s/epoch", flush=True)  # fmt: skip
                    row["ratio"] = round(row["s_per_epoch"] / dense["epoch_seconds"], 2)
                rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| model | backend | devices | epochs | val acc | test acc | s/epoch | "
        "Dense s/epoch | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        order = r["settings"].get("series_order")
        model = f"{r['model']} (series {order})" if order else r["model"]
        tests = "/".join(f"{100 * t:.2f}" for t in r["test_accuracies"])
        lines.append(
            f"| {model} | {r['backend']} | {r['devices']} | {r['epochs']} | "
            f"{100 * r['val_accuracy']:.2f}% | {100 * r['test_accuracy']:.2f}%"
            f"{f' ({tests})' if len(r['test_accuracies']) > 1 else ''} | "
            f"{r['s_per_epoch']} | {r.get('dense_s_per_epoch', '-')} | "
            f"{r.get('ratio', '-')} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = cli.Parser(prog="benchmarks.mnist", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models", nargs="+", default=["lenet", "mlp"], choices=tuple(SETTINGS)
    )
    p.add_argument(
        "--backends", nargs="+", default=["jax"], choices=("jax", "tensorflow", "torch")
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--epochs", type=int, default=None, help="override the model's")
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--schedule", default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps-per-epoch", type=int, default=None, help="smoke runs")
    p.add_argument(
        "--implementation", default=None, help="the Synapse layer's (default: auto)"
    )
    p.add_argument(
        "--series-order",
        type=int,
        default=None,
        help="the Synapse layer's Taylor-series approximation (default: exact)",
    )
    p.add_argument(
        "--jit-compile",
        default=None,
        choices=("auto", "on", "off"),
        help="see mnist.py",
    )
    p.add_argument("--dense-epochs", type=int, default=2, help="0: no Dense baseline")
    p.add_argument(
        "--output", default=str(ROOT / "benchmarks" / "results" / "mnist.json")
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment variable for the training runs (repeatable)",
    )
    args = p.parse_args(argv)
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            p.error(f"--env wants NAME=VALUE; got {item!r}")
        ENV[name] = value
    load_before = _machine.load()
    try:
        rows = benchmark(args)
    except RuntimeError as e:
        cli.error("benchmarks.mnist", e)
        return 1
    info, load_after = _machine.describe(), _machine.load()
    command = ["python", "-m", "benchmarks.mnist", *(argv or sys.argv[1:])]
    print(f"\nCPU: {_machine.line(info)}")
    print(f"Before: {load_before}; after: {load_after}")
    print(f"Command: {' '.join(command)}\n")
    print(table(rows))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    record = {
        "machine": info,
        "load_before": load_before,
        "load_after": load_after,
        "command": command,
        "env": ENV,
        "rows": rows,
    }
    Path(args.output).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
