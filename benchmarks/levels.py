"""The C loops per CPU level against Dense, beside -march=native and keras.ops,
and the default MNIST epoch with "auto" against --implementation ops.

    python -m benchmarks.levels                          # every backend and level here
    python -m benchmarks.levels --packaged DIR           # the levels' libraries from DIR
    python -m benchmarks.levels --backends jax --rounds 2 --mnist-steps 0
    python -m benchmarks.levels --rounds 0 --mnist-level x86-64-v3   # MNIST only, AVX2 loops
    python -m benchmarks.levels --busy 1 --mnist-steps 0 --out FILE  # one core taken

For every level this CPU runs (x86-64, x86-64-v3, x86-64-v4 on an AVX-512
x86 CPU; `KERAS_SYNANN_CPU_LEVEL` selects it in each run), `native` (the
first-use -march=native build) and `ops` (keras.ops), on each backend: the
first-order step (value and gradient in x and W of sum(g * y)) and the
gradient-penalty step (gradient in W of sum(g * y) + |d sum(g * y) / dx|^2)
of y = Synapse(x) against y = x @ W + b, batch 128, n 784, as a Keras train
step runs them (benchmarks/derivatives.py: jax.jit, tf.function, eager torch).

Timing on a shared machine: within a run the Synapse and the Dense step
alternate (--repeats pairs, ratio pair by pair); the runs of one backend go
round-robin over the configurations, --rounds times, each round in a
rotated order; a row gives the medians over rounds. `ops` (seconds per step
under torch) runs in the first --ops-rounds rounds with --ops-repeats
pairs. The load average is sampled before every run.

Build time: each level's libraries compiled afresh with the C compiler
here (the loops alone, as tensorflow and torch use them, and with the XLA
FFI handlers, as jax does), then used from that cache by the runs. With
--packaged DIR the runs load DIR/synann_<level>.so (the libraries of an
unpacked binary wheel) instead, as an installed wheel does.

MNIST: `training/mnist.py` (lenet, batch 128: the default run) for 2 epochs
of --mnist-steps steps with --implementation auto and ops, alternating,
--mnist-rounds times; seconds of the second epoch (the first compiles).
--mnist-level runs "auto" with that level's loops (KERAS_SYNANN_CPU_LEVEL).

--busy N keeps N other processes spinning (one core each) while the steps
and epochs run, to show how the layer and Dense share a loaded machine.

Writes JSON (machine, CPU flags, versions, command, commit, date, loads,
builds, rows) to --out and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import _machine, derivatives  # derivatives: the steps

REPO = Path(__file__).resolve().parents[1]


# --- the worker: one configuration on one backend, in its own process -----------


def worker(args) -> dict:
    import keras

    from keras_synann import ops as synann_ops
    from keras_synann.kernels import cpu_build

    if args.packaged:
        cpu_build.PACKAGED = Path(args.packaged)
    implementation = "ops" if args.config == "ops" else "cpu"
    syn1, dense1, syn_gp, dense_gp, block = derivatives._steps(
        args.batch, args.n, implementation
    )
    out = {"backend": keras.backend.backend()}
    if implementation == "cpu":
        x, w = syn1[1][0], syn1[1][1]
        out["auto"] = synann_ops.resolve_implementation("auto", x, w)
        variant = "xla_ffi" if out["backend"] == "jax" else "pthreads"
        out["build"] = cpu_build.describe(variant)
    for name, pair in (("first", (syn1, dense1)), ("penalty", (syn_gp, dense_gp))):
        synapse_ms, dense_ms, ratio = derivatives._pairs(*pair, block, args.repeats)
        out[name] = {"synapse_ms": synapse_ms, "dense_ms": dense_ms, "ratio": ratio}
    return out


# --- the driver --------------------------------------------------------------------


def _env(backend: str, cache: Path, **extra) -> dict:
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "PYTHONPATH": str(REPO),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "KERAS_SYNANN_CACHE": str(cache),
    }
    env.pop("KERAS_SYNANN_CPU_LEVEL", None)
    env.update(extra)
    return env


def _run(backend: str, config: str, cache: Path, args) -> dict:
    extra = {} if config == "ops" else {"KERAS_SYNANN_CPU_LEVEL": config}
    repeats = args.ops_repeats if config == "ops" else args.repeats
    command = [
        sys.executable, __file__, "--worker", "--config", config,
        "--batch", str(args.batch), "--n", str(args.n), "--repeats", str(repeats),
    ]  # fmt: skip
    if args.packaged:
        command += ["--packaged", str(args.packaged)]
    load = os.getloadavg()[0]
    result = subprocess.run(
        command,
        env=_env(backend, cache, **extra),
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1][:300], "load": load}
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "load": load}


def builds(levels: list[str], cache: Path, with_ffi: bool) -> dict:
    """Seconds to compile each level's libraries afresh (kept in `cache`)."""
    os.environ["KERAS_SYNANN_CACHE"] = str(cache)
    from keras_synann.kernels import cpu_build, cpu_compile, cpu_levels

    cc = cpu_compile.compiler()
    if cc is None:
        sys.exit(cpu_compile.NO_COMPILER)
    version = subprocess.run([cc, "--version"], capture_output=True, text=True)
    seconds = {"compiler": f"{cc}: {version.stdout.splitlines()[0]}"}
    for level in levels:
        flags = None if level == "native" else cpu_levels.LEVELS[level].flags
        for library in ("loops", "xla_ffi") if with_ffi else ("loops",):
            start = time.perf_counter()
            path, error = cpu_compile.build(
                cc, library, flags, cpu_build._include(library)
            )
            if path is None:
                sys.exit(f"{level} {library}: {error}")
            seconds[f"{level} {library}"] = round(time.perf_counter() - start, 2)
            print(f"built {level} ({library}) in {seconds[f'{level} {library}']} s")
    return seconds


