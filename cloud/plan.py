"""What `submit` does, step by step: a validated `Submission` and the `Step`s
it runs. Each step is one object: what it does (`about`), its gcloud
command(s), the shell text the workers run, its time limit and its runner
(a function of cloud/steps.py). Nothing runs here; `submit --dry-run` prints
the steps (`print_plan`), cloud/submit.py runs them in order.

A submission runs the setup steps once (check, pack), then one attempt:
create, wait, workers, copy, install, preflight, run, logs, copy-back,
verify; a detached one ends its attempt with `start` instead of run and what
follows it. With --retries N, a slice lost on the way (preempted, in
maintenance, or no worker answering) is deleted and the attempt runs again
on a new one, up to N times, training then resuming from --checkpoint-dir.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cloud import checks, gcloud, remote, steps
from cloud.limits import Limits
from cloud.runner import hms


def now() -> float:
    """The wall clock the slice's deadline is set on."""
    return time.time()


@dataclass
class Step:
    """One step: `runner(context, step)` runs it (cloud/steps.py)."""

    name: str
    about: str
    runner: Callable
    argv: list[str] | None = None
    parallel: list[list[str]] = field(default_factory=list)  # run at once
    remote: str | None = None  # the shell string run on the workers, if any
    limit_s: float | None = None
    judges: bool = False  # runs after training: judges it, is not "the step"

    def commands(self) -> list[list[str]]:
        return [self.argv] if self.argv else self.parallel


@dataclass
class Network:
    """Create options for projects without a `default` network or with an
    org policy against external IPs, and gcloud flags passed through."""

    network: str | None = None
    subnetwork: str | None = None
    internal_ips: bool = False
    tags: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    gcloud_args: tuple[str, ...] = ()


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
    local_dir: str  # source.tar.gz, startup.sh; attached: logs/ and output/
    source: Path
    excludes: list[str]
    extras: list[str]
    run_timeout_s: int
    keep: bool
    max_run_s: int = 4 * 3600
    remote_output: str | None = None  # gs://: the slice's agent copies there
    detach: bool = False
    rehearse: bool = False
    train_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    retries: int = 0
    checkpoint_dir: str | None = None
    service_account: str | None = None
    network: Network = field(default_factory=Network)
    limits: Limits = field(default_factory=Limits)
    follow: list[str] = field(default_factory=list)  # flags for the follow-ups
    #: The slice's workers: the accelerator table's count until the `workers`
    #: step reads the created TPU's networkEndpoints.
    workers: int = 0
    deadline: float = 0.0  # the current slice's, set at its create

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
        return str(Path(self.local_dir) / "source.tar.gz")

    @property
    def startup_script(self) -> str:
        return str(Path(self.local_dir) / "startup.sh")

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

    def create_spec(self, deadline: int) -> gcloud.Create:
        """The create request of a slice that deletes itself at `deadline`."""
        t, n = self.target, self.network
        kind = "queuedResources" if t.queued else "nodes"
        metadata = [
            ("synann-deadline", str(deadline)),
            ("synann-resource", f"locations/{t.zone}/{kind}/{t.name}"),
        ]
        if self.remote_output:
            metadata.append(("synann-output", self.remote_output))
        labels = (
            (gcloud.TOOL_LABEL, gcloud.TOOL),
            (gcloud.DEADLINE_LABEL, str(deadline)),
        )
        return gcloud.Create(
            accelerator_type=self.acc.name,
            runtime_version=self.runtime,
            provisioning=self.provisioning,
            valid_for_s=min(self.wait_timeout_s, self.max_run_s) if t.queued else None,
            max_run_s=self.max_run_s,
            service_account=self.service_account,
            network=n.network,
            subnetwork=n.subnetwork,
            internal_ips=n.internal_ips,
            tags=n.tags,
            labels=labels + n.labels,
            metadata=tuple(metadata),
            metadata_files=(("startup-script", self.startup_script),),
            extra=n.gcloud_args,
        )

    def supervision(self) -> remote.Supervision:
        """How the slice's agent ends the run: detached, worker 0 deletes
        the slice `end_grace_s` after its training ended (the other workers'
        last copies land first); attached, the client deletes it, and the
        deadline if the client cannot."""
        limits = self.limits
        after = limits.end_grace_s if self.detach and not self.keep else None
        return remote.Supervision(
            self.remote_output or "", after, limits.copy_every_s, limits.stop_grace_s
        )

    def setup_steps(self) -> list[Step]:
        t = self.target
        check = [(gcloud.describe(t, gcloud.NAME_ONLY), self.kind)]
        if t.queued:
            check.append((gcloud.describe_vm(t, gcloud.NAME_ONLY), "TPU VM"))
        return [
            *(
                Step(
                    "check",
                    f"check that no {kind} is called {t.name}",
                    steps.check_free,
                    argv,
                    limit_s=self.limits.describe_s,
                )  # fmt: skip
                for argv, kind in check
            ),
            Step(
                "pack",
                f"pack {_shown(self.source)} and the slice's agent into "
                f"{self.tarball}, and its startup script into {self.startup_script} "
                "(local; without .git, caches, build outputs, runs/; with "
                "training/data/)",
                steps.pack,
            ),
        ]

    def attempt_steps(self) -> tuple[Callable, ...]:
        """The builders of an attempt's steps, in order: each makes its Step
        from what is known when it runs (the worker count once `workers`
        has read it, the deadline at create)."""
        middle = (create_step, wait_step, workers_step, copy_step, install_step)
        if self.detach:
            return (*middle, preflight_step, start_step)
        return (
            *middle,
            preflight_step,
            run_step,
            logs_step,
            copy_back_step,
            verify_step,
        )

    def delete_step(self) -> Step:
        return Step(
            "delete",
            "delete the TPU (always: after success, failure or Ctrl-C), retried "
            f"with backoff for up to {hms(self.limits.delete_s)}",
            steps.delete,
            gcloud.delete(self.target),
            limit_s=self.limits.delete_s,
        )

    def stop_step(self) -> Step:
        return Step(
            "stop",
            "stop the training on every worker (the TPU stays, --keep)",
            steps.remote_step,
            gcloud.ssh(self.target, remote.stop_command()),
            remote=remote.stop_command(),
            limit_s=self.limits.preflight_s,
        )

    def probe_step(self) -> Step:
        return Step(
            "probe",
            "check whether each worker answers ssh",
            steps.run_parallel,
            parallel=[
                gcloud.ssh(self.target, remote.REACHABLE, str(w))
                for w in range(self.workers)
            ],
            limit_s=self.limits.probe_s,
        )


