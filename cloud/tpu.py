"""Train on a Cloud TPU slice with one command, and always clean up.

    python -m cloud.tpu submit --name NAME --zone ZONE --accelerator-type TYPE \\
        [options] -- [training/mnist.py arguments]

`submit --rehearse` runs the same plan on this machine first, with no gcloud and
no TPU (cloud/local_gcloud.py stands in for both). Also: status, logs and delete
for a TPU kept with --keep. Run from the repo root; `python cloud/tpu.py ...`
works too. See README.md, "Training on Cloud TPU".
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python cloud/tpu.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloud import checks, gcloud, local_gcloud, pack, remote  # noqa: E402
from cloud.runner import Interrupted, Runner, say  # noqa: E402
from training import cli  # noqa: E402  (standard library only)

REPO_ROOT = Path(__file__).resolve().parent.parent
BAD_STATES = {
    True: {"FAILED", "SUSPENDING", "SUSPENDED", "DELETING"},
    False: {"PREEMPTED", "TERMINATED", "STOPPING", "STOPPED", "DELETING", "HIDDEN"},
}
DESCRIBE_RETRIES = 5  # consecutive failed readiness checks before giving up
LOGS_TIMEOUT_S = 300


class StepFailed(Exception):
    """A submit step failed; the message says which and why."""


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
    run_timeout_s: int | None
    keep: bool
    rehearse: bool = False
    train_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def run_env(self) -> dict[str, str]:
        """Worker environment: multi-host jax runs must join one jax cluster."""
        env = {}
        if self.backend == "jax" and self.acc.multi_host:
            env["SYNANN_MULTIHOST"] = "1"  # see training/distribute.py
        return {**env, **self.env}

    @property
    def tarball(self) -> str:
        return str(Path(self.output_dir) / "source.tar.gz")

    def steps(self) -> list[Step]:
        t = self.target
        kind = "queued resource" if t.queued else "TPU VM"
        free = [
            Step(
                "check",
                f"check that no {kind} is called {t.name}",
                gcloud.describe(t, gcloud.NAME_ONLY),
            )
        ]
        if t.queued:
            free.append(
                Step(
                    "check",
                    f"check that no TPU VM is called {t.name}",
                    gcloud.describe_vm(t, gcloud.NAME_ONLY),
                )
            )
        state = gcloud.QR_STATE if t.queued else gcloud.VM_STATE
        hosts = (
            "the single host"
            if self.acc.hosts == 1
            else f"all {self.acc.hosts} hosts at once"
        )
        install = remote.install_command(self.backend, self.extras)
        run = remote.run_command(
            self.backend, self.train_args, self.run_timeout_s, self.run_env()
        )
        return [
            *free,
            Step(
                "pack",
                f"pack {_shown(self.source)} into {self.tarball} (local; without "
                ".git, caches, build outputs, runs/; with training/data/)",
            ),
            Step(
                "create",
                f"create {kind} {t.name}: {self.acc.describe()}, {self.provisioning},"
                f" runtime {self.runtime}",
                gcloud.create(
                    t, self.acc.name, self.runtime, self.provisioning, self.wait_s
                ),
            ),
            Step(
                "wait",
                f"wait until it is {gcloud.ready_state(t)} (a check every "
                f"{self.poll_s:g}s, at most {_hms(self.wait_timeout_s)})",
                gcloud.describe(t, state),
            ),
            Step(
                "copy",
                "copy the source to every worker",
                gcloud.scp_to_all(t, self.tarball, gcloud.REMOTE_TARBALL),
            ),
            Step(
                "install",
                f"install Python {remote.WORKER_PYTHON} and the {self.backend} "
                f"packages pinned in {remote.pins_file(self.backend)} on every worker",
                gcloud.ssh(t, install),
                install,
            ),
            Step(
                "run",
                f"train on {hosts}, streaming worker 0's log",
                gcloud.ssh(t, run),
                run,
            ),
            self.logs_step(),
            Step(
                "copy-back",
                f"copy the outputs back from worker 0 into {self.output_dir}/output",
                gcloud.scp_back(t, f"{gcloud.REMOTE_DIR}/output", self.output_dir),
            ),
            Step(
                "verify",
                "check that every worker's training exited 0 and that "
                f"{self.output_dir}/output/metrics.json came back",
            ),
        ]

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
                for w in range(self.acc.hosts)
            ],
        )

    def delete_step(self) -> Step:
        return Step(
            "delete",
            "delete the TPU (always: after success, failure or Ctrl-C)",
            gcloud.delete(self.target),
        )


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _shown(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(path)


# -- submit ------------------------------------------------------------------------


def submission_from_args(args, train_args: list[str]) -> Submission:
    """Check every input (no gcloud involved); raises ValueError."""
    target = _target(args)
    acc = checks.accelerator(args.accelerator_type)
    runtime = checks.runtime_version(
        args.runtime_version or checks.default_runtime(acc), acc
    )
    if args.provisioning not in checks.PROVISIONING:
        raise ValueError(
            f"provisioning {args.provisioning!r} is not valid; use "
            + ", ".join(checks.PROVISIONING)
        )
    default_dir = f"runs/{target.name}"
    output_dir = checks.local_path(args.output_dir or default_dir, "--output-dir")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {output_dir} is a file; give a directory")
    for old in ("output", "logs"):
        if (out / old).exists():
            raise ValueError(
                f"--output-dir {output_dir} already holds {old}/ from an earlier run; "
                "choose a new directory so old results cannot pass for new ones"
            )
    source = Path(args.source or REPO_ROOT)
    if not (source / "training" / "mnist.py").is_file():
        raise ValueError(
            f"--source {source} has no training/mnist.py; give the repository root"
        )
    return Submission(
        target=target,
        acc=acc,
        runtime=runtime,
        backend=checks.backend(args.backend),
        provisioning=args.provisioning,
        wait_timeout_s=checks.duration(args.wait_timeout),
        poll_s=checks.poll_interval(args.poll_interval),
        output_dir=output_dir,
        source=source,
        excludes=list(args.exclude),
        extras=[checks.extra(e) for e in args.extra],
        run_timeout_s=checks.duration(args.run_timeout) if args.run_timeout else None,
        keep=args.keep,
        train_args=checks.train_args(train_args),
        env=dict(checks.env_var(e) for e in args.env),
        rehearse=args.rehearse,
    )


def print_plan(sub: Submission) -> None:
    """--dry-run: every gcloud command, in order, with what each step does."""
    print("# dry run: these commands would run, in this order (nothing was run)")
    for number, step in enumerate(sub.steps(), 1):
        print(f"# {number}. {step.name}: {step.about}")
        if step.remote:
            print(f"#    on the workers: {step.remote}")
        for argv in [step.argv] if step.argv else step.parallel:
            print(shlex.join(argv))
    delete = sub.delete_step()
    if sub.keep:
        print("# --keep: the TPU is left running (and billing); delete it with:")
        print("# " + shlex.join(delete.argv))
    else:
        print(f"# finally, {delete.name}: {delete.about}")
        print(shlex.join(delete.argv))


def _check_free(runner: Runner, step: Step, name: str) -> None:
    rc, _, err = runner.run(step.argv, capture=True)
    if rc == 0:
        raise ValueError(
            f"{name} already exists in this zone; choose another --name, or delete "
            f"it first (python -m cloud.tpu delete --name {name} ...)"
        )
    if "not_found" not in err.lower() and "not found" not in err.lower():
        last = (err.strip().splitlines() or [f"exit code {rc}"])[-1]
        raise ValueError(f"could not check whether {name} exists: {last}")


def _wait_ready(runner: Runner, sub: Submission, step: Step) -> None:
    t = sub.target
    kind = "queued resource" if t.queued else "TPU VM"
    ready = gcloud.ready_state(t)
    start = time.monotonic()
    last, failures, polls = None, 0, 0
    while True:
        rc, out, err = runner.run(step.argv, capture=True, echo=polls == 0)
        polls += 1
        elapsed = time.monotonic() - start
        state = out.strip() if rc == 0 else None
        if state == ready:
            say(f"{kind} {t.name} is {ready} after {_hms(elapsed)}")
            return
        if state in BAD_STATES[t.queued]:
            raise StepFailed(f"{kind} {t.name} is {state}; it will not become {ready}")
        failures = 0 if rc == 0 else failures + 1
        if failures >= DESCRIBE_RETRIES:
            last_err = (err.strip().splitlines() or [f"exit code {rc}"])[-1]
            raise StepFailed(f"cannot read the state of {t.name}: {last_err}")
        if state != last or polls % 10 == 0:
            say(
                f"waiting for {kind} {t.name} to be {ready}: it is "
                f"{state or 'not readable yet'} ({_hms(elapsed)} of "
                f"{_hms(sub.wait_timeout_s)})"
            )
            last = state
        remaining = sub.wait_timeout_s - elapsed
        if remaining <= 0:
            raise StepFailed(
                f"{kind} {t.name} was not {ready} within {_hms(sub.wait_timeout_s)} "
                f"(last state: {state or 'unknown'}); raise --wait-timeout or try "
                "another zone or --provisioning"
            )
        time.sleep(min(sub.poll_s, remaining))


def _pack(sub: Submission) -> None:
    try:
        files = pack.select_files(sub.source, [sub.output_dir], sub.excludes)
        size = pack.write_tarball(sub.source, files, Path(sub.tarball))
    except OSError as error:
        raise StepFailed(f"cannot pack {sub.source}: {error}") from error
    say(f"packed {len(files)} files ({size / 1e6:.1f} MB) into {sub.tarball}")
    if size > 200e6:
        say("that is large: leave data out with --exclude PATTERN")


def _run_step(runner: Runner, step: Step) -> None:
    rc, _, _ = runner.run(step.argv)
    if rc != 0:
        raise StepFailed(f"step {step.name} failed (gcloud exit code {rc})")


def _copy_logs(runner: Runner, sub: Submission) -> None:
    """Every worker's log and exit status into OUTPUT_DIR/logs (best effort)."""
    codes = runner.run_parallel(sub.logs_step().parallel, timeout=LOGS_TIMEOUT_S)
    missing = [str(w) for w, rc in enumerate(codes) if rc != 0]
    if missing:
        say(f"could not copy the logs of worker(s) {', '.join(missing)}")


