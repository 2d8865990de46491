"""Shell strings run on the TPU workers over `gcloud ... ssh --command`.

Each is a POSIX sh command line. Every user-supplied value in it goes through
`shlex.quote`, so spaces, quotes or ';' in a value stay one literal argument.
"""

from __future__ import annotations

import shlex

from cloud.gcloud import REMOTE_DIR, REMOTE_TARBALL

# What each backend needs on a TPU VM besides the package (see FACTS.md): jax's
# TPU build, or tensorflow-tpu 2.19.1 (the last TensorFlow release for TPUs) with
# the matching tensorflow, as Keras's own TPU requirements pin them.
TPU_PACKAGES = {
    "jax": (
        ["jax[tpu]"],
        "https://storage.googleapis.com/jax-releases/libtpu_releases.html",
    ),
    "tensorflow": (
        ["tensorflow==2.19.1", "tensorflow-tpu==2.19.1"],
        "https://storage.googleapis.com/libtpu-tf-releases/index.html",
    ),
}

# The worker's index in the slice: from the TPU VM metadata server, else from the
# hostname (TPU VM hostnames end in -w-N), else 0.
_WORKER_ID = (
    "w=$(curl -sf --max-time 5 -H 'Metadata-Flavor: Google' "
    "http://metadata.google.internal/computeMetadata/v1/instance/attributes/"
    "agent-worker-number || hostname | sed -n 's/.*-w-\\([0-9][0-9]*\\)$/\\1/p'); "
    'w="${w:-0}"'
)


def q(value: object) -> str:
    return shlex.quote(str(value))


def install_command(backend: str, python: str = "python3", extras=()) -> str:
    """Unpack the copied tree into ~/synann_run/src and pip install it."""
    packages, find_links = TPU_PACKAGES[backend]
    spec = ".[" + ",".join([backend, "training", *extras]) + "]"
    pip = [q(python), "-m", "pip", "install", "--quiet", q(spec)]
    pip += [q(p) for p in packages] + ["--find-links", q(find_links)]
    steps = [
        f"rm -rf {REMOTE_DIR}",
        f"mkdir -p {REMOTE_DIR}/src {REMOTE_DIR}/output {REMOTE_DIR}/logs",
        f"tar -xzf {REMOTE_TARBALL} -C {REMOTE_DIR}/src",
        f"rm -f {REMOTE_TARBALL}",
        f"cd {REMOTE_DIR}/src",
        " ".join(pip),
    ]
    return " && ".join(steps)


def run_command(
    backend: str,
    train_args: list[str],
    python: str = "python3",
    timeout_s: int | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Run training on this worker; log to ~/synann_run/logs/worker-N.log.

    Worker 0 also writes the log to stdout (streamed by gcloud); the others only
    to their file. `env` adds environment variables (names must be identifiers).
    The exit status is the training script's (124 on timeout).
    """
    train = [f"KERAS_BACKEND={q(backend)}", "PYTHONUNBUFFERED=1"]
    for key, value in (env or {}).items():
        if not key.isidentifier() or not key.isascii():
            raise ValueError(f"environment variable name {key!r} is not valid")
        train.append(f"{key}={q(value)}")
    if timeout_s:
        train += ["timeout", "--signal=TERM", str(int(timeout_s))]
    train += [q(python), "training/mnist.py", *(q(a) for a in train_args)]
    train += ["--output-dir", "../output"]
    status = '"../exit-$w"'
    return "; ".join(
        [
            f"cd {REMOTE_DIR}/src || exit 1",
            _WORKER_ID,
            'log="../logs/worker-$w.log"',
            f'({" ".join(train)}; echo $? > {status}) 2>&1 | tee "$log" | '
            '{ if [ "$w" = 0 ]; then cat; else cat > /dev/null; fi; }',
            f'exit "$(cat {status} 2>/dev/null || echo 1)"',
        ]
    )


def logs_command(lines: int = 100, follow: bool = False) -> str:
    """Show the end of this worker's training log (all the worker's logs)."""
    tail = ["tail", "-n", str(int(lines))] + (["-F"] if follow else [])
    return f"cd {REMOTE_DIR}/logs && {' '.join(tail)} worker-*.log"
