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
    synann_run/logs/       worker-N.log, .exit, .json (the agent's record), status-N.json
                           (training's status file), agent-N.log; copied back from
                           every worker
    synann_run/src/.synann/agent.py   the slice's supervisor (cloud/agent.py)

and, written by the startup script as root at every boot:
$TMPDIR/synann/agent.py (TMPDIR unset: /tmp) and watchdog.log beside it.

Every command is safe to run twice, also while the first still runs: gcloud
repeats an ssh command whose connection failed (exit 255), up to 10 times.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

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

#: The metadata server, as gcloud and google-auth find it (GCE_METADATA_ROOT).
METADATA = "http://${GCE_METADATA_ROOT:-metadata.google.internal}/computeMetadata/v1"
# The worker's index in the slice: from the TPU VM metadata server, else from
# the hostname (TPU VM hostnames end in -w-N), else 0.
_WORKER_ID = (
    "w=\"$(curl -sf --max-time 5 -H 'Metadata-Flavor: Google' "
    f"{METADATA}/instance/attributes/agent-worker-number || hostname | "
    "sed -n 's/.*-w-\\([0-9][0-9]*\\)$/\\1/p')\"; "
    'w="${w:-0}"'
)
#: The slice's supervisor in the copied tree (pack adds cloud/agent.py there).
AGENT = ".synann/agent.py"


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
    backend: str,
    checkpoint_dir: str | None = None,
    account: str | None = None,
    output: str | None = None,
    new_output: bool = True,
) -> str:
    """Check this worker before any worker starts training: it knows its
    index, its venv imports the backend, its versions are the pinned ones,
    the slice's agent finds its deadline and may delete the slice (and write
    the gs:// `output`, worker 0, which must be empty when `new_output`), and (worker 0, with `checkpoint_dir`) it
    can write the checkpoint directory as the TPU's service account
    `account`. Prints one line, `preflight: worker N ok` or `preflight:
    worker N failed: WHY`, and exits non-zero on failure: a worker that
    cannot train must stop the submission before the others start and wait
    for it to join them."""
    check = f"{VENV_PYTHON} -c {q(_PREFLIGHT_PY)} {q(pins_file(backend))} {q(backend)}"
    agent = f"{VENV_PYTHON} {AGENT} preflight"
    if output:
        new = " --new" if new_output else ""
        agent = f'{{ if [ "$w" = 0 ]; then {agent} --output {q(output)}{new}; else {agent}; fi; }}'
    check += f" && {agent}"
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
    return train + ["--output-dir", "../output", "--status-file", STATUS_FILE]


#: training/mnist.py --status-file on every worker ({process}: its index).
STATUS_FILE = "../logs/status-{process}.json"


@dataclass(frozen=True)
class Supervision:
    """How the slice's agent supervises a run: `output`, the gs:// URI its
    copies go to ("" : none); worker 0 deletes the slice `delete_after_s`
    seconds after training ended (None: never, --keep); a copy every
    `copy_every_s` seconds; training gets SIGTERM `stop_grace_s` before the
    slice's deadline (it saves), SIGKILL at the deadline."""

    output: str = ""
    delete_after_s: float | None = None
    copy_every_s: float = 60.0
    stop_grace_s: float = 120.0

    def words(self) -> list[str]:
        delete = -1 if self.delete_after_s is None else self.delete_after_s
        return [
            f"--output {q(self.output)}",
            f"--delete-after {delete:g}",
            f"--copy-every {self.copy_every_s:g}",
            f"--stop-grace {self.stop_grace_s:g}",
        ]


def run_command(
    backend: str,
    train_args: list[str],
    timeout_s: int | None = None,
    env: dict[str, str] | None = None,
    run_id: str = "run",
    supervision: Supervision = Supervision(),
    follow: bool = True,
) -> str:
    """Start training on this worker under the slice's agent, or follow the
    one already started.

    The first run for `run_id` takes the lock ~/synann_run/run/ and starts
    the agent (cloud/agent.py) in a session of its own, so a dropped ssh
    connection does not end it; the agent runs training with its output in
    ~/synann_run/logs/worker-N.log and its exit status (124 on timeout) in
    logs/worker-N.exit, copies them as `supervision` says, and records a
    SIGTERM nobody asked for (logs/worker-N.sigterm). A second run with the
    same id (gcloud repeats an ssh command whose connection failed) starts
    nothing and follows the first; one with another id refuses. With
    `follow`, worker 0 streams the log to stdout (gcloud shows it) and every
    worker exits with the training's status; without, every worker exits 0
    once its training started (detached runs). `env` adds environment
    variables (names must be identifiers). The script checks the installed
    versions against the pins file before training (SYNANN_PINS).
    """
    if not re.fullmatch(r"[A-Za-z0-9._-]+", run_id):
        raise ValueError(f"run id {run_id!r} is not valid; use letters, digits, . _ -")
    train = _training(backend, train_args, timeout_s, env)
    rid = q(run_id)
    agent = [
        f"setsid {VENV_PYTHON} {AGENT} run",
        '--worker "$w" --log-dir ../logs --output-dir ../output',
        *supervision.words(),
        "--pid-file ../run/pid --stopped-file ../run/stopped --",
    ]
    launch = (
        f"{' '.join(agent)} {' '.join(train)} "
        '< /dev/null >> "../logs/agent-$w.log" 2>&1 &'
    )
    if follow:
        # Until training's exit status is written (the agent lives on after
        # it: copies, and worker 0's delete), or the agent is gone.
        wait = [
            'if [ "$w" = 0 ]; then tail -n +1 -F -s 0.5 "$log" 2>/dev/null & t=$!; '
            "else t=; fi",
            'while [ ! -f "$status" ] && kill -0 "$pid" 2>/dev/null; do sleep 1; done',
            'if [ -n "$t" ]; then sleep 1; kill "$t" 2>/dev/null; fi',
            'if [ ! -f "$status" ]; then echo "worker $w: training ended without an '
            'exit status" >&2; exit 1; fi',
            'exit "$(cat "$status")"',
        ]
    else:
        wait = [f'echo "worker $w: training {run_id} runs (process group $pid)"']
    return "; ".join(
        [
            f"cd {REMOTE_DIR}/src || exit 1",
            _WORKER_ID,
            'log="../logs/worker-$w.log"; status="../logs/worker-$w.exit"',
            "mkdir -p ../logs",
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
            *wait,
        ]
    )


def startup_script(agent_source: str) -> str:
    """The slice's startup script (metadata `startup-script`), run as root at
    every boot of every worker: writes the agent to $TMPDIR/synann (TMPDIR
    unset: /tmp) and starts its watchdog in a session of its own, unless
    one runs; the watchdog deletes the slice at its deadline."""
    if "SYNANN_AGENT_EOF" in agent_source:
        raise ValueError("the agent's source cannot contain its own end marker")
    return "\n".join(
        [
            "#!/bin/sh",
            "# keras-synann: at the deadline in the metadata (synann-deadline),",
            "# this worker deletes its slice (cloud/agent.py watchdog).",
            'dir="${TMPDIR:-/tmp}/synann"',
            'mkdir -p "$dir" || exit 1',
            "cat > \"$dir/agent.py.new\" <<'SYNANN_AGENT_EOF'",
            agent_source.rstrip("\n"),
            "SYNANN_AGENT_EOF",
            'mv "$dir/agent.py.new" "$dir/agent.py" || exit 1',
            'if [ -s "$dir/watchdog.pid" ] && kill -0 "$(cat "$dir/watchdog.pid")" '
            '2>/dev/null; then echo "synann: watchdog runs"; exit 0; fi',
            'setsid python3 "$dir/agent.py" --log "$dir/watchdog.log" watchdog '
            "< /dev/null > /dev/null 2>&1 &",
            'echo $! > "$dir/watchdog.pid"',
            'echo "synann: watchdog started (process $!)"',
            "",
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
