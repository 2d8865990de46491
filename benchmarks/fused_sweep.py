"""Times the fused kernels (Triton under torch, Pallas under jax) over tile shapes.

    KERAS_BACKEND=torch python -m benchmarks.fused_sweep     # needs a CUDA GPU
    KERAS_BACKEND=jax python -m benchmarks.fused_sweep --batch 4096 --n 1024

For each (block rows, block columns, factors per log, warps), passed as the
kernel's `config`, it prints the forward + backward time of the kernel's
`log_inhibition` (median of --repeats calls after a warm-up that compiles),
the compile time, and the largest relative difference of the gradients from
the keras.ops path on the first 256 rows (the keras.ops path is slow at GPU
batch sizes). The default `CONFIG` of `keras_synann/kernels/torch/triton.py` and
`keras_synann/kernels/jax/pallas.py` was chosen from this table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

#: (block rows, block columns, factors per log, warps): a TileConfig each.
CONFIGS = [
    (16, 64, 16, 4),
    (32, 64, 16, 4),
    (32, 32, 16, 4),
    (64, 32, 16, 4),
    (16, 32, 16, 2),
    (64, 64, 16, 4),
    (32, 64, 32, 4),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    import keras
    import numpy as np
    from keras import ops

    from keras_synann import ops as synann_ops
    from keras_synann.kernels.tiles import TileConfig
    from keras_synann.testing import value_and_grad

    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        from keras_synann.kernels.torch import triton as module

        if not torch.cuda.is_available():
            print("error: the Triton kernels need a CUDA GPU here", file=sys.stderr)
            return 1
        impl = "triton"

        def sync(tree):
            torch.cuda.synchronize()
    elif backend == "jax":
        import jax

        from keras_synann.kernels.jax import pallas as module

        if jax.devices()[0].platform != "gpu":
            print("error: the Pallas kernels need a GPU here", file=sys.stderr)
            return 1
        impl = "pallas"
        sync = jax.block_until_ready
    else:
        print("error: set KERAS_BACKEND to torch or jax", file=sys.stderr)
        return 1

    rng = np.random.default_rng(0)
    x = ops.convert_to_tensor(rng.uniform(0, 1, (args.batch, args.n)).astype("float32"))
    w = ops.convert_to_tensor(rng.uniform(0, 0.01, (args.n, args.n)).astype("float32"))
    g = ops.convert_to_tensor(rng.normal(size=(args.batch, args.n)).astype("float32"))

    def step_for(log_inhibition, g):
        def loss(x, w):
            return ops.sum(log_inhibition(x, w) * g)

        return value_and_grad(loss, jit=backend == "jax")

    def fused(config):
        def log_inhibition(x, w):
            return module.log_inhibition(x, w, config.chunk, config=config)

        return log_inhibition

    def keras_ops(x, w):
        return synann_ops.log_inhibition(x, w, implementation="ops")

    rows = min(256, args.batch)
    _, reference = step_for(keras_ops, g[:rows])(x[:rows], w)
    reference = [ops.convert_to_numpy(r) for r in reference]
    print(f"{backend} {impl}, batch {args.batch}, n {args.n}")
    print("| block | chunk | warps | fwd+bwd ms | compile s | max rel diff vs ops |")
    print("|---|---|---|---|---|---|")
    for rows, cols, chunk, warps in CONFIGS:
        block = (rows, cols)
        config = TileConfig(rows, cols, chunk, warps)
        step = step_for(fused(config), g)
        try:
            start = time.perf_counter()
            _, grads = step(x, w)
            sync(grads)
            compile_s = time.perf_counter() - start
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                sync(step(x, w))
                times.append(1000 * (time.perf_counter() - start))
        except Exception as e:  # noqa: BLE001 - report and go on to the next shape
            print(
                f"| {block} | {chunk} | {warps} | failed: {str(e).splitlines()[0][:80]} | | |"
            )
            continue
        _, grads = step_for(fused(config), g[:rows])(x[:rows], w)
        diff = max(
            float(np.max(np.abs(ops.convert_to_numpy(a) - r)) / np.max(np.abs(r)))
            for a, r in zip(grads, reference, strict=True)
        )
        print(
            f"| {block} | {chunk} | {warps} | {statistics.median(times):.2f} "
            f"| {compile_s:.1f} | {diff:.1e} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