def mnist(backend: str, steps: int, rounds: int, cache: Path, level=None) -> dict:
    """Seconds of the second epoch, "auto" against "ops", alternating."""
    runs = {"auto": [], "ops": []}
    loads = []
    for r in range(rounds):
        order = ["auto", "ops"] if r % 2 == 0 else ["ops", "auto"]
        for implementation in order:
            with tempfile.TemporaryDirectory() as out:
                loads.append(os.getloadavg()[0])
                subprocess.run(
                    [sys.executable, str(REPO / "training" / "mnist.py"),
                     "--epochs", "2", "--steps-per-epoch", str(steps),
                     "--implementation", implementation, "--output-dir", out,
                     "--verbose", "0"],
                    env=_env(backend, cache, **(
                        {"KERAS_SYNANN_CPU_LEVEL": level} if level else {})),
                    check=True, capture_output=True, timeout=3600,
                )  # fmt: skip
                history = json.loads((Path(out) / "history.json").read_text())
                runs[implementation].append(history[-1]["seconds"])
    ratios = [a / o for a, o in zip(runs["auto"], runs["ops"], strict=True)]
    return {
        "backend": backend,
        "level": level or "auto",
        "steps_per_epoch": steps,
        "auto_s": statistics.median(runs["auto"]),
        "ops_s": statistics.median(runs["ops"]),
        "auto_over_ops": statistics.median(ratios),
        "runs": runs,
        "loads": loads,
    }


