"""Shell strings run on the TPU workers over `gcloud ... ssh --command`.

Each is a POSIX sh command line, run in the worker user's home directory.
Every user-supplied value in it goes through `shlex.quote`, so spaces, quotes
or ';' in a value stay one literal argument.

On a worker (paths relative to the home directory):

    synann_src.tar.gz      the copied tree (removed once the install succeeded)
    synann_run/src/        the tree; training runs here
    synann_run/venv/       Python WORKER_PYTHON (uv-managed) with the pinned packages
    synann_run/installed   written when the install succeeded
    synann_run/run/        the lock of the run step: id (the run's), pid (its group)
    synann_run/output/     training/mnist.py --output-dir (copied back from worker 0)
    synann_run/logs/       worker-N.log and worker-N.exit (copied back from every worker)

Every command is safe to run twice, also while the first still runs: gcloud
repeats an ssh command whose connection failed (exit 255), up to 10 times.
"""

from __future__ import annotations

import re
import shlex

from cloud.gcloud import REMOTE_DIR, REMOTE_TARBALL

#: The Python every worker trains with: the one tox and CI test (TPU VM images
#: are Ubuntu 22.04, whose python3 is 3.10, too old for keras >= 3.13 and
#: jax >= 0.7). uv installs it, as a uv-managed interpreter, into the venv.
WORKER_PYTHON = "3.11"
UV_VERSION = "0.13.9"
UV = '"$HOME/.local/bin/uv"'
VENV_PYTHON = "../venv/bin/python"  # relative to synann_run/src
INSTALL_LOCK = "install.lock"  # in synann_run/: one install at a time
INSTALLED = "installed"  # in synann_run/: the install finished
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


def install_command(backend: str, extras=()) -> str:
    """Unpack the copied tree, then make ~/synann_run/venv: uv (pinned)
    installs a uv-managed Python WORKER_PYTHON and the package with the
    backend's TPU build, every version from the backend's pins file.

    Safe to run twice, also at once (gcloud reruns an ssh command whose
    connection failed): a lock serializes the runs, the tree is unpacked
    beside its place and renamed into it, the tarball is removed only once
    everything succeeded, and a finished install is not repeated.
    """
    pins, backend_extras, packages, find_links = TPU_INSTALL[backend]
    spec = ".[" + ",".join([*backend_extras, "training", *extras]) + "]"
    pip = [UV, "pip", "install", "--quiet", "--python", VENV_PYTHON, "-c", pins]
    pip += [q(spec), *(q(p) for p in packages)]
    if find_links:
        pip += ["--find-links", q(find_links)]
    src, partial = f"{REMOTE_DIR}/src", f"{REMOTE_DIR}/src.partial"
    unpack = " && ".join(
        [
            f"rm -rf {partial}",
            f"mkdir -p {partial}",
            f"tar -xzf {REMOTE_TARBALL} -C {partial}",
            f"mv {partial} {src}",
        ]
    )
    return "; ".join(
        [
            f"mkdir -p {REMOTE_DIR}/output {REMOTE_DIR}/logs || exit 1",
            f"exec 9>{REMOTE_DIR}/{INSTALL_LOCK} && flock 9 || exit 1",
            f"if [ -f {REMOTE_DIR}/{INSTALLED} ]; then "
            'echo "install: already done on this worker"; exit 0; fi',
            f"if [ ! -d {src} ]; then {unpack} || exit 1; fi",
            " && ".join(
                [
                    f"cd {src}",
                    f"python3 -m pip install --user --quiet uv=={UV_VERSION}",
                    f"{UV} venv --quiet --clear --managed-python "
                    f"--python {WORKER_PYTHON} ../venv",
                    " ".join(pip),
                    f"touch ../{INSTALLED}",
                    f"rm -f ../../{REMOTE_TARBALL}",
                ]
            ),
        ]
    )


#: Run by the preflight step with the worker venv's Python: import the
#: backend, compare the installed versions with the pins file.
_PREFLIGHT_PY = (
    "import importlib, sys; from training import environment as e; "
    "importlib.import_module(sys.argv[2]); p = e.pin_mismatches(sys.argv[1]); "
    'sys.exit("; ".join(p) if p else 0)'
)


#: Run by worker 0's preflight with --checkpoint-dir: write a file there and
#: delete it, through etils.epath (orbax's file layer), so a bucket the TPU's
#: service account cannot write fails now, not at the end of epoch 1.
_PROBE_PY = (
    "import sys, uuid; from etils import epath; d = epath.Path(sys.argv[1]); "
    "p = d / ('.synann-probe-' + uuid.uuid4().hex)\n"
    "try:\n d.mkdir(parents=True, exist_ok=True); p.write_text('probe'); p.unlink()\n"
    "except Exception as e:\n sys.exit('cannot write ' + sys.argv[1] + ' (' + "
    "type(e).__name__ + ': ' + str(e).splitlines()[0][:200] + '); the service "
    "account ' + sys.argv[2] + ' needs roles/storage.objectAdmin on the bucket')"
)


def preflight_command(
    backend: str, checkpoint_dir: str | None = None, account: str | None = None
) -> str:
    """Check this worker before any worker starts training: it knows its
    index, its venv imports the backend, its versions are the pinned ones,
    and (worker 0, with `checkpoint_dir`) it can write the checkpoint
    directory as the TPU's service account `account`. Prints one line,
    `preflight: worker N ok` or `preflight: worker N failed: WHY`, and exits
    non-zero on failure: a worker that cannot train must stop the submission
    before the others start and wait for it to join them."""
    check = f"{VENV_PYTHON} -c {q(_PREFLIGHT_PY)} {q(pins_file(backend))} {q(backend)}"
    if checkpoint_dir:
        who = account or "(the project's Compute Engine default)"
        probe = f"{VENV_PYTHON} -c {q(_PROBE_PY)} {q(checkpoint_dir)} {q(who)}"
        check = f'{check} && {{ [ "$w" != 0 ] || {probe}; }}'
    return "; ".join(
        [
            f"cd {REMOTE_DIR}/src || exit 1",
            _WORKER_ID,
            f"why=$({check} 2>&1); code=$?",
            'if [ "$code" = 0 ]; then echo "preflight: worker $w ok"; else echo '
            '"preflight: worker $w failed: $(printf \'%s\\n\' "$why" | tail -n 1)"; fi',
            'exit "$code"',
        ]
    )