def worker_statuses(logs_dir: Path, hosts: int) -> dict[int, int | None]:
    """Each worker's training exit status from logs/worker-N.exit (None: none
    came back)."""
    statuses: dict[int, int | None] = {}
    for w in range(hosts):
        try:
            statuses[w] = int((logs_dir / f"worker-{w}.exit").read_text().strip())
        except (OSError, ValueError):
            statuses[w] = None
    return statuses


def _verify(sub: Submission, run_rc: int) -> None:
    """Success needs every worker's exit status 0 (read from the statuses the
    workers wrote, not only gcloud's exit code) and worker 0's metrics.json."""
    logs = Path(sub.output_dir) / "logs"
    statuses = worker_statuses(logs, sub.acc.hosts)
    failed = {w: rc for w, rc in statuses.items() if rc != 0}
    if failed:
        what = ", ".join(
            f"{w} ("
            + ("no exit status came back" if rc is None else f"exit {rc}")
            + ")"
            for w, rc in failed.items()
        )
        logs_named = ", ".join(str(logs / f"worker-{w}.log") for w in failed)
        raise StepFailed(f"training failed on worker(s) {what}; see {logs_named}")
    if run_rc != 0:
        say(
            f"note: gcloud ssh exited {run_rc}, but every worker's training "
            "exited 0 (a connection dropped after training?)"
        )
    metrics = Path(sub.output_dir) / "output" / "metrics.json"
    if not metrics.is_file():
        raise StepFailed(f"training ran but {metrics} did not come back")


