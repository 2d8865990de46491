"""The error of every derivative transform, per backend and implementation.

    python -m benchmarks.derivative_errors [--backends jax,torch,tensorflow]

Runs `keras_synann.testing.check_derivatives` (float32 Synapse against the
plain formula in float64, n = 6, batch 3, x in [0.05, 0.95], beta in
[0, 0.6)) for every implementation that runs here, eagerly, and for "auto"
compiled (jax.jit, tf.function, torch.compile), one subprocess per backend.
Prints a markdown table per backend and writes JSON (machine, versions,
commit, date, command) to --out. The GPU kernels run in their interpreters
on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import _machine

REPO = Path(__file__).resolve().parents[1]


def worker() -> dict:
    import importlib.metadata as md

    import keras

    from keras_synann import kernels
    from keras_synann.testing import TRANSFORMS, check_derivatives, derivative_inputs

    backend = keras.backend.backend()
    x, w = (keras.ops.convert_to_tensor(a, "float32") for a in derivative_inputs()[:2])
    columns = {}
    for name in kernels.NAMES:
        if name in kernels.priority() and not kernels.not_supported_reasons(name, x, w):
            columns[name] = check_derivatives(name, rtol=float("inf"))
    compiled = {}
    for transform in TRANSFORMS[backend]:
        try:
            compiled[transform] = check_derivatives(
                "auto", compiled=True, transforms=(transform,), rtol=float("inf")
            )[transform]
        except Exception as e:  # noqa: BLE001 (a refusal is a result here)
            compiled[transform] = f"raises {type(e).__name__}"
    columns["auto, compiled"] = compiled
    versions = {}
    for package in ("keras", "jax", "tensorflow", "torch"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return {"backend": backend, "columns": columns, "versions": versions}


def _cell(value) -> str:
    return value if isinstance(value, str) else f"{value:.1e}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", type=_machine.backends, default=_machine.BACKENDS)
    parser.add_argument(
        "--out", default=str(REPO / "benchmarks/results/derivative_errors.json")
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker()))
        return 0
    results = []
    for backend in args.backends:
        env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(REPO)}
        if backend == "torch":
            env.setdefault("TRITON_INTERPRET", "1")
        done = subprocess.run(
            [sys.executable, __file__, "--worker"],
            env=env, capture_output=True, text=True, check=False, timeout=3600,
        )  # fmt: skip
        if done.returncode != 0:
            print(f"{backend}: {done.stderr.strip().splitlines()[-1]}", file=sys.stderr)
            return 1
        row = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(row)
        names = list(row["columns"])
        print(
            f"\n{backend} ({', '.join(f'{k} {v}' for k, v in row['versions'].items())})\n"
        )
        print("| transform | " + " | ".join(f"`{n}`" for n in names) + " |")
        print("|---" * (len(names) + 1) + "|")
        for transform in row["columns"][names[0]]:
            cells = [_cell(row["columns"][n][transform]) for n in names]
            print(f"| {transform} | " + " | ".join(cells) + " |")
    _machine.save(
        "benchmarks.derivative_errors", argv, args.out,
        versions={k: v for r in results for k, v in r["versions"].items()},
        results=results,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
