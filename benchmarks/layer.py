"""Forward + backward of one Synapse layer against a Dense layer of the same shape.

    python -m benchmarks.layer                      # all installed backends
    python -m benchmarks.layer --backends jax --batch 4096 --n 1024
    python -m benchmarks.layer --implementations auto,ops,cpu,torch,triton,pallas

Prints the CPU (model, cores, caches) and the load average, then a table
(backend, implementation, how the step runs, shape, synapse ms, dense ms,
ratio, first-call s, peak MB, max relative error against float64 NumPy,
reference-formula ms) and writes it as JSON. Each backend runs in its own
subprocess (Keras picks its backend once per process); the memory figure
comes from a fresh subprocess so that nothing else has raised its peak (on
CPU: growth of the process's peak RSS; on a GPU: the device's peak memory in
use).

Timing: the Synapse and the Dense step alternate in one process, --repeats
pairs after two warm-up calls each; the table gives each one's median and the
median of the per-pair ratios (pairing keeps the ratio meaningful on a shared
machine whose speed drifts). Steps run as Keras runs a train step by default:
jax.jit; tensorflow as a tf.function, compiled with XLA only where Keras
would (a GPU or TPU is present; --tf-xla on|off overrides); torch eagerly.
Each call waits for the device (block_until_ready, cuda.synchronize); the
first call's time includes compilation. --implementations runs each listed
implementation of the layer that applies to the backend (see
keras_synann.ops.log_inhibition); "auto" is what the layer uses by default.
The loss is sum(g * y) for a fixed random g, so both layers do a full
forward and backward to their input and weights.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import _machine

ROOT = Path(__file__).resolve().parents[1]


def _block(tree):
    """Waits until every tensor in `tree` is computed (on any device)."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        jax.block_until_ready(tree)
    elif backend == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    else:
        leaves = tree if isinstance(tree, list | tuple) else [tree]
        for leaf in leaves:
            if isinstance(leaf, list | tuple):
                _block(leaf)
            else:
                keras.ops.convert_to_numpy(leaf)


#: Implementations that apply to each backend.
APPLIES = {
    "jax": ("auto", "ops", "cpu", "pallas"),
    "tensorflow": ("auto", "ops", "cpu"),
    "torch": ("auto", "ops", "cpu", "torch", "triton"),
}


def _device_name() -> str:
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return "cpu" if device.platform == "cpu" else device.device_kind
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    import tensorflow as tf

    return "gpu" if tf.config.list_physical_devices("GPU") else "cpu"


