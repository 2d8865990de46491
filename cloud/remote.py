"""Shell strings run on the TPU workers over `gcloud ... ssh --command`.

Each is a POSIX sh command line, run in the worker user's home directory.
Every user-supplied value in it goes through `shlex.quote`, so spaces, quotes
or ';' in a value stay one literal argument.

On a worker (paths relative to the home directory):

    synann_src.tar.gz      the copied tree (removed once unpacked)
    synann_run/src/        the tree; training runs here
    synann_run/venv/       Python WORKER_PYTHON (uv-managed) with the pinned packages
    synann_run/output/     training/mnist.py --output-dir (copied back from worker 0)
    synann_run/logs/       worker-N.log and worker-N.exit (copied back from every worker)
"""

from __future__ import annotations

import shlex

from cloud.gcloud import REMOTE_DIR, REMOTE_TARBALL

#: The Python every worker trains with: the one tox and CI test (TPU VM images
#: are Ubuntu 22.04, whose python3 is 3.10, too old for keras >= 3.13 and
#: jax >= 0.7). uv installs it, as a uv-managed interpreter, into the venv.
WORKER_PYTHON = "3.11"
UV_VERSION = "0.13.9"
UV = '"$HOME/.local/bin/uv"'
VENV_PYTHON = "../venv/bin/python"  # relative to synann_run/src
#: Per backend: the pins file (in the repository) the worker installs from,
#: the project's extras, the TPU packages, and pip's --find-links if any.
#: jax: `jax[tpu]` takes libtpu from PyPI (JAX's install docs). tensorflow:
#: tensorflow-tpu 2.19.1 alone (it ships the `tensorflow` module; the stock
#: `tensorflow` extra is not installed beside it), its libtpu from Google's
#: index, as Keras's own TPU requirements do.
TPU_INSTALL = {
    "jax": ("constraints.txt", ["jax"], ["jax[tpu]"], None),
    "tensorflow": (
        "constraints-tpu-tensorflow.txt",
        [],
        ["tensorflow-tpu==2.19.1"],
        "https://storage.googleapis.com/libtpu-tf-releases/index.html",
    ),
}
#: Environment tensorflow-tpu 2.19 needs to find the TPU (PJRT through the
#: pluggable-device C API, libtpu's library path; from the keras-io TPU
#: guides); the library path is read from the installed libtpu at run time.
TF_TPU_ENV = (
    "PJRT_DEVICE=TPU NEXT_PLUGGABLE_DEVICE_USE_C_API=true "
    f'TF_PLUGGABLE_DEVICE_LIBRARY_PATH="$({VENV_PYTHON} -c '
    "'import libtpu; print(libtpu.get_library_path())')\""
)

# The worker's index in the slice: $SYNANN_WORKER_ID if set (the local
# rehearsal sets it), else from the TPU VM metadata server, else from the
# hostname (TPU VM hostnames end in -w-N), else 0.
_WORKER_ID = (
    "w=\"${SYNANN_WORKER_ID:-$(curl -sf --max-time 5 -H 'Metadata-Flavor: Google' "
    "http://metadata.google.internal/computeMetadata/v1/instance/attributes/"
    "agent-worker-number || hostname | sed -n 's/.*-w-\\([0-9][0-9]*\\)$/\\1/p')}\"; "
    'w="${w:-0}"'
)


def q(value: object) -> str:
    return shlex.quote(str(value))


def pins_file(backend: str) -> str:
    """The constraints file (relative to the repository root) a backend's
    workers install from and check against."""
    return TPU_INSTALL[backend][0]


def unpack_command() -> str:
    """Unpack the copied tree into ~/synann_run/src (anything older removed)."""
    return " && ".join(
        [
            f"rm -rf {REMOTE_DIR}",
            f"mkdir -p {REMOTE_DIR}/src {REMOTE_DIR}/output {REMOTE_DIR}/logs",
            f"tar -xzf {REMOTE_TARBALL} -C {REMOTE_DIR}/src",
            f"rm -f {REMOTE_TARBALL}",
        ]
    )


def install_command(backend: str, extras=()) -> str:
    """Unpack, then make ~/synann_run/venv: uv (pinned) installs a uv-managed
    Python WORKER_PYTHON and the package with the backend's TPU build, every
    version from the backend's pins file."""
    pins, backend_extras, packages, find_links = TPU_INSTALL[backend]
    spec = ".[" + ",".join([*backend_extras, "training", *extras]) + "]"
    pip = [UV, "pip", "install", "--quiet", "--python", VENV_PYTHON, "-c", pins]
    pip += [q(spec), *(q(p) for p in packages)]
    if find_links:
        pip += ["--find-links", q(find_links)]
    return " && ".join(
        [
            unpack_command(),
            f"cd {REMOTE_DIR}/src",
            f"python3 -m pip install --user --quiet uv=={UV_VERSION}",
            f"{UV} venv --quiet --managed-python --python {WORKER_PYTHON} ../venv",
            " ".join(pip),
        ]
    )


def run_command(
    backend: str,
    train_args: list[str],
    timeout_s: int | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Run training on this worker; log to ~/synann_run/logs/worker-N.log.

    Worker 0 also writes the log to stdout (streamed by gcloud); the others only
    to their file. The training script's exit status (124 on timeout) goes to
    logs/worker-N.exit and is the command's. `env` adds environment variables
    (names must be identifiers). The script checks the installed versions
    against the pins file before training (SYNANN_PINS).
    """
    train = [
        f"KERAS_BACKEND={q(backend)}",
        "PYTHONUNBUFFERED=1",
        f"SYNANN_PINS={q(pins_file(backend))}",
    ]
    if backend == "tensorflow":
        train.append(TF_TPU_ENV)
    for key, value in (env or {}).items():
        if not key.isidentifier() or not key.isascii():
            raise ValueError(f"environment variable name {key!r} is not valid")
        train.append(f"{key}={q(value)}")
    if timeout_s:
        train += ["timeout", "--signal=TERM", str(int(timeout_s))]
    train += [VENV_PYTHON, "training/mnist.py", *(q(a) for a in train_args)]
    train += ["--output-dir", "../output"]
    status = '"../logs/worker-$w.exit"'
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