def run_submission(sub: Submission, runner: Runner) -> int:
    """Run every step; fetch logs and delete the TPU whatever happens."""
    created = started = logs_copied = False
    run_rc, code = 0, 1
    try:
        for step in sub.steps():
            say(f"{step.name}: {step.about}")
            if step.name == "check":
                _check_free(runner, step, sub.target.name)
            elif step.name == "create":
                created = True
                _run_step(runner, step)
            elif step.name == "wait":
                _wait_ready(runner, sub, step)
            elif step.name == "pack":
                _pack(sub)
            elif step.name == "run":
                started = True
                run_rc, _, _ = runner.run(step.argv)  # the workers' statuses decide
            elif step.name == "logs":
                logs_copied = True
                _copy_logs(runner, sub)
            elif step.name == "copy-back":
                rc, _, _ = runner.run(step.argv)
                if rc != 0:
                    say(f"copying the outputs back failed (gcloud exit code {rc})")
            elif step.name == "verify":
                _verify(sub, run_rc)
            else:
                _run_step(runner, step)
        say(f"done: results in {sub.output_dir}/output")
        code = 0
    except ValueError as error:  # a pre-flight check, before anything was created
        say(f"error: {error}")
        code = 2
    except StepFailed as error:
        say(f"error: {error}")
    except Interrupted as stop:
        say(f"interrupted ({stop}); cleaning up")
        code = stop.exit_code
    finally:
        code = _finish(sub, runner, code, created, started and not logs_copied)
    return code


