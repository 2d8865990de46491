"""Milliseconds per forward + backward step against the layer size n, as a plot.

    python -m benchmarks.layer_sweep                     # measure, then plot
    python -m benchmarks.layer_sweep --plot-only         # plot the saved JSON again

Runs `benchmarks.layer` once per size in --sizes (every backend and
implementation asked for, batch --batch, float32, without the reference
formula), merges its rows into one JSON (--json) with what the figure needs
to be reproduced: the CPU (`lscpu` model name), the package versions, the
command, the date and the commit. Then draws, per backend and against n,
log-log, the Synapse layer's ms per step for each implementation and the Dense
layer's (top) and the median of their per-pair ratios (bottom; pairing keeps
the ratio meaningful when the machine's speed drifts) into a PNG (--png) that
docs/performance.md embeds.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import _machine

ROOT = Path(__file__).resolve().parents[1]

PACKAGES = ("keras", "jax", "jaxlib", "tensorflow", "torch", "numpy")
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "layer_sweep.json"
DEFAULT_PNG = ROOT / "docs" / "img" / "layer_sweep.png"


def _output(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    except OSError:
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def provenance() -> dict:
    """The CPU, the versions, the date and the commit a figure comes from."""
    lscpu = _output(["lscpu"])
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in lscpu.splitlines()
            if line.startswith("Model name:")
        ),
        _machine.cpu_model(),
    )
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    compiler = _output(["cc", "--version"]).splitlines()
    if compiler:
        versions["cc"] = compiler[0]
    dirty = bool(_output(["git", "status", "--porcelain", "--untracked-files=no"]))
    return {
        "lscpu_model_name": model,
        "machine": _machine.describe(),
        "versions": versions,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _output(["git", "rev-parse", "--short", "HEAD"]) or "unknown",
        "dirty": dirty,
    }


def measure(args) -> dict:
    """Runs benchmarks/layer.py for each size; returns the merged record."""
    record = {
        **provenance(),
        "command": ["python", "-m", "benchmarks.layer_sweep", *sys.argv[1:]],
        "batch": args.batch,
        "runs": [],
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            out = Path(tmp) / f"layer_{n}.json"
            command = [
                "-m",
                "benchmarks.layer",
                f"--backends={args.backends}",
                f"--implementations={args.implementations}",
                f"--batch={args.batch}",
                f"--n={n}",
                f"--repeats={args.repeats}",
                "--no-reference",
                f"--json={out}",
            ]
            print(f"n = {n}: python {' '.join(command)}", file=sys.stderr, flush=True)
            result = subprocess.run([sys.executable, *command], cwd=ROOT)
            if not out.is_file():
                raise SystemExit(
                    f"layer_sweep: benchmarks.layer wrote nothing for n = {n}"
                )
            run = json.loads(out.read_text())
            record["runs"].append(
                {
                    "n": n,
                    "command": ["python", *command[:-1]],
                    "returncode": result.returncode,
                    "load_before": run["load_before"],
                    "load_after": run["load_after"],
                }
            )
            record["rows"] += run["rows"]
    return record


def _series(rows, backend, key):
    """{label: ([n], [value])} for one backend and one row field: each
    implementation's, then (for "synapse_ms") Dense's, the median of the Dense
    steps paired with that n's implementations."""
    lines: dict[str, dict[int, list[float]]] = {}
    dense: dict[int, list[float]] = {}
    for row in rows:
        if row["backend"] != backend:
            continue
        label = row["implementation"].replace(" (auto)", "")
        lines.setdefault(label, {}).setdefault(row["n"], []).append(row[key])
        dense.setdefault(row["n"], []).append(row["dense_ms"])
    ordered = sorted(lines.items()) + (
        [("Dense", dense)] if key == "synapse_ms" else []
    )
    return {
        label: (sorted(by_n), [statistics.median(by_n[n]) for n in sorted(by_n)])
        for label, by_n in ordered
    }


def caption(record: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items() if k != "cc")
    state = " (uncommitted changes)" if record.get("dirty") else ""
    loads = [
        float(run[key].split()[2])
        for run in record["runs"]
        for key in ("load_before", "load_after")
        if run[key].startswith("load average ")
    ]
    load = f"; 1-min load average {min(loads):.1f}-{max(loads):.1f}" if loads else ""
    return (
        f"{record['lscpu_model_name']}, {record['machine']['cores']} cores{load}; "
        f"{versions}; batch {record['batch']}, float32, forward + backward; "
        f"{record['date']}, commit {record['commit']}{state}"
    )


def plot(record: dict, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = [
        b
        for b in ("jax", "tensorflow", "torch")
        if any(r["backend"] == b for r in record["rows"])
    ]
    fig, axes = plt.subplots(
        2,
        len(backends),
        figsize=(4.2 * len(backends), 7.4),
        sharex="col",
        sharey="row",
        squeeze=False,
        height_ratios=(3, 2),
    )
    colors = {
        "cpu": "C0",
        "ops": "C1",
        "torch": "C2",
        "pallas": "C3",
        "triton": "C4",
        "Dense": "black",
    }
    rows = record["rows"]
    for column, backend in enumerate(backends):
        for row, key in enumerate(("synapse_ms", "ratio")):
            ax = axes[row][column]
            for label, (sizes, values) in _series(rows, backend, key).items():
                ax.loglog(
                    sizes,
                    values,
                    "--" if label == "Dense" else "-",
                    marker="o",
                    color=colors.get(label),
                    label=label if label == "Dense" else f'"{label}"',
                )
            ax.grid(True, which="both", alpha=0.3)
        axes[0][column].set_title(backend)
        axes[0][column].legend(fontsize=8)
        axes[1][column].axhline(1.0, color="black", linestyle="--", linewidth=1)
        sizes = sorted({r["n"] for r in rows if r["backend"] == backend})
        axes[1][column].set_xticks(sizes, [str(n) for n in sizes], rotation=45)
        axes[1][column].set_xticks([], minor=True)
        axes[1][column].set_xlabel("n (layer size)")
    axes[0][0].set_ylabel("ms per step")
    axes[1][0].set_ylabel("Synapse / Dense (paired)")
    fig.suptitle("Synapse layer (each implementation) and Dense: ms per step against n")
    fig.text(
        0.5, 0.005, caption(record), ha="center", va="bottom", fontsize=6.5, wrap=True
    )
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        default="64,128,256,512,784,1024",
        help="comma-separated layer sizes n (default: %(default)s)",
    )
    parser.add_argument("--backends", default="jax,tensorflow,torch")
    parser.add_argument(
        "--implementations",
        default="cpu,ops,torch",
        help="as benchmarks/layer.py takes them; each runs where it applies "
        "(default: %(default)s)",
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--png", type=Path, default=DEFAULT_PNG)
    parser.add_argument(
        "--plot-only", action="store_true", help="draw --json again, measure nothing"
    )
    args = parser.parse_args(argv)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes takes integers separated by commas; got {args.sizes!r}")
    if not args.sizes or min(args.sizes) < 1:
        parser.error(f"--sizes must be positive integers; got {args.sizes}")

    if args.plot_only:
        record = json.loads(args.json.read_text())
    else:
        record = measure(args)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.json}")
    print(f"wrote {plot(record, args.png)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
