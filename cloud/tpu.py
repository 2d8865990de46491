"""Train on a Cloud TPU slice with one command; the slice bounds its own cost.

    python -m cloud.tpu submit --name NAME --zone ZONE --accelerator-type TYPE \\
        [options] -- [training/mnist.py arguments]

`submit --detach` returns once training runs; the slice's agent copies the
results to --output-dir gs://... and deletes the slice. `wait NAME`
re-attaches; `status`, `logs`, `delete`; `sweep` deletes the tool's
resources whose deadline passed. `submit --rehearse` runs the same plan on
this machine first, through the real gcloud, ssh and scp, against a
rehearsal cloud it starts; `--rehearse-cloud D` uses one started with
`python -m cloud.rehearsal serve --dir D` (cloud/rehearsal/). Run from the
repository root. Guide: docs/cloud-tpu.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import shutil
import sys
from pathlib import Path

from cloud import checks, follow, gcloud, options, rehearsal, remote
from cloud.limits import REHEARSAL_KEEPALIVE
from cloud.plan import print_plan
from cloud.runner import Interrupted, Runner
from cloud.submit import run_submission
from training import cli  # standard library only

# -- submit ------------------------------------------------------------------------


def cmd_submit(args, train_args: list[str]) -> int:
    sub = options.submission_from_args(args, train_args, _target(args))
    sub.follow = _follow_flags(args)
    if args.dry_run:
        print_plan(sub)
        return 0
    if args.rehearse and sub.backend != "jax":
        raise ValueError(
            f"--rehearse runs the jax workers' commands; {sub.backend}'s need a TPU "
            "build (tensorflow-tpu) that does not run here. Rehearse with --backend jax"
        )
    Path(sub.local_dir).mkdir(parents=True, exist_ok=True)
    if args.rehearse:
        return _rehearse(args, sub)
    runner, ssh = _cloud(args)
    sub.target = dataclasses.replace(sub.target, ssh_options=ssh)
    with runner.handle_signals():
        return run_submission(sub, runner)


def _rehearse(args, sub) -> int:
    """--rehearse: a rehearsal cloud of its own in LOCAL_DIR/rehearsal."""
    faults = [f"--fault={f}" for f in args.rehearse_fault]
    if args.rehearse_preempt_after_epoch is not None:
        faults += ["--fault=preempt-sigterm", "--checkpoint-dir", sub.checkpoint_dir]
        faults += ["--preempt-after-epoch", str(args.rehearse_preempt_after_epoch)]
    serve = rehearsal.Serve(Path(sub.local_dir) / "rehearsal", faults)
    runner = Runner(label="rehearsal")
    with runner.handle_signals():
        try:
            env = serve.start()
            runner.env = {**os.environ, **env}
            sub.target = dataclasses.replace(
                sub.target, ssh_options=_rehearsal_ssh(env)
            )
            return run_submission(sub, runner)
        except Interrupted as stop:
            return stop.exit_code
        finally:
            serve.stop()


def _rehearsal_ssh(env: dict[str, str]) -> tuple[str, ...]:
    return (*REHEARSAL_KEEPALIVE, f"Port={env['REHEARSAL_SSH_PORT']}")


def _cloud(args) -> tuple[Runner, tuple[str, ...]]:
    """(runner, ssh options) for gcloud: Google's, or the rehearsal cloud that
    --rehearse-cloud names."""
    if args.rehearse_cloud:
        env = rehearsal.read_env(args.rehearse_cloud)
        runner = Runner(label="rehearsal", env={**os.environ, **env})
        return runner, _rehearsal_ssh(env)
    if shutil.which(gcloud.GCLOUD) is None:
        raise ValueError(
            "gcloud not found on PATH; install the Google Cloud CLI and run "
            "`gcloud auth login` (or use --dry-run)"
        )
    return Runner(), gcloud.KEEPALIVE


def _follow_flags(args) -> list[str]:
    flags = [f"--project={args.project}"] if args.project else []
    flags += ["--tpu-vm"] if args.tpu_vm else []
    flags += ["--internal-ip"] if args.internal_ip or args.internal_ips else []
    if args.rehearse_cloud:
        flags += ["--rehearse-cloud", args.rehearse_cloud]
    return flags


# -- status, logs, delete, wait, sweep ---------------------------------------------------


def _target(args, ssh=gcloud.KEEPALIVE) -> gcloud.Target:
    return gcloud.Target(
        name=checks.tpu_name(args.name),
        zone=checks.zone(args.zone),
        project=checks.project(args.project) if args.project else None,
        queued=not args.tpu_vm,
        internal_ip=args.internal_ip or getattr(args, "internal_ips", False),
        ssh_options=ssh,
    )


def _run_simple(args, make_commands, protect: bool = False) -> int:
    """Run the commands `make_commands(ssh options)` builds, one by one."""
    if args.dry_run:
        for argv in make_commands(gcloud.KEEPALIVE):
            print(shlex.join(argv))
        return 0
    runner, ssh = _cloud(args)
    code = 0
    with runner.handle_signals():
        try:
            for argv in make_commands(ssh):
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
    return _run_simple(args, lambda ssh: commands)


def cmd_logs(args, _) -> int:
    _target(args)
    if args.worker != "all" and not args.worker.isdigit():
        raise ValueError(f"--worker {args.worker!r} is not valid; use a number or all")
    if args.lines < 0:
        raise ValueError(f"--lines {args.lines} is not valid; use a number >= 0")
    command = remote.logs_command(args.lines, args.follow)
    return _run_simple(
        args, lambda ssh: [gcloud.ssh(_target(args, ssh), command, args.worker)]
    )


def cmd_delete(args, _) -> int:
    return _run_simple(args, lambda ssh: [gcloud.delete(_target(args))], protect=True)


def cmd_wait(args, _) -> int:
    t = _target(args)
    poll = checks.poll_interval(args.poll_interval)
    uri = args.output_dir
    if uri is not None:
        uri = options.output(uri, t.name)[1]
        if uri is None:
            raise ValueError("wait --output-dir takes the run's gs://BUCKET/PATH")
    if args.dry_run:
        state = gcloud.QR_STATE if t.queued else gcloud.VM_STATE
        print(shlex.join(gcloud.describe(t, state)))
        print(shlex.join(gcloud.storage_cat(f"{uri or 'OUTPUT'}/logs/worker-0.json")))
        return 0
    runner, _ = _cloud(args)
    with runner.handle_signals():
        try:
            uri = uri or follow.output_of(runner, t)
            if not uri:
                raise ValueError(
                    f"cannot read {t.name}'s output directory from its metadata "
                    "(is it gone?); give --output-dir gs://BUCKET/PATH"
                )
            return follow.wait(runner, t, uri, poll)
        except Interrupted as stop:
            return stop.exit_code


def cmd_sweep(args, _) -> int:
    zone = checks.zone(args.zone)
    project = checks.project(args.project) if args.project else None
    runner, _ = _cloud(args)
    with runner.handle_signals():
        try:
            return follow.sweep(runner, zone, project, args.dry_run)
        except Interrupted as stop:
            return stop.exit_code


# -- command line --------------------------------------------------------------------


def _where(with_name: bool = True) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    if with_name:
        common.add_argument(
            "--name", required=True, help="TPU (and queued resource) name"
        )
    common.add_argument("--zone", required=True, help="e.g. us-west4-a, us-central2-b")
    common.add_argument("--project", help="GCP project ID (default: gcloud config)")
    common.add_argument(
        "--dry-run", action="store_true", help="print the gcloud commands only"
    )
    common.add_argument(
        "--rehearse-cloud",
        metavar="DIR",
        help="talk to the rehearsal cloud that `python -m cloud.rehearsal serve "
        "--dir DIR` runs, instead of Google's",
    )
    if with_name:
        common.add_argument(
            "--tpu-vm",
            action="store_true",
            help="a plain TPU VM instead of a queued resource",
        )
        common.add_argument(
            "--internal-ip",
            action="store_true",
            help="ssh and scp to the workers' internal IP addresses (run from "
            "inside the VPC)",
        )
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(
        prog="python -m cloud.tpu",
        description="Run training/mnist.py on a Cloud TPU slice through gcloud.",
        epilog="Example: python -m cloud.tpu submit --name synann-v5e --zone "
        "us-west4-a --accelerator-type v5litepod-8 -- --epochs 3",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=cli.Parser)
    common = _where()
    p = sub.add_parser(
        "submit",
        parents=[common],
        help="create a TPU, train, copy results back, delete the TPU",
        description="Create a TPU that deletes itself at a deadline, copy this "
        "tree to every worker, install, check every worker, train on all "
        "workers at once under the slice's agent, copy the outputs back, then "
        "delete the TPU (also after a failure or Ctrl-C) unless --keep. With "
        "--detach, return once training runs: the slice copies its results to "
        "--output-dir gs://... and deletes itself. With --retries N, a slice "
        "lost on the way (preempted, in maintenance) is replaced by a new one, "
        "training resuming from --checkpoint-dir. Arguments after `--` go to "
        "training/mnist.py. Exit code 0 only when training succeeded and its "
        "results came back (detached: once training runs).",
        epilog="Prerequisites: the Google Cloud CLI, authenticated (gcloud auth "
        "login) with a project that has TPU quota in the zone; if your ssh key "
        "has a passphrase, the key in the ssh-agent (ssh-add "
        "~/.ssh/google_compute_engine); the workers must reach each other "
        "(jax's coordinator listens on port 8482 of worker 0); the TPU's "
        "service account may delete its own TPU (roles/tpu.admin) and write "
        "the gs:// directories it is given (roles/storage.objectAdmin).",
    )
    options.add_submit_options(p)
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
    p = sub.add_parser(
        "wait",
        parents=[common],
        help="follow a detached run until it ends; its exit status",
        description="Re-attach to a run (detached or not): wait until its "
        "training ended or its TPU is gone, then exit 0 if every worker's "
        "training exited 0 and the results are in its output directory, else 1.",
    )
    p.add_argument(
        "--output-dir",
        metavar="URI",
        help="the run's gs://BUCKET/PATH (default: the TPU's metadata says)",
    )
    p.add_argument("--poll-interval", default="30", help="seconds between checks")
    p.set_defaults(func=cmd_wait)
    p = sub.add_parser(
        "sweep",
        parents=[_where(with_name=False)],
        help="delete the tool's TPUs whose deadline passed or that failed",
        description="List the zone's queued resources and TPU VMs labelled "
        f"{gcloud.TOOL_LABEL}={gcloud.TOOL} and delete those whose "
        f"{gcloud.DEADLINE_LABEL} label has passed or that are FAILED or "
        "SUSPENDED (TPU VMs: PREEMPTED or TERMINATED).",
    )
    p.set_defaults(func=cmd_sweep)
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