def _finish(sub: Submission, runner: Runner, code, created, copy_logs) -> int:
    delete = sub.delete_step()
    try:
        with runner.protect():
            if copy_logs:
                say(f"logs: {sub.logs_step().about}")
                _copy_logs(runner, sub)
            if not created:
                return code
            if sub.keep:
                say(
                    f"--keep: {sub.target.name} is still running (and billing); "
                    f"delete it with:\n  {shlex.join(delete.argv)}"
                )
                return code
            say(f"delete: {delete.about}")
            rc, _, _ = runner.run(delete.argv)
            if rc == 0:
                say(f"deleted {sub.target.name}")
                return code
            say(f"delete failed (gcloud exit code {rc}); run it by hand:")
    except Interrupted as stop:
        say(f"cleanup abandoned ({stop}); the TPU may still be running. Run:")
        code = code or stop.exit_code
    print(f"  {shlex.join(delete.argv)}", file=sys.stderr, flush=True)
    return code or 1


def cmd_submit(args, train_args: list[str]) -> int:
    sub = submission_from_args(args, train_args)
    if sub.backend == "tensorflow" and sub.acc.multi_host:
        say(
            "note: tensorflow on a multi-host slice relies on the training script's "
            "TPUStrategy setup for pods; jax is the main multi-host path"
        )
    if args.dry_run:
        print_plan(sub)
        return 0
    if sub.rehearse:
        runner = local_gcloud.rehearsal_runner(sub.backend, sub.output_dir)
    else:
        _need_gcloud()
        runner = Runner()
    Path(sub.output_dir).mkdir(parents=True, exist_ok=True)
    with runner.handle_signals():
        return run_submission(sub, runner)


# -- status, logs, delete ------------------------------------------------------------


def _target(args) -> gcloud.Target:
    return gcloud.Target(
        name=checks.tpu_name(args.name),
        zone=checks.zone(args.zone),
        project=checks.project(args.project) if args.project else None,
        queued=not args.tpu_vm,
    )


def _need_gcloud() -> None:
    if shutil.which(gcloud.GCLOUD) is None:
        raise ValueError(
            "gcloud not found on PATH; install the Google Cloud CLI and run "
            "`gcloud auth login` (or use --dry-run)"
        )


def _run_simple(args, commands: list[list[str]], protect: bool = False) -> int:
    if args.dry_run:
        for argv in commands:
            print(shlex.join(argv))
        return 0
    _need_gcloud()
    runner, code = Runner(), 0
    with runner.handle_signals():
        try:
            for argv in commands:
                if protect:
                    with runner.protect():
                        rc, _, _ = runner.run(argv)
                else:
                    rc, _, _ = runner.run(argv)
                code = code or rc
        except Interrupted as stop:
            return stop.exit_code
    return code


def cmd_status(args, _) -> int:
    t = _target(args)
    commands = [gcloud.describe(t)] + ([gcloud.describe_vm(t)] if t.queued else [])
    return _run_simple(args, commands)


def cmd_logs(args, _) -> int:
    t = _target(args)
    if args.worker != "all" and not args.worker.isdigit():
        raise ValueError(f"--worker {args.worker!r} is not valid; use a number or all")
    if args.lines < 0:
        raise ValueError(f"--lines {args.lines} is not valid; use a number >= 0")
    command = remote.logs_command(args.lines, args.follow)
    return _run_simple(args, [gcloud.ssh(t, command, args.worker)])


