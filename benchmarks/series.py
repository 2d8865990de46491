"""The opt-in Taylor-series Synapse (`series_order=K`): its error and its speed.

    KERAS_BACKEND=jax python -m benchmarks.series
    KERAS_BACKEND=torch python -m benchmarks.series --orders 2 3 --shapes 100x280

Two tables on the backend in KERAS_BACKEND:

1. Error of s = sum_j log(1 - beta_ij x_j) (equivalently of log y) against
   float64 NumPy, for x uniform in (0, 1) and beta uniform in [0, beta_max):
   the largest and mean |error| over a batch, the largest relative error of
   y (exp(error) - 1), and the bound of `keras_synann.ops.series_error_bound`.
2. Forward + backward time of one layer (loss sum(g * y), gradients to x and
   the kernel) for the exact layer, the series of each order and a Dense
   layer of the same shape; median of --repeats calls after two warm-ups,
   jitted where the backend jits.

Prints Markdown tables and writes JSON (--output).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def error_rows(orders, beta_maxes, batch, n) -> list[dict]:
    import numpy as np
    from keras import ops

    from keras_synann import ops as synann_ops
    from keras_synann.testing import numpy_log_inhibition

    rows = []
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 1.0, (batch, n)).astype("float32")
    for beta_max in beta_maxes:
        kernel = rng.uniform(0.0, beta_max, (n, n)).astype("float32")
        exact = numpy_log_inhibition(x, kernel)
        for order in orders:
            s = ops.convert_to_numpy(synann_ops.log_inhibition_series(x, kernel, order))
            bound = ops.convert_to_numpy(
                synann_ops.series_error_bound(x, kernel, order)
            )
            error = np.abs(s.astype(np.float64) - exact)
            rows.append(
                {
                    "beta_max": beta_max,
                    "order": order,
                    "batch": batch,
                    "n": n,
                    "max_abs_error": float(error.max()),
                    "mean_abs_error": float(error.mean()),
                    "max_rel_error_y": float(np.expm1(error.max())),
                    "max_bound": float(bound.max()),
                }
            )
            print(
                f"# beta < {beta_max}, order {order}: max |error| "
                f"{error.max():.2e}, bound {bound.max():.2e}",
                flush=True,
            )
    return rows


def speed_rows(orders, shapes, repeats) -> list[dict]:
    import keras
    import numpy as np
    from keras import ops

    from benchmarks.layer import _device_name, _time
    from keras_synann import ops as synann_ops
    from keras_synann.testing import value_and_grad

    jit = keras.backend.backend() != "torch"
    rows = []
    for batch, n in shapes:
        rng = np.random.default_rng(0)
        x = ops.convert_to_tensor(rng.uniform(0, 1, (batch, n)).astype("float32"))
        kernel = ops.convert_to_tensor(rng.uniform(0, 0.01, (n, n)).astype("float32"))
        g = ops.convert_to_tensor(rng.normal(size=(batch, n)).astype("float32"))

        def synapse_loss(x, kernel, order=None, g=g):
            y = synann_ops.synapse_graph(x, kernel, series_order=order)
            return ops.sum(y * g)

        def dense_loss(x, kernel, g=g):
            return ops.sum(ops.matmul(x, kernel) * g)

        _, dense_ms = _time(value_and_grad(dense_loss, jit=jit), (x, kernel), repeats)
        variants = [("exact", None)] + [(f"series {k}", k) for k in orders]
        for name, order in variants:
            step = value_and_grad(functools.partial(synapse_loss, order=order), jit=jit)
            _, ms = _time(step, (x, kernel), repeats)
            rows.append(
                {
                    "backend": keras.backend.backend(),
                    "device": _device_name(),
                    "layer": name,
                    "batch": batch,
                    "n": n,
                    "ms": round(ms, 3),
                    "dense_ms": round(dense_ms, 3),
                    "ratio": round(ms / dense_ms, 2),
                }
            )
            print(
                f"# {batch}x{n} {name}: {ms:.3f} ms (Dense {dense_ms:.3f})", flush=True
            )
    return rows


def tables(errors, speeds) -> str:
    lines = [
        "| beta max | order | max abs error of log y | mean abs error | "
        "max rel error of y | bound |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in errors:
        lines.append(
            f"| {r['beta_max']} | {r['order']} | {r['max_abs_error']:.2e} | "
            f"{r['mean_abs_error']:.2e} | {r['max_rel_error_y']:.2e} | "
            f"{r['max_bound']:.2e} |"
        )
    lines += [
        "",
        "| backend | device | batch x n | layer | fwd+bwd ms | Dense ms | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in speeds:
        lines.append(
            f"| {r['backend']} | {r['device']} | {r['batch']}x{r['n']} | "
            f"{r['layer']} | {r['ms']} | {r['dense_ms']} | {r['ratio']} |"
        )
    return "\n".join(lines)


def _shape(text: str) -> tuple[int, int]:
    try:
        batch, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected BATCHxN such as 100x280, got {text!r}"
        ) from None
    if batch < 1 or n < 1:
        raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {text!r}")
    return batch, n


def _order(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def main(argv=None) -> int:
    import keras

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--orders", nargs="+", type=_order, default=[1, 2, 3, 4, 6])
    p.add_argument(
        "--beta-max", nargs="+", type=float, default=[0.01, 0.1, 0.3, 0.5, 0.9]
    )
    p.add_argument(
        "--error-shape", type=_shape, default=(128, 784), help="BATCHxN for table 1"
    )
    p.add_argument(
        "--shapes",
        nargs="+",
        type=_shape,
        default=[(100, 280), (128, 784)],
        help="BATCHxN for table 2 (100x280: the mlp's layer; 128x784: synacnn's)",
    )
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument(
        "--output", default=None, help="default: results/series_<backend>.json"
    )
    args = p.parse_args(argv)
    if not all(0.0 <= b < 1.0 for b in args.beta_max):
        p.error(f"--beta-max values must be in [0, 1), got {args.beta_max}")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    backend = keras.backend.backend()
    errors = error_rows(args.orders, args.beta_max, *args.error_shape)
    speeds = speed_rows(args.orders, args.shapes, args.repeats)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"
    print(f"\nMachine: {machine}; keras {keras.__version__}, backend {backend}\n")
    print(tables(errors, speeds))
    output = Path(
        args.output or ROOT / "benchmarks" / "results" / f"series_{backend}.json"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps({"machine": machine, "errors": errors, "speeds": speeds}, indent=1)
    )
    print(f"\nWrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
