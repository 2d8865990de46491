"""First-order and gradient-penalty steps of Synapse against Dense, and their peak memory.

    python -m benchmarks.derivatives                         # this tree, every backend
    python -m benchmarks.derivatives --compare 781e2a0 --compare 5fc678c
    python -m benchmarks.derivatives --backends torch --batch 128 --n 784

For each backend (one subprocess per measurement: Keras picks its backend
once per process), with the layer's default implementation ("auto"):

- first order: value and gradient (x and W) of sum(g * y), y = Synapse(x)
  against y = x @ W + b (Dense), timed in alternating pairs;
- gradient penalty: the gradient in W of sum(g * y) + sum((d sum(g * y) / dx) ** 2)
  (WGAN-GP / R1 style), Synapse against Dense, likewise;
- with `--compare REV`, both steps of the package at each REV too (checked
  out in a temporary git worktree), the trees' runs alternating round by
  round (the same script measures every tree);
- peak memory of the gradient-penalty step at --memory-batch, this tree only
  (fresh subprocess: growth of peak RSS on a CPU, peak device memory on a GPU).

Steps run as a Keras train step runs by default: jax.jit, tf.function,
eager torch. Prints a table and writes JSON (machine, versions, commit,
date, command) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import _machine

REPO = Path(__file__).resolve().parents[1]


# --- the worker: runs in a subprocess with KERAS_BACKEND and PYTHONPATH set ----------


def _steps(batch: int, n: int, implementation: str = "auto"):
    """(synapse first-order, dense first-order, synapse penalty, dense penalty)
    steps with their arguments, and `block`, for the running backend."""
    import keras
    import numpy as np
    from keras import ops

    from keras_synann import ops as synann_ops

    rng = np.random.default_rng(0)
    x = rng.uniform(0.01, 0.99, (batch, n)).astype("float32")
    w_syn = rng.uniform(0.0, 0.01, (n, n)).astype("float32")
    w_dense = rng.normal(0.0, n**-0.5, (n, n)).astype("float32")
    bias = np.zeros(n, "float32")
    g = rng.normal(size=(batch, n)).astype("float32")

    def synapse(x, w, b):
        del b
        return synann_ops.synapse_graph(x, w, implementation=implementation)

    def dense(x, w, b):
        return ops.matmul(x, w) + b

    builders = {"jax": _jax, "torch": _torch, "tensorflow": _tensorflow}
    first, penalty, tensor, block = builders[keras.backend.backend()](g)
    syn = [tensor(a) for a in (x, w_syn, bias)]
    den = [tensor(a) for a in (x, w_dense, bias)]
    return (
        (first(synapse), syn),
        (first(dense), den),
        (penalty(synapse), [syn[1], syn[0], syn[2]]),
        (penalty(dense), [den[1], den[0], den[2]]),
        block,
    )


def _jax(g):
    """(first, penalty, tensor, block): jax.jit of value_and_grad."""
    import jax
    import jax.numpy as jnp

    def first(layer):
        def loss(x, w, b):
            return jnp.sum(g * layer(x, w, b))

        return jax.jit(jax.value_and_grad(loss, (0, 1)))

    def penalty(layer):
        def loss(x, w, b):
            return jnp.sum(g * layer(x, w, b))

        def total(w, x, b):
            gx = jax.grad(loss, 0)(x, w, b)
            return loss(x, w, b) + jnp.sum(gx**2)

        return jax.jit(jax.value_and_grad(total))

    return first, penalty, jnp.asarray, jax.block_until_ready


def _torch(g):
    """(first, penalty, tensor, block): eager torch.autograd."""
    import torch

    gt = torch.tensor(g)

    def first(layer):
        def step(x, w, b):
            x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
            value = (gt * layer(x, w, b)).sum()
            return value, torch.autograd.grad(value, (x, w))

        return step

    def penalty(layer):
        def step(w, x, b):
            x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
            value = (gt * layer(x, w, b)).sum()
            (gx,) = torch.autograd.grad(value, x, create_graph=True)
            total = value + (gx**2).sum()
            return total, torch.autograd.grad(total, w)

        return step

    def block(t):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    return first, penalty, torch.tensor, block


def _tensorflow(g):
    """(first, penalty, tensor, block): tf.function of nested tapes."""
    import tensorflow as tf

    gt = tf.constant(g)

    def first(layer):
        @tf.function
        def step(x, w, b):
            with tf.GradientTape() as tape:
                tape.watch([x, w])
                value = tf.reduce_sum(gt * layer(x, w, b))
            return value, tape.gradient(value, [x, w])

        return step

    def penalty(layer):
        @tf.function
        def step(w, x, b):
            with tf.GradientTape() as outer:
                outer.watch(w)
                with tf.GradientTape() as inner:
                    inner.watch(x)
                    value = tf.reduce_sum(gt * layer(x, w, b))
                gx = inner.gradient(value, x)
                total = value + tf.reduce_sum(gx**2)
            return total, outer.gradient(total, w)

        return step

    def block(t):
        tf.nest.map_structure(lambda a: a.numpy(), t)

    return first, penalty, tf.constant, block


def _pairs(a, b, block, repeats: int):
    """Median ms of a, of b, and the median of the per-pair ratios."""
    for _ in range(2):
        block(a[0](*a[1]))
        block(b[0](*b[1]))
    ta, tb = [], []
    for _ in range(repeats):
        for (fn, args), times in ((a, ta), (b, tb)):
            start = time.perf_counter()
            block(fn(*args))
            times.append(time.perf_counter() - start)
    ratios = [x / y for x, y in zip(ta, tb, strict=True)]
    return (
        1000 * statistics.median(ta),
        1000 * statistics.median(tb),
        statistics.median(ratios),
    )


def worker(args) -> dict:
    import keras

    (syn1, dense1, syn_gp, dense_gp, block) = _steps(args.batch, args.n)
    out = {"keras": keras.__version__, "backend": keras.backend.backend()}
    if args.what == "first":
        out["synapse_ms"], out["dense_ms"], out["ratio"] = _pairs(
            syn1, dense1, block, args.repeats
        )
    elif args.what == "penalty":
        out["synapse_ms"], out["dense_ms"], out["ratio"] = _pairs(
            syn_gp, dense_gp, block, args.repeats
        )
    else:  # memory: one layer's penalty step in this fresh process
        step = syn_gp if args.what == "memory-synapse" else dense_gp
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(2):
            block(step[0](*step[1]))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["peak_mb"] = (after - before) / 1024
    out["versions"] = _machine.versions()
    return out


# --- the driver ----------------------------------------------------------------------


def _run(tree: Path, backend: str, what: str, args) -> dict:
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "PYTHONPATH": os.pathsep.join(dict.fromkeys([str(tree), str(REPO)])),
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    command = [
        sys.executable, __file__, "--worker", "--what", what,
        "--batch", str(args.memory_batch if what.startswith("memory") else args.batch),
        "--n", str(args.n), "--repeats", str(args.repeats),
    ]  # fmt: skip
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=1800, check=False
    )
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1][:300]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", type=_machine.backends, default=_machine.BACKENDS)
    parser.add_argument("--compare", action="append", default=[], metavar="REV")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--n", type=int, default=784)
    parser.add_argument("--memory-batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--out", default=str(REPO / "benchmarks/results/derivatives.json")
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--what", default="first", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    backends = args.backends
    info = _machine.describe()
    print(f"# {_machine.line(info)}; {_machine.load()}")
    trees = {_machine.commit(REPO) + " (this tree)": REPO}
    with tempfile.TemporaryDirectory() as scratch:
        for rev in args.compare:
            path = Path(scratch) / rev
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), rev],
                check=True, capture_output=True,
            )  # fmt: skip
            # keras_synann from REV, the benchmark code (this file's package) from here
            package = Path(scratch) / f"{rev}-package"
            package.mkdir()
            (package / "keras_synann").symlink_to(path / "keras_synann")
            trees[rev] = package
        try:
            rows = _measure(trees, backends, args)
        finally:
            for rev in args.compare:
                subprocess.run(
                    ["git", "-C", str(REPO), "worktree", "remove", "--force",
                     str(Path(scratch) / rev)],
                    check=False, capture_output=True,
                )  # fmt: skip
    _machine.save(
        "benchmarks.derivatives", argv, args.out,
        load=_machine.load(), batch=args.batch, n=args.n,
        memory_batch=args.memory_batch,
        versions=next((r["versions"] for r in rows if "versions" in r), {}),
        rows=rows,
    )  # fmt: skip
    return 0


def _measure(trees: dict, backends: list[str], args) -> list[dict]:
    rows = []
    header = f"{'backend':11s} {'what':22s} {'tree':20s} {'synapse':>10s} {'dense':>9s} {'ratio':>7s}"
    print(header)
    this = next(iter(trees))
    for backend in backends:
        for what, label in (("first", "first order"), ("penalty", "gradient penalty")):
            runs = {name: [] for name in trees}
            for _ in range(args.rounds):  # the trees alternate, round by round
                for name, tree in trees.items():
                    runs[name].append(_run(tree, backend, what, args))
            # (this tree's row last: readers of the JSON take the last per step)
            rows.extend(
                _summary(backend, label, name, runs[name])
                for name in [*list(trees)[1:], this]
            )
        memory = {
            layer: _run(REPO, backend, f"memory-{layer}", args)
            for layer in ("synapse", "dense")
        }
        rows.append(
            {
                "backend": backend,
                "what": f"penalty peak MB, batch {args.memory_batch}",
                "tree": this,
                "synapse_mb": memory["synapse"].get("peak_mb"),
                "dense_mb": memory["dense"].get("peak_mb"),
                "errors": [m["error"] for m in memory.values() if "error" in m],
            }
        )
        for row in rows[-(2 * len(trees) + 1) :]:
            _print(row)
    return rows


def _summary(backend, what, tree, runs) -> dict:
    ok = [r for r in runs if "error" not in r]
    row = {"backend": backend, "what": what, "tree": tree, "runs": runs}
    if ok:
        for key in ("synapse_ms", "dense_ms", "ratio"):
            row[key] = statistics.median(r[key] for r in ok)
        row["versions"] = ok[0]["versions"]
    else:
        row["error"] = runs[0]["error"]
    return row


def _print(row) -> None:
    if "synapse_mb" in row:
        print(
            f"{row['backend']:11s} {row['what']:22s} {row['tree']:20s} "
            f"{row['synapse_mb'] or float('nan'):8.0f}MB {row['dense_mb'] or float('nan'):7.0f}MB"
        )
    elif "error" in row:
        print(
            f"{row['backend']:11s} {row['what']:22s} {row['tree']:20s} error: {row['error']}"
        )
    else:
        print(
            f"{row['backend']:11s} {row['what']:22s} {row['tree']:20s} "
            f"{row['synapse_ms']:8.2f}ms {row['dense_ms']:7.2f}ms {row['ratio']:6.1f}x"
        )


if __name__ == "__main__":
    sys.exit(main())