def cmd_delete(args, _) -> int:
    return _run_simple(args, [gcloud.delete(_target(args))], protect=True)


# -- command line --------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(
        prog="python -m cloud.tpu",
        description="Run training/mnist.py on a Cloud TPU slice through gcloud.",
        epilog="Example: python -m cloud.tpu submit --name synann-v5e --zone "
        "us-west4-a --accelerator-type v5litepod-8 -- --epochs 3",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=cli.Parser)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", required=True, help="TPU (and queued resource) name")
    common.add_argument("--zone", required=True, help="e.g. us-west4-a, us-central2-b")
    common.add_argument("--project", help="GCP project ID (default: gcloud config)")
    common.add_argument(
        "--tpu-vm",
        action="store_true",
        help="a plain TPU VM instead of a queued resource",
    )
    common.add_argument(
        "--dry-run", action="store_true", help="print the gcloud commands only"
    )

    p = sub.add_parser(
        "submit",
        parents=[common],
        help="create a TPU, train, copy results back, delete the TPU",
        description="Create a TPU, copy this tree to every worker, install, train "
        "on all workers at once, copy the outputs back from worker 0, then delete "
        "the TPU (also after a failure or Ctrl-C) unless --keep. Arguments after "
        "`--` go to training/mnist.py. Exit code 0 only when training succeeded "
        "and its results came back.",
    )
    p.add_argument(
        "--accelerator-type",
        required=True,
        help="v5litepod-8 (one host), v5litepod-32, v4-32 (several hosts), v6e-8, "
        "v5p-8, ...",
    )
    p.add_argument(
        "--runtime-version",
        help="TPU software version (default per generation: v5litepod "
        "v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e, v4 and "
        "older tpu-ubuntu2204-base)",
    )
    p.add_argument("--backend", default="jax", help="jax (default) or tensorflow")
    p.add_argument(
        "--provisioning",
        default="on-demand",
        help="on-demand (default), spot (cheaper, can be preempted) or reserved",
    )
    p.add_argument(
        "--wait-timeout",
        default="1h",
        help="how long to wait for the TPU, e.g. 30m, 2h (default 1h); a queued "
        "resource request also expires then",
    )
    p.add_argument(
        "--poll-interval",
        default="30",
        help="seconds between readiness checks (default 30)",
    )
    p.add_argument(
        "--run-timeout", help="stop training after this long, e.g. 3h (default: none)"
    )
    p.add_argument(
        "--output-dir",
        help="new local directory for output/, logs/ and source.tar.gz "
        "(default runs/NAME)",
    )
    p.add_argument("--source", help="tree to copy (default: this repository's root)")
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="also leave out files or directories named like PATTERN (repeatable)",
    )
    p.add_argument(
        "--extra",
        action="append",
        default=[],
        help="another package extra to install on the workers, e.g. tfds",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for training on every worker (repeatable; "
        "printed, so not for secrets)",
    )
    p.add_argument(
        "--rehearse",
        action="store_true",
        help="run this submission's plan on this machine first: no gcloud, no TPU; "
        "each worker is a local process with simulated CPU devices, running the "
        "exact commands a TPU worker gets (the package install is stubbed: this "
        "Python and its packages stand in for the workers')",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="leave the TPU running at the end; prints the delete command",
    )
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", parents=[common], help="describe the TPU")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "logs", parents=[common], help="show the end of the workers' training logs"
    )
    p.add_argument("--worker", default="0", help="worker number or all (default 0)")
    p.add_argument("--lines", type=int, default=100, help="lines to show (100)")
    p.add_argument("--follow", action="store_true", help="keep following the log")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser(
        "delete", parents=[common], help="delete the TPU (and its queued resource)"
    )
    p.set_defaults(func=cmd_delete)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1 :]
    parser = build_parser()
    args = parser.parse_args(argv)
    if train_args and args.command != "submit":
        parser.error("arguments after -- are for submit only")
    try:
        return args.func(args, train_args)
    except ValueError as error:
        cli.error(parser.prog, error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