# -- the steps of an attempt -----------------------------------------------------------


def create_step(sub: Submission, attempt: int) -> Step:
    t = sub.target
    sub.deadline = int(now()) + sub.max_run_s
    return Step(
        "create",
        f"create {sub.kind} {t.name}: {sub.acc.describe()}, {sub.provisioning}, "
        f"runtime {sub.runtime}; it deletes itself at {utc(sub.deadline)} "
        f"(--max-run-duration {hms(sub.max_run_s)}; its startup script, labels "
        f"{gcloud.TOOL_LABEL} and {gcloud.DEADLINE_LABEL})",
        steps.create,
        gcloud.create(t, sub.create_spec(sub.deadline)),
        limit_s=sub.limits.describe_s,
    )


def wait_step(sub: Submission, attempt: int) -> Step:
    t = sub.target
    state = gcloud.QR_STATE if t.queued else gcloud.VM_STATE
    return Step(
        "wait",
        f"wait until it is {gcloud.ready_state(t)} (a check every "
        f"{sub.poll_s:g}s, at most {hms(sub.wait_timeout_s)})",
        steps.wait_ready,
        gcloud.describe(t, state),
        limit_s=sub.wait_timeout_s,
    )


def workers_step(sub: Submission, attempt: int) -> Step:
    return Step(
        "workers",
        "count the workers (the node's networkEndpoints; the accelerator table "
        f"says {sub.acc.hosts})",
        steps.count_workers,
        gcloud.describe_vm(sub.target, gcloud.NODE_JSON),
        limit_s=sub.limits.describe_s,
    )


def copy_step(sub: Submission, attempt: int) -> Step:
    return Step(
        "copy",
        "copy the source to worker 0 (this makes and installs the ssh key "
        "once), then to the other workers, one command per worker, all at once",
        steps.copy,
        parallel=[
            gcloud.scp_to(sub.target, sub.tarball, gcloud.REMOTE_TARBALL, str(w))
            for w in range(sub.workers)
        ],
        limit_s=sub.limits.copy_s,
    )


def install_step(sub: Submission, attempt: int) -> Step:
    install = remote.install_command(sub.backend, sub.extras)
    return Step(
        "install",
        f"install Python {remote.WORKER_PYTHON} and the {sub.backend} packages "
        f"pinned in {remote.pins_file(sub.backend)} on every worker",
        steps.remote_step,
        gcloud.ssh(sub.target, install),
        remote=install,
        limit_s=sub.limits.install_s,
    )


def preflight_step(sub: Submission, attempt: int) -> Step:
    check = remote.preflight_command(
        sub.backend,
        sub.checkpoint_dir,
        sub.service_account,
        sub.remote_output,
        new_output=attempt == 1,  # a new slice's attempt adds to the same
    )
    writes = [sub.remote_output, sub.checkpoint_dir]
    return Step(
        "preflight",
        "check every worker before any starts training (its index, the backend "
        "imports, the pinned versions, the slice's deadline and its service "
        "account's right to delete the slice"
        + (
            f"; worker 0 can write {' and '.join(w for w in writes if w)})"
            if any(writes)
            else ")"
        ),
        steps.preflight,
        gcloud.ssh(sub.target, check),
        remote=check,
        limit_s=sub.limits.preflight_s,
    )