def _training(backend, train_args, timeout_s, env) -> list[str]:
    """The training command line, as words of the remote shell."""
    train = [
        "env",
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
        # --foreground: stay in the run's process group, which stop_command ends.
        train += ["timeout", "--foreground", "--signal=TERM", str(int(timeout_s))]
    train += [VENV_PYTHON, "training/mnist.py", *(q(a) for a in train_args)]
    return train + ["--output-dir", "../output"]


#: Started by the run step in a session of its own (setsid): writes its
#: process id (= its process group) to run/pid, trains with output to the
#: log, then writes the exit status. A SIGTERM that reaches this shell (a
#: spot VM's preemption notice goes to every process) is recorded in
#: logs/worker-N.sigterm with what the metadata server says of
#: instance/preempted, unless stop_command sent it (run/stopped).
_LAUNCH = (
    "echo $$ > ../run/pid.new && mv ../run/pid.new ../run/pid; "
    'log=$1; status=$2; shift 2; sig="${status%.exit}.sigterm"; '
    "trap 'if [ ! -f ../run/stopped ]; then p=$(curl -sf --max-time 2 -H "
    '"Metadata-Flavor: Google" http://metadata.google.internal/computeMetadata/'
    'v1/instance/preempted 2>/dev/null); echo "SIGTERM preempted=${p:-unknown}" '
    '> "$sig"; fi\' TERM; '
    '"$@" > "$log" 2>&1 < /dev/null; echo $? > "$status"'
)


def run_command(
    backend: str,
    train_args: list[str],
    timeout_s: int | None = None,
    env: dict[str, str] | None = None,
    run_id: str = "run",
) -> str:
    """Start training on this worker, or follow the one already started.

    The first run for `run_id` takes the lock ~/synann_run/run/ and starts
    training in its own session, so a dropped ssh connection does not end
    it; its output goes to ~/synann_run/logs/worker-N.log, its exit status
    (124 on timeout) to logs/worker-N.exit. A second run with the same id
    (gcloud repeats an ssh command whose connection failed) starts nothing
    and follows the first; one with another id refuses. Worker 0 streams the
    log to stdout (gcloud shows it); every worker exits with the training's
    status. `env` adds environment variables (names must be identifiers).
    The script checks the installed versions against the pins file before
    training (SYNANN_PINS).
    """
    if not re.fullmatch(r"[A-Za-z0-9._-]+", run_id):
        raise ValueError(f"run id {run_id!r} is not valid; use letters, digits, . _ -")
    train = _training(backend, train_args, timeout_s, env)
    rid = q(run_id)
    launch = (
        f'setsid sh -c {q(_LAUNCH)} sh "$log" "$status" {" ".join(train)} '
        "< /dev/null > /dev/null 2>&1 &"
    )
    return "; ".join(
        [
            f"cd {REMOTE_DIR}/src || exit 1",
            _WORKER_ID,
            'log="../logs/worker-$w.log"; status="../logs/worker-$w.exit"',
            f"if mkdir ../run 2>/dev/null; then echo {rid} > ../run/id; {launch} "
            f'else echo "worker $w: run {run_id} was started already; following it" '
            ">&2; fi",
            "i=0; while [ ! -s ../run/pid ] && [ $i -lt 60 ]; do sleep 1; "
            "i=$((i + 1)); done",
            f'if [ "$(cat ../run/id 2>/dev/null)" != {rid} ]; then echo "worker $w: '
            f"another training ($(cat ../run/id 2>/dev/null)) holds this worker; "
            f'not starting run {run_id}" >&2; exit 1; fi',
            'pid="$(cat ../run/pid 2>/dev/null)"',
            'if [ -z "$pid" ]; then echo "worker $w: training did not start" >&2; '
            "exit 1; fi",
            'if [ "$w" = 0 ]; then tail -n +1 -F -s 0.5 --pid="$pid" "$log" '
            '2>/dev/null; else while kill -0 "$pid" 2>/dev/null; do sleep 1; done; fi',
            'if [ ! -f "$status" ]; then echo "worker $w: training ended without an '
            'exit status" >&2; exit 1; fi',
            'exit "$(cat "$status")"',
        ]
    )


def stop_command() -> str:
    """End this worker's training (its whole process group) if one runs; the
    run marks the SIGTERM as asked for (run/stopped), not a preemption."""
    return (
        f'pid="$(cat {REMOTE_DIR}/run/pid 2>/dev/null)"; '
        'if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then '
        f"touch {REMOTE_DIR}/run/stopped; "
        'kill -s TERM -- "-$pid"; echo "stopped training (process group $pid)"; fi; '
        "exit 0"
    )


#: A command that only tests whether a worker answers ssh.
REACHABLE = "true"


def logs_command(lines: int = 100, follow: bool = False) -> str:
    """Show the end of this worker's training log (all the worker's logs)."""
    tail = ["tail", "-n", str(int(lines))] + (["-F"] if follow else [])
    return f"cd {REMOTE_DIR}/logs && {' '.join(tail)} worker-*.log"
