"""What a run writes into --output-dir (the chief process alone):

    history.csv, history.json  one row per completed epoch (after each epoch)
    metrics.json               `metrics()`: the run's results and settings
    accuracy.png, loss.png     train and validation curves (plots.py)
    beta.png                   the first Synapse layer's learned beta
    status.json                how the run ended (training/supervisor/status.py)
    best.keras, backup/        the best epoch's model; the state --resume reads

Every file is written whole or not at all (a temporary file renamed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import keras

from keras_synann import Synapse
from training import environment, plots
from training.cli import UsageError


def prepare(output_dir: str, is_chief: bool) -> Path:
    """The output directory, created by the chief (one-line UsageError when
    it cannot be)."""
    out = Path(output_dir)
    if is_chief:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(
                f"--output-dir {out} cannot be created: {e.strerror or e}"
            ) from None
    return out


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_history(output_dir: Path, rows: list[dict]) -> None:
    atomic_write(output_dir / "history.json", json.dumps(rows, indent=1) + "\n")
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = [",".join(keys)]
    lines += [",".join(str(row.get(k, "")) for k in keys) for row in rows]
    atomic_write(output_dir / "history.csv", "\n".join(lines) + "\n")


def read_history(output_dir: Path) -> list[dict]:
    path = output_dir / "history.json"
    return json.loads(path.read_text()) if path.is_file() else []


def metrics(args, strategy, splits, rows: list[dict], results, cpu_settings) -> dict:
    """The contents of metrics.json: the validation and test metrics of the
    best epoch's model (`results`: two dicts), the epochs (`rows`), and the
    settings and machine of the run (`cpu_settings`: training/tuning.py's)."""
    val, test = results
    best_epoch = (
        max(rows, key=lambda r: r.get("val_accuracy", -1.0))["epoch"] if rows else 0
    )
    train_seconds = sum(row["seconds"] for row in rows)
    backend = keras.backend.backend()
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
        "backend": backend,
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
        "environment": environment.versions(backend),
        "keras_version": keras.__version__,
        "cpu_settings": cpu_settings,
    }


def write(output_dir: Path, model, rows: list[dict], metrics: dict) -> None:
    """history.csv/json, metrics.json and the plots."""
    write_history(output_dir, rows)
    atomic_write(output_dir / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    title = f"{metrics['model']} ({metrics['backend']})"
    plots.curve(rows, "accuracy", output_dir / "accuracy.png", f"{title}: accuracy")
    plots.curve(rows, "loss", output_dir / "loss.png", f"{title}: loss")
    synapses = [layer for layer in model.layers if isinstance(layer, Synapse)]
    if synapses:
        beta = keras.ops.convert_to_numpy(synapses[0].beta)
        plots.beta_heatmap(beta, output_dir / "beta.png", f"{title}: learned beta")
    print(f"Wrote {output_dir}/metrics.json, history.csv, best.keras and plots.")