def _run_command(sub: Submission, attempt: int, follow: bool) -> str:
    return remote.run_command(
        sub.backend,
        sub.training_args(attempt),
        sub.run_timeout_s,
        sub.run_env(),
        sub.run_id(attempt),
        sub.supervision(),
        follow=follow,
    )


def run_step(sub: Submission, attempt: int) -> Step:
    hosts = (
        "the single host" if sub.workers == 1 else f"all {sub.workers} hosts at once"
    )
    command = _run_command(sub, attempt, follow=True)
    return Step(
        "run",
        f"train on {hosts} under the slice's agent, streaming worker 0's log",
        steps.run_training,
        gcloud.ssh(sub.target, command),
        remote=command,
        limit_s=sub.run_timeout_s + sub.limits.run_margin_s,
    )


def start_step(sub: Submission, attempt: int) -> Step:
    command = _run_command(sub, attempt, follow=False)
    return Step(
        "start",
        f"start training on every worker under the slice's agent, which copies "
        f"to {sub.remote_output} and deletes the slice when training ends; "
        "then return",
        steps.start_detached,
        gcloud.ssh(sub.target, command),
        remote=command,
        limit_s=sub.limits.preflight_s,
    )


def logs_step(sub: Submission, attempt: int = 0) -> Step:
    """One copy per worker, all at once: gcloud scp copies from one worker."""
    return Step(
        "logs",
        f"copy every worker's log and exit status into {sub.local_dir}/logs "
        "(also after a failure, once training has started)",
        steps.copy_logs,
        parallel=[
            gcloud.scp_back(
                sub.target, f"{gcloud.REMOTE_DIR}/logs", sub.local_dir, str(w)
            )
            for w in range(sub.workers)
        ],
        limit_s=sub.limits.logs_s,
        judges=True,
    )


def copy_back_step(sub: Submission, attempt: int) -> Step:
    return Step(
        "copy-back",
        f"copy the outputs back from worker 0 into {sub.local_dir}/output",
        steps.copy_back,
        gcloud.scp_back(sub.target, f"{gcloud.REMOTE_DIR}/output", sub.local_dir),
        limit_s=sub.limits.copy_back_s,
        judges=True,
    )


def verify_step(sub: Submission, attempt: int) -> Step:
    return Step(
        "verify",
        "check that every worker's training exited 0 and that "
        f"{sub.local_dir}/output/metrics.json came back",
        steps.verify,
        judges=True,
    )


def utc(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))


def _shown(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(path)


def print_plan(sub: Submission) -> None:
    """--dry-run: every gcloud command, in order, with what each step does."""
    print("# dry run: these commands would run, in this order (nothing was run)")
    plan = sub.setup_steps() + [build(sub, 1) for build in sub.attempt_steps()]
    for number, step in enumerate(plan, 1):
        print(f"# {number}. {step.name}: {step.about}")
        if step.remote:
            print(f"#    on the workers: {step.remote}")
        for argv in step.commands():
            print(shlex.join(argv))
    delete = sub.delete_step()
    if sub.retries:
        first = len(sub.setup_steps()) + 1
        print(
            "# if the slice is lost (queued resource FAILED or SUSPENDED, TPU VM "
            "PREEMPTED, TERMINATED or REPAIRING, a maintenance under way, or no "
            "worker answering ssh): logs/ is kept as logs-attempt-N/, the TPU is "
            f"deleted (the command below) and steps {first}-{len(plan)} run again "
            f"on a new one, at most {sub.retries} more time(s); training resumes "
            f"from {sub.checkpoint_dir}:"
        )
        args = shlex.join(["training/mnist.py", *sub.training_args(2)])
        print(f"#    attempt 2 and later run: {args}")
    if sub.detach:
        print(
            "# then the client returns: worker 0 deletes the TPU once training "
            f"ended and its results are in {sub.remote_output}; every worker "
            f"deletes it at the deadline. Follow it with:"
        )
        for line in follow_commands(sub):
            print(f"#   {line}")
        print("# a step that fails before training runs ends in:")
        print(shlex.join(delete.argv))
    elif sub.keep:
        print("# --keep: the TPU is left running (and billing) until its deadline;")
        print("# delete it sooner with:")
        print("# " + shlex.join(delete.argv))
    else:
        print(f"# finally, {delete.name}: {delete.about}")
        print(shlex.join(delete.argv))


def follow_commands(sub: Submission) -> list[str]:
    """The commands that follow a detached run."""
    base = ["python", "-m", "cloud.tpu"]
    where = ["--name", sub.target.name, "--zone", sub.target.zone, *sub.follow]
    wait = [*base, "wait", *where]
    wait += ["--output-dir", sub.remote_output] if sub.remote_output else []
    return [
        shlex.join([*base, "status", *where]),
        shlex.join([*base, "logs", *where, "--follow"]),
        shlex.join(wait),
        shlex.join([*base, "delete", *where]),
    ]