def _summary(backend: str, config: str, runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    row = {"backend": backend, "config": config, "loads": [r["load"] for r in runs]}
    if not ok:
        return {**row, "error": runs[0]["error"]}
    for step in ("first", "penalty"):
        row[step] = {
            key: round(statistics.median(r[step][key] for r in ok), 3)
            for key in ("synapse_ms", "dense_ms", "ratio")
        }
    if "build" in ok[0]:
        row["auto"] = ok[0]["auto"]
        row["build"] = ok[0]["build"]
    return row


def _print(row: dict) -> None:
    if "error" in row:
        print(f"{row['backend']:11s} {row['config']:10s} error: {row['error']}")
        return
    first, gp = row["first"], row["penalty"]
    origin = row.get("build", {}).get("origin", "")
    print(
        f"{row['backend']:11s} {row['config']:10s} {origin:9s} "
        f"{first['synapse_ms']:8.2f} {first['dense_ms']:7.2f} {first['ratio']:6.2f}x   "
        f"{gp['synapse_ms']:8.2f} {gp['dense_ms']:7.2f} {gp['ratio']:6.2f}x   "
        f"load {statistics.median(row['loads']):.1f}",
        flush=True,
    )


def _measure(backends, levels, configs, cache, args) -> tuple[list, list]:
    """The step rows and the MNIST rows."""
    rows, mnist_rows = [], []
    if args.rounds:
        print(
            f"{'backend':11s} {'config':10s} {'library':9s} "
            f"{'syn ms':>8s} {'dense':>7s} {'ratio':>7s}   "
            f"{'GP syn':>8s} {'dense':>7s} {'ratio':>7s}   (first order | gradient penalty)"
        )
    for backend in backends if args.rounds else ():
        runs = {config: [] for config in configs}
        for r in range(args.rounds):  # round-robin, rotated each round
            shift = r % len(configs)
            for config in configs[shift:] + configs[:shift]:
                if config != "ops" or r < args.ops_rounds:
                    runs[config].append(_run(backend, config, cache, args))
        for config in configs:
            if runs[config]:  # none for ops with --ops-rounds 0
                rows.append(_summary(backend, config, runs[config]))
                _print(rows[-1])
    if args.mnist_steps:
        print(
            f"MNIST (lenet, batch 128), seconds of epoch 2 of {args.mnist_steps} steps"
        )
        for backend in backends:
            row = mnist(
                backend,
                args.mnist_steps,
                args.mnist_rounds,
                cache,
                args.mnist_level,
            )
            mnist_rows.append(row)
            print(
                f"{backend:11s} auto {row['auto_s']:6.2f} s   ops {row['ops_s']:6.2f} s"
                f"   auto/ops {row['auto_over_ops']:.2f}",
                flush=True,
            )
    return rows, mnist_rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", type=_machine.backends, default=_machine.BACKENDS)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--n", type=int, default=784)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ops-rounds", type=int, default=1)
    parser.add_argument("--ops-repeats", type=int, default=3)
    parser.add_argument("--packaged", type=Path, default=None, metavar="DIR")
    parser.add_argument("--mnist-steps", type=int, default=100)
    parser.add_argument("--mnist-rounds", type=int, default=2)
    parser.add_argument("--mnist-level", default=None, metavar="LEVEL")
    parser.add_argument("--busy", type=int, default=0, metavar="N")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/levels.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    backends = args.backends
    if args.packaged:
        args.packaged = args.packaged.resolve()

    from keras_synann.kernels import cpu_levels

    info = _machine.describe()
    features = cpu_levels.cpu_features()
    print(f"# {_machine.line(info)}; {_machine.load()}")
    levels = list(cpu_levels.supported())
    configs = [*levels, "native", "ops"]
    with tempfile.TemporaryDirectory(prefix="levels-cache-") as name:
        cache = Path(name)
        build_seconds = builds([*levels, "native"], cache, "jax" in backends)
        spinners = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(args.busy)
        ]
        try:
            rows, mnist_rows = _measure(backends, levels, configs, cache, args)
        finally:
            for spinner in spinners:
                spinner.kill()
                spinner.wait()
    _machine.save(
        "benchmarks.levels", argv, args.out,
        cpu_flags=sorted(f for f in features if f.startswith(("avx", "fma", "sse4"))),
        levels=levels, load_after=_machine.load(), batch=args.batch, n=args.n,
        repeats=args.repeats, rounds=args.rounds, ops_repeats=args.ops_repeats,
        ops_rounds=args.ops_rounds, busy=args.busy, versions=_machine.versions(),
        builds_s=build_seconds,
        packaged=str(args.packaged) if args.packaged else None,
        rows=rows, mnist=mnist_rows,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