def _time(step, args, repeats):
    start = time.perf_counter()
    _block(step(*args))
    first = time.perf_counter() - start
    _block(step(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _block(step(*args))
        times.append(time.perf_counter() - start)
    return first, 1000 * statistics.median(times)


def _time_pairs(step_a, args_a, step_b, args_b, repeats):
    """(first call of a in s, median ms of a, of b, median of the a/b ratios)."""
    start = time.perf_counter()
    _block(step_a(*args_a))
    first = time.perf_counter() - start
    for _ in range(2):
        _block(step_a(*args_a))
        _block(step_b(*args_b))
    times_a, times_b = [], []
    for _ in range(repeats):
        for step, args, times in ((step_a, args_a, times_a), (step_b, args_b, times_b)):
            start = time.perf_counter()
            _block(step(*args))
            times.append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(times_a, times_b, strict=True)]
    return (
        first,
        1000 * statistics.median(times_a),
        1000 * statistics.median(times_b),
        statistics.median(ratios),
    )


def _tf_xla(choice: str) -> bool:
    """Whether tensorflow steps compile with XLA: as Keras's trainer decides by
    default (only with a GPU or TPU present), or as --tf-xla says."""
    if choice != "keras":
        return choice == "on"
    import tensorflow as tf

    devices = tf.config.list_physical_devices()
    return any(d.device_type != "CPU" for d in devices)


def _step(fn, tf_xla: bool):
    """value_and_grad of fn, compiled as a default Keras train step would be."""
    import keras

    from keras_synann.testing import value_and_grad

    backend = keras.backend.backend()
    if backend == "jax":
        return value_and_grad(fn, jit=True), "jax.jit"
    if backend == "torch":
        return value_and_grad(fn), "eager"
    if tf_xla:
        return value_and_grad(fn, jit=True), "tf.function (XLA)"
    return value_and_grad(fn, graph=True), "tf.function"


def _reference_formula(x, kernel):
    """The reference code's formula: a (batch, batch * n) ones matrix (batch-mixing)."""
    from keras import ops

    batch, n = x.shape
    xw = ops.matmul(ops.expand_dims(x, -1) * ops.eye(n), kernel)  # diag(x) @ W
    logs = ops.reshape(ops.log(1.0 - xw), (batch * n, n))
    return x * ops.exp(ops.matmul(ops.ones((batch, batch * n)), logs))


def worker(args) -> dict:
    import keras
    import numpy as np
    from keras import ops

    from keras_synann import ops as synann_ops
    from keras_synann.testing import (
        numpy_synapse_graph,
        numpy_synapse_graph_grads,
        value_and_grad,
    )

    rng = np.random.default_rng(0)
    b, n = args.batch, args.n
    x = rng.uniform(0.01, 0.99, (b, n)).astype("float32")
    kernel = rng.uniform(0.0, 0.01, (n, n)).astype("float32")
    bias = np.zeros(n, "float32")
    g = ops.convert_to_tensor(rng.normal(size=(b, n)).astype("float32"))
    x_t, k_t, b_t = (ops.convert_to_tensor(a) for a in (x, kernel, bias))
    jit = keras.backend.backend() != "torch"
    tf_xla = keras.backend.backend() == "tensorflow" and _tf_xla(args.tf_xla)

    impl = args.implementation
    # The implementation the layer takes inside the step (tensorflow decides
    # per graph: the compiled CPU loops only where XLA does not compile it).
    taken = []

    def synapse_loss(x, kernel):
        if not taken:
            taken.append(synann_ops.resolve_implementation(impl, x, kernel))
        return ops.sum(synann_ops.synapse_graph(x, kernel, implementation=impl) * g)

    def dense_loss(x, kernel, bias):
        return ops.sum((ops.matmul(x, kernel) + bias) * g)

    synapse_step, how = _step(synapse_loss, tf_xla)
    dense_step, _ = _step(dense_loss, tf_xla)
    first, synapse_ms, dense_ms, ratio = _time_pairs(
        synapse_step, (x_t, k_t), dense_step, (x_t, k_t, b_t), args.repeats
    )

    # Exactness on a slice of the batch against float64 NumPy (value and grads).
    m = min(b, 16)
    g_m = rng.normal(size=(m, n))
    g_m_t = ops.convert_to_tensor(g_m.astype("float32"))
    step = value_and_grad(
        lambda x, k: ops.sum(
            synann_ops.synapse_graph(x, k, implementation=impl) * g_m_t
        )
    )
    value, (d_x, d_k) = step(ops.convert_to_tensor(x[:m]), k_t)
    exp_dx, exp_dk = numpy_synapse_graph_grads(x[:m], kernel, g_m)
    exp_value = float((numpy_synapse_graph(x[:m], kernel) * g_m).sum())

    def rel(a, e):
        a = ops.convert_to_numpy(a).astype(np.float64)
        return float(np.max(np.abs(a - e)) / max(np.max(np.abs(e)), 1e-30))

    error = max(
        abs(float(ops.convert_to_numpy(value)) - exp_value) / abs(exp_value),
        rel(d_x, exp_dx),
        rel(d_k, exp_dk),
    )

    reference_ms = None
    if args.reference:
        ref_step = value_and_grad(
            lambda x, k: ops.sum(_reference_formula(x, k) * g), jit=jit
        )
        _, reference_ms = _time(ref_step, (x_t, k_t), max(1, args.repeats // 5))

    return {
        "backend": keras.backend.backend(),
        "implementation": taken[0] + (" (auto)" if impl == "auto" else ""),
        "step": how,
        "device": _device_name(),
        "batch": b,
        "n": n,
        "synapse_ms": round(synapse_ms, 2),
        "dense_ms": round(dense_ms, 2),
        "ratio": round(ratio, 1),
        "first_call_s": round(first, 2),
        "max_rel_error": error,
        "reference_ms": None if reference_ms is None else round(reference_ms, 1),
    }


def memory_worker(args) -> dict:
    """Peak RSS growth (MB) of one Synapse forward + backward at (memory_batch, n)."""
    import resource

    import numpy as np
    from keras import ops

    from keras_synann import ops as synann_ops
    from keras_synann.testing import value_and_grad

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (args.memory_batch, args.n)).astype("float32")
    kernel = rng.uniform(0, 0.01, (args.n, args.n)).astype("float32")
    impl = args.implementation
    step = value_and_grad(
        lambda x, k: ops.sum(synann_ops.synapse_graph(x, k, implementation=impl))
    )
    x, kernel = ops.convert_to_tensor(x), ops.convert_to_tensor(kernel)
    _block(step(x[:2, :8], kernel[:8, :8]))  # load the runtime's own kernels first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _block(step(x, kernel))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    device_peak = _accelerator_peak_mb()
    host_growth = (after - before) / 1024
    return {
        "peak_mb": round(host_growth if device_peak is None else device_peak, 1),
        "peak_of": "host RSS growth" if device_peak is None else "accelerator peak",
        "memory_batch": args.memory_batch,
    }


def _accelerator_peak_mb() -> float | None:
    """Peak accelerator memory in MB since the process started, or None on CPU."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        if device.platform == "cpu":
            return None
        return device.memory_stats()["peak_bytes_in_use"] / 2**20
    if backend == "torch":
        import torch

        if not torch.cuda.is_available():
            return None
        return torch.cuda.max_memory_allocated() / 2**20
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        return None
    return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20


def _run_worker(backend, mode, argv) -> dict:
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.layer", mode, *argv],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["(no output)"]
        print("\n".join(lines[-20:]), file=sys.stderr)
        raise RuntimeError(f"{backend} {mode} failed: {lines[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _table(rows) -> str:
    header = (
        "| backend | implementation | step | device | batch x n | synapse ms "
        "| dense ms | ratio | first call s | peak MB (batch) | max rel err "
        "| reference ms |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = "-" if r["reference_ms"] is None else f"{r['reference_ms']:.0f}"
        lines.append(
            f"| {r['backend']} | {r['implementation']} | {r['step']} | {r['device']} "
            f"| {r['batch']} x {r['n']} | {r['synapse_ms']:.2f} "
            f"| {r['dense_ms']:.2f} | {r['ratio']:.1f}x | {r['first_call_s']:.1f} "
            f"| {r['peak_mb']:.0f} ({r['memory_batch']}) | {r['max_rel_error']:.1e} | {ref} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backends",
        type=_machine.backends,
        default=_machine.BACKENDS,
        help="comma-separated",
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--n", type=int, default=784)
    parser.add_argument("--memory-batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--tf-xla",
        default="keras",
        choices=("keras", "on", "off"),
        help="compile tensorflow steps with XLA: as Keras would by default "
        "(only with a GPU or TPU), always, or never (default: %(default)s)",
    )
    parser.add_argument(
        "--implementations",
        default="auto",
        help="comma-separated, each run where it applies: "
        + "; ".join(f"{b}: {', '.join(i)}" for b, i in APPLIES.items()),
    )
    parser.add_argument("--implementation", default="auto", help=argparse.SUPPRESS)
    parser.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="skip the reference code's formula (slow: a batch x batch*n matmul)",
    )
    parser.add_argument("--json", default="benchmarks/results/layer.json")
    parser.add_argument("mode", nargs="?", default="main", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("batch", "n", "memory_batch", "repeats"):
        if getattr(args, name) < 1:
            parser.error(
                f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}"
            )

    if args.mode == "worker":
        print(json.dumps(worker(args)))
        return 0
    if args.mode == "memory":
        print(json.dumps(memory_worker(args)))
        return 0

    backends = args.backends
    implementations = [i.strip() for i in args.implementations.split(",") if i.strip()]
    known = sorted({i for impls in APPLIES.values() for i in impls})
    bad = [i for i in implementations if i not in known]
    if bad:
        parser.error(f"unknown implementation(s) {bad}; choose from {', '.join(known)}")
    passthrough = [
        f"--batch={args.batch}",
        f"--n={args.n}",
        f"--memory-batch={args.memory_batch}",
        f"--repeats={args.repeats}",
        f"--tf-xla={args.tf_xla}",
    ] + ([] if args.reference else ["--no-reference"])
    load_before = _machine.load()
    rows, failed = [], []
    for backend in backends:
        if importlib.util.find_spec(backend) is None:
            print(f"skipping {backend}: not installed", file=sys.stderr)
            continue
        for impl in implementations:
            if impl not in APPLIES[backend]:
                continue
            print(f"measuring {backend} {impl} ...", file=sys.stderr, flush=True)
            worker_argv = [*passthrough, f"--implementation={impl}"]
            try:
                row = _run_worker(backend, "worker", worker_argv)
                row.update(_run_worker(backend, "memory", worker_argv))
            except RuntimeError as e:  # one failing path must not hide the rest
                print(f"error: {e}", file=sys.stderr)
                failed.append(f"{backend} {impl}")
                continue
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    if not rows:
        print("error: none of the requested backends is installed", file=sys.stderr)
        return 1
    info = _machine.describe()
    load_after = _machine.load()
    print(f"CPU: {_machine.line(info)}")
    print(f"Before: {load_before}; after: {load_after}")
    print(f"Command: python -m benchmarks.layer {' '.join(argv or sys.argv[1:])}\n")
    print(_table(rows))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "machine": info,
        "load_before": load_before,
        "load_after": load_after,
        "command": ["python", "-m", "benchmarks.layer", *(argv or sys.argv[1:])],
        "rows": rows,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {out}")
    if failed:
        print(f"error: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
