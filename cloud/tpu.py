"""Train on a Cloud TPU slice with one command, and always clean up.

    python -m cloud.tpu submit --name NAME --zone ZONE --accelerator-type TYPE \\
        [options] -- [training/mnist.py arguments]

`submit --rehearse` runs the same plan on this machine first, through the real
gcloud, ssh and scp, against a loopback TPU API and one sshd per worker
(cloud/rehearsal/). Also: status, logs and delete
for a TPU kept with --keep. Run from the repo root; `python cloud/tpu.py ...`
works too. Guide: docs/cloud-tpu.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python cloud/tpu.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloud import checks, gcloud, rehearsal, remote  # noqa: E402
from cloud.plan import (  # noqa: E402
    DEFAULT_RUN_TIMEOUT,
    REHEARSAL_KEEPALIVE,
    REHEARSAL_LIMITS,
    Limits,
    Submission,
    print_plan,
)
from cloud.runner import Interrupted, Runner  # noqa: E402
from cloud.submit import run_submission  # noqa: E402
from training import cli  # noqa: E402  (standard library only)

REPO_ROOT = Path(__file__).resolve().parent.parent


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
    backend = checks.backend(args.backend)
    if backend == "tensorflow":
        checks.tensorflow_slice(acc)
    always = [*remote.TPU_INSTALL[backend][1], "training"]
    extras = checks.extras(args.extra, source / "pyproject.toml", backend, always)
    retries = checks.count(args.retries, "--retries")
    checkpoint_dir = None
    if args.checkpoint_dir is not None:
        checkpoint_dir = checks.checkpoint_dir(args.checkpoint_dir, args.rehearse)
    if checkpoint_dir:
        needed = checks.checkpoint_extra(
            checkpoint_dir, backend, source / "pyproject.toml"
        )
        extras += [needed] if needed not in extras else []
    if retries and not checkpoint_dir:
        raise ValueError(
            f"--retries {retries} needs --checkpoint-dir (gs://BUCKET/PATH): a new "
            "slice resumes from the checkpoints there; without them there is "
            "nothing to resume from"
        )
    preempt = args.rehearse_preempt_after_epoch
    if preempt is not None:
        preempt = checks.count(preempt, "--rehearse-preempt-after-epoch", 1)
        if not args.rehearse or not checkpoint_dir:
            raise ValueError(
                "--rehearse-preempt-after-epoch needs --rehearse and "
                "--checkpoint-dir (it preempts once that epoch's checkpoint is "
                "complete)"
            )
    faults = tuple(args.rehearse_fault)
    if faults and not args.rehearse:
        raise ValueError("--rehearse-fault needs --rehearse")
    for fault in faults:
        if fault not in rehearsal.FAULTS:
            raise ValueError(
                f"--rehearse-fault {fault!r} is not known; use one of "
                + ", ".join(rehearsal.FAULTS)
            )
    train = checks.train_args(train_args)
    checks.global_batch(train, acc)
    return Submission(
        target=target,
        acc=acc,
        runtime=runtime,
        backend=backend,
        provisioning=args.provisioning,
        wait_timeout_s=checks.duration(args.wait_timeout),
        poll_s=checks.poll_interval(args.poll_interval),
        output_dir=output_dir,
        source=source,
        excludes=list(args.exclude),
        extras=extras,
        run_timeout_s=checks.duration(args.run_timeout),
        keep=args.keep,
        train_args=train,
        env=dict(checks.env_var(e) for e in args.env),
        rehearse=args.rehearse,
        retries=retries,
        checkpoint_dir=checkpoint_dir,
        preempt_after_epoch=preempt,
        faults=faults,
        service_account=checks.service_account(args.service_account)
        if args.service_account
        else None,
        limits=REHEARSAL_LIMITS if args.rehearse else Limits(),
    )


def cmd_submit(args, train_args: list[str]) -> int:
    sub = submission_from_args(args, train_args)
    if args.dry_run:
        print_plan(sub)
        return 0
    if not sub.rehearse:
        _need_gcloud()
        Path(sub.output_dir).mkdir(parents=True, exist_ok=True)
        runner = Runner()
        with runner.handle_signals():
            return run_submission(sub, runner)
    if sub.backend != "jax":
        raise ValueError(
            f"--rehearse runs the jax workers' commands; {sub.backend}'s need a TPU "
            "build (tensorflow-tpu) that does not run here. Rehearse with --backend jax"
        )
    Path(sub.output_dir).mkdir(parents=True, exist_ok=True)
    stage = rehearsal.Rehearsal(
        Path(sub.output_dir) / "rehearsal",
        sub.faults,
        sub.preempt_after_epoch,
        sub.checkpoint_dir,
    )
    runner = Runner(label="rehearsal")
    with runner.handle_signals():
        try:
            stage.start()
            runner.env = stage.env()
            options = (*REHEARSAL_KEEPALIVE, *stage.ssh_options())
            sub.target = dataclasses.replace(sub.target, ssh_options=options)
            return run_submission(sub, runner)
        finally:
            stage.close()


# -- status, logs, delete ------------------------------------------------------------


def _target(args) -> gcloud.Target:
    return gcloud.Target(
        name=checks.tpu_name(args.name),
        zone=checks.zone(args.zone),
        project=checks.project(args.project) if args.project else None,
        queued=not args.tpu_vm,
        internal_ip=args.internal_ip,
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
    common.add_argument(
        "--internal-ip",
        action="store_true",
        help="ssh and scp to the workers' internal IP addresses (for TPUs without "
        "external IPs: run from inside the VPC; the workers need Cloud NAT or a "
        "package mirror to install)",
    )

    p = sub.add_parser(
        "submit",
        parents=[common],
        help="create a TPU, train, copy results back, delete the TPU",
        description="Create a TPU, copy this tree to every worker, install, check "
        "every worker, train on all workers at once, copy the outputs back from "
        "worker 0, then delete the TPU (also after a failure or Ctrl-C) unless "
        "--keep. With --retries N, a slice lost on the way (preempted) is "
        "replaced by a new one, training resuming from --checkpoint-dir. "
        "Arguments after `--` go to training/mnist.py. Exit code 0 only when "
        "training succeeded and its results came back.",
        epilog="Prerequisites: the Google Cloud CLI, authenticated (gcloud auth "
        "login) with a project that has TPU quota in the zone; if your ssh key "
        "has a passphrase, the key in the ssh-agent (ssh-add "
        "~/.ssh/google_compute_engine), as gcloud runs ssh on all workers at "
        "once; the workers must reach each other (jax's "
        "coordinator listens on port 8482 of worker 0); --checkpoint-dir needs a "
        "bucket the TPU's service account can write.",
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
    p.add_argument(
        "--backend",
        default="jax",
        help="jax (default), or tensorflow on single-host v5litepod, v5p and v6e "
        "slices (tensorflow-tpu through PJRT)",
    )
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
        "--run-timeout",
        default=DEFAULT_RUN_TIMEOUT,
        help="stop training after this long, e.g. 3h (default "
        f"{DEFAULT_RUN_TIMEOUT}); the client stops waiting 10 minutes later, "
        "fetches the logs and deletes the TPU",
    )
    p.add_argument(
        "--service-account",
        metavar="EMAIL",
        help="the service account the TPU VMs run as (default: the project's "
        "Compute Engine default); it needs write access to --checkpoint-dir",
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
        "--checkpoint-dir",
        metavar="URI",
        help="gs://BUCKET/PATH every worker's training writes each epoch's "
        "checkpoint to (training/mnist.py --checkpoint-dir); a local directory in "
        "a rehearsal",
    )
    p.add_argument(
        "--retries",
        default="0",
        metavar="N",
        help="when the slice is lost (preempted spot TPU, FAILED or SUSPENDED "
        "queued resource, no worker answering), delete it, create a new one and "
        "resume from --checkpoint-dir (training/mnist.py --resume), at most N "
        "times (default 0); needs --checkpoint-dir",
    )
    p.add_argument(
        "--rehearse",
        action="store_true",
        help="run this submission's plan on this machine first, no TPU: the real "
        "gcloud, ssh and scp against a loopback TPU API and one sshd per worker "
        "(OpenSSH's sshd needed); each worker runs the exact commands a TPU "
        "worker gets, with simulated CPU devices (the package install is stubbed: "
        "this Python and its packages stand in for the workers')",
    )
    p.add_argument(
        "--rehearse-preempt-after-epoch",
        metavar="K",
        help="with --rehearse and --checkpoint-dir: once epoch K's checkpoint is "
        "complete, every worker gets SIGTERM and a few seconds later the slice "
        "is PREEMPTED (once), so the --retries path runs (the preempt-sigterm "
        "fault)",
    )
    p.add_argument(
        "--rehearse-fault",
        action="append",
        default=[],
        metavar="NAME",
        help="with --rehearse: inject a fault through the loopback TPU API or the "
        "workers' sshd (repeatable): " + ", ".join(rehearsal.FAULTS),
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
