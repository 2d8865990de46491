"""What `submit` does, step by step: a validated `Submission` and the `Step`s
it runs, each with its gcloud command(s). Nothing runs here; `submit --dry-run`
prints these (`print_plan`), cloud/submit.py runs them.

A submission runs the setup steps once (check, pack), then one attempt: create,
wait, workers, copy, install, preflight, run, logs, copy-back, verify. With
--retries N, a slice lost on the way (preempted, or no worker answering) is
deleted and the attempt runs again on a new one, up to N times, training then
resuming from --checkpoint-dir.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from cloud import checks, gcloud, remote

SETUP_STEPS = ("check", "pack")
ATTEMPT_STEPS = (
    "create",
    "wait",
    "workers",
    "copy",
    "install",
    "preflight",
    "run",
    "logs",
    "copy-back",
    "verify",
)


@dataclass(frozen=True)
class Limits:
    """Client-side time limits, in seconds, on every gcloud command a
    submission runs (nothing waits unbounded while a TPU bills). When one
    passes, the command and its ssh/scp are stopped; after a remote step,
    the logs that can still be fetched are, and the TPU is deleted.

    copy, install, preflight, logs, copy-back, probe, describe and delete are
    fixed; run is --run-timeout plus `run_margin_s` (startup, the joining of
    the workers, writing the outputs). After a SIGTERM ended a worker's
    training, the slice's state is watched for `preempt_poll_s` before the run
    counts as failed rather than preempted."""

    copy_s: int = 1800
    install_s: int = 1800
    preflight_s: int = 300
    run_margin_s: int = 600
    logs_s: int = 300
    copy_back_s: int = 900
    probe_s: int = 300
    describe_s: int = 120
    delete_s: int = 900
    preempt_poll_s: int = 300


#: --run-timeout when none is given.
DEFAULT_RUN_TIMEOUT = "2h"
#: A rehearsal's limits and ssh options: loopback answers at once, so a
#: silent worker is found in seconds (2 s x 3 keepalives).
REHEARSAL_LIMITS = Limits(
    copy_s=120,
    install_s=300,
    preflight_s=120,
    run_margin_s=20,
    logs_s=25,
    copy_back_s=60,
    probe_s=40,
    describe_s=60,
    delete_s=60,
    preempt_poll_s=30,
)
REHEARSAL_KEEPALIVE = (
    "ServerAliveInterval=2",
    "ServerAliveCountMax=3",
    "ConnectTimeout=3",
)


@dataclass
class Step:
    name: str
    about: str
    argv: list[str] | None = None
    remote: str | None = None  # the shell string run on the workers, if any
    parallel: list[list[str]] = field(default_factory=list)  # run at once


@dataclass
class Submission:
    """A validated submit request."""

    target: gcloud.Target
    acc: checks.Accelerator
    runtime: str
    backend: str
    provisioning: str
    wait_timeout_s: int
    poll_s: float
    output_dir: str
    source: Path
    excludes: list[str]
    extras: list[str]
    run_timeout_s: int
    keep: bool
    rehearse: bool = False
    train_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    retries: int = 0
    checkpoint_dir: str | None = None
    preempt_after_epoch: int | None = None  # rehearsals only
    faults: tuple[str, ...] = ()  # rehearsals only
    service_account: str | None = None
    limits: Limits = field(default_factory=Limits)
    #: The slice's workers: the accelerator table's count until the `workers`
    #: step reads the created TPU's networkEndpoints.
    workers: int = 0

    def __post_init__(self):
        self.workers = self.workers or self.acc.hosts

    @property
    def attempts(self) -> int:
        return self.retries + 1

    @property
    def kind(self) -> str:
        return "queued resource" if self.target.queued else "TPU VM"

    @property
    def tarball(self) -> str:
        return str(Path(self.output_dir) / "source.tar.gz")

    def run_id(self, attempt: int) -> str:
        """Names one attempt's training on the workers (the run step's lock)."""
        return f"{self.target.name}-{attempt}"

    def training_args(self, attempt: int) -> list[str]:
        """training/mnist.py's arguments: the user's, the checkpoint directory,
        and --resume from the second attempt on."""
        args = list(self.train_args)
        if self.checkpoint_dir:
            args += ["--checkpoint-dir", self.checkpoint_dir]
        if attempt > 1 and "--resume" not in args:
            args.append("--resume")
        return args

    def run_env(self) -> dict[str, str]:
        """Worker environment: multi-host jax runs must join one jax cluster."""
        env = {}
        if self.backend == "jax" and self.acc.multi_host:
            env["SYNANN_MULTIHOST"] = "1"  # see training/distribute/jax.py
        return {**env, **self.env}

    def setup_steps(self) -> list[Step]:
        t = self.target
        steps = [
            Step(
                "check",
                f"check that no {self.kind} is called {t.name}",
                gcloud.describe(t, gcloud.NAME_ONLY),
            )
        ]
        if t.queued:
            steps.append(
                Step(
                    "check",
                    f"check that no TPU VM is called {t.name}",
                    gcloud.describe_vm(t, gcloud.NAME_ONLY),
                )
            )
        steps.append(
            Step(
                "pack",
                f"pack {_shown(self.source)} into {self.tarball} (local; without "
                ".git, caches, build outputs, runs/; with training/data/)",
            )
        )
        return steps

    def step(self, name: str, attempt: int = 1) -> Step:
        """One step of an attempt, built from what is known now (the worker
        count once the `workers` step has read it)."""
        t = self.target
        if name == "create":
            return Step(
                "create",
                f"create {self.kind} {t.name}: {self.acc.describe()}, "
                f"{self.provisioning}, runtime {self.runtime}",
                gcloud.create(
                    t,
                    self.acc.name,
                    self.runtime,
                    self.provisioning,
                    self.wait_s,
                    self.service_account,
                ),
            )
        if name == "wait":
            state = gcloud.QR_STATE if t.queued else gcloud.VM_STATE
            return Step(
                "wait",
                f"wait until it is {gcloud.ready_state(t)} (a check every "
                f"{self.poll_s:g}s, at most {hms(self.wait_timeout_s)})",
                gcloud.describe(t, state),
            )
        if name == "workers":
            return Step(
                "workers",
                "count the workers (the node's networkEndpoints; the accelerator "
                f"table says {self.acc.hosts})",
                gcloud.describe_vm(t, gcloud.NODE_JSON),
            )
        if name == "copy":
            return Step(
                "copy",
                "copy the source to worker 0 (this makes and installs the ssh key "
                "once), then to the other workers, one command per worker, all at "
                "once",
                parallel=[
                    gcloud.scp_to(t, self.tarball, gcloud.REMOTE_TARBALL, str(w))
                    for w in range(self.workers)
                ],
            )
        if name == "install":
            install = remote.install_command(self.backend, self.extras)
            return Step(
                "install",
                f"install Python {remote.WORKER_PYTHON} and the {self.backend} "
                f"packages pinned in {remote.pins_file(self.backend)} on every "
                "worker",
                gcloud.ssh(t, install),
                install,
            )
        if name == "preflight":
            check = remote.preflight_command(
                self.backend, self.checkpoint_dir, self.service_account
            )
            return Step(
                "preflight",
                "check every worker before any starts training (its index, the "
                "backend imports, the pinned versions"
                + (
                    ", worker 0 can write --checkpoint-dir)"
                    if self.checkpoint_dir
                    else ")"
                ),
                gcloud.ssh(t, check),
                check,
            )
        if name == "run":
            hosts = (
                "the single host"
                if self.workers == 1
                else f"all {self.workers} hosts at once"
            )
            command = remote.run_command(
                self.backend,
                self.training_args(attempt),
                self.run_timeout_s,
                self.run_env(),
                self.run_id(attempt),
            )
            return Step(
                "run",
                f"train on {hosts}, streaming worker 0's log",
                gcloud.ssh(t, command),
                command,
            )
        if name == "logs":
            return self.logs_step()
        if name == "copy-back":
            return Step(
                "copy-back",
                f"copy the outputs back from worker 0 into {self.output_dir}/output",
                gcloud.scp_back(t, f"{gcloud.REMOTE_DIR}/output", self.output_dir),
            )
        if name == "verify":
            return Step(
                "verify",
                "check that every worker's training exited 0 and that "
                f"{self.output_dir}/output/metrics.json came back",
            )
        raise ValueError(f"no step {name!r}")

    @property
    def wait_s(self) -> int | None:
        return self.wait_timeout_s if self.target.queued else None

    def logs_step(self) -> Step:
        """One copy per worker, all at once: gcloud scp copies from one worker."""
        return Step(
            "logs",
            f"copy every worker's log and exit status into {self.output_dir}/logs "
            "(also after a failure, once training has started)",
            parallel=[
                gcloud.scp_back(
                    self.target, f"{gcloud.REMOTE_DIR}/logs", self.output_dir, str(w)
                )
                for w in range(self.workers)
            ],
        )

    def delete_step(self) -> Step:
        return Step(
            "delete",
            "delete the TPU (always: after success, failure or Ctrl-C)",
            gcloud.delete(self.target),
        )

    def stop_step(self) -> Step:
        return Step(
            "stop",
            "stop the training on every worker (the TPU stays, --keep)",
            gcloud.ssh(self.target, remote.stop_command()),
            remote.stop_command(),
        )

    def probe_step(self) -> Step:
        return Step(
            "probe",
            "check whether each worker answers ssh",
            parallel=[
                gcloud.ssh(self.target, remote.REACHABLE, str(w))
                for w in range(self.workers)
            ],
        )


def hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _shown(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(path)


def print_plan(sub: Submission) -> None:
    """--dry-run: every gcloud command, in order, with what each step does."""
    print("# dry run: these commands would run, in this order (nothing was run)")
    steps = sub.setup_steps() + [sub.step(name) for name in ATTEMPT_STEPS]
    for number, step in enumerate(steps, 1):
        print(f"# {number}. {step.name}: {step.about}")
        if step.remote:
            print(f"#    on the workers: {step.remote}")
        for argv in [step.argv] if step.argv else step.parallel:
            print(shlex.join(argv))
    delete = sub.delete_step()
    if sub.retries:
        first = len(sub.setup_steps()) + 1
        print(
            f"# if the slice is lost (queued resource FAILED or SUSPENDED, TPU VM "
            "PREEMPTED or TERMINATED, or no worker answering ssh): logs/ is kept as "
            f"logs-attempt-N/, the TPU is deleted (the command below) and steps "
            f"{first}-{len(steps)} run again on a new one, at most {sub.retries} "
            f"more time(s); training resumes from {sub.checkpoint_dir}:"
        )
        args = shlex.join(["training/mnist.py", *sub.training_args(2)])
        print(f"#    attempt 2 and later run: {args}")
    if sub.keep:
        print("# --keep: the TPU is left running (and billing); delete it with:")
        print("# " + shlex.join(delete.argv))
    else:
        print(f"# finally, {delete.name}: {delete.about}")
        print(shlex.join(delete.argv))
