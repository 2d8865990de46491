"""`submit`'s options, checked and turned into a `Submission` before any
gcloud command runs; every refusal is one line (ValueError) saying what was
wrong and what is accepted.
"""

from __future__ import annotations

import re
from pathlib import Path

from cloud import checks, gcloud, remote
from cloud.limits import DEFAULT_MAX_RUN, DEFAULT_RUN_TIMEOUT, REHEARSAL_LIMITS, Limits
from cloud.plan import Network, Submission
from cloud.rehearsal import FAULTS

REPO_ROOT = Path(__file__).resolve().parent.parent
PROVISIONING = (*checks.PROVISIONING, "flex-start")
#: Generations that offer flex-start queued resources (preview; some v5e and
#: v6e zones), and its longest run.
FLEX_START_GENERATIONS = ("v5litepod", "v6e")
FLEX_START_MAX_S = 7 * 86400
MIN_RUN_S = 60
#: gcloud create flags the tool sets itself (--gcloud-create-arg refuses them).
OWNED_FLAGS = (
    "--accelerator-type", "--runtime-version", "--version", "--node-id", "--zone",
    "--project", "--metadata", "--metadata-from-file", "--labels", "--network",
    "--subnetwork", "--tags", "--internal-ips", "--service-account", "--spot",
    "--reserved", "--provisioning-model", "--max-run-duration", "--async",
    "--valid-until-duration", "--quiet",
)  # fmt: skip
_LABEL_KEY = re.compile(r"[a-z][a-z0-9_-]{0,62}")
_LABEL_VALUE = re.compile(r"[a-z0-9_-]{0,63}")
_TAG = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")
_NETWORK = re.compile(r"[A-Za-z0-9][A-Za-z0-9/._-]{0,500}")


def labels(values: list[str]) -> tuple[tuple[str, str], ...]:
    """KEY=VALUE pairs (comma-separated, repeatable) for every resource."""
    pairs = []
    for item in (p for v in values for p in v.split(",") if p):
        key, sep, value = item.partition("=")
        if (
            not sep
            or not _LABEL_KEY.fullmatch(key)
            or not _LABEL_VALUE.fullmatch(value)
        ):
            raise ValueError(
                f"--labels {item!r} is not valid; use KEY=VALUE with lowercase "
                "letters, digits, _ and - (keys start with a letter), e.g. team=ml"
            )
        if key in (gcloud.TOOL_LABEL, gcloud.DEADLINE_LABEL):
            raise ValueError(
                f"--labels {key}= is the tool's own label (sweep finds the tool's "
                "resources by it); choose another key"
            )
        pairs.append((key, value))
    return tuple(pairs)


def tags(values: list[str]) -> tuple[str, ...]:
    found = tuple(t for v in values for t in v.split(",") if t)
    for tag in found:
        if not _TAG.fullmatch(tag):
            raise ValueError(
                f"--tags {tag!r} is not a valid network tag; use lowercase letters, "
                "digits and hyphens, starting with a letter, e.g. allow-ssh"
            )
    return found


def network_name(value: str | None, what: str) -> str | None:
    if value is not None and not _NETWORK.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} is not a network name or path, e.g. my-vpc or "
            "projects/P/regions/R/subnetworks/S"
        )
    return value


def gcloud_args(values: list[str]) -> tuple[str, ...]:
    """Flags passed to `gcloud ... create` as given (--gcloud-create-arg)."""
    for value in values:
        flag = value.split("=", 1)[0]
        if not value.startswith("--") or "\n" in value:
            raise ValueError(
                f"--gcloud-create-arg {value!r} is not a gcloud flag; give one flag "
                "a time, as --gcloud-create-arg=--FLAG=VALUE"
            )
        if flag in OWNED_FLAGS:
            raise ValueError(
                f"--gcloud-create-arg {flag} is set by the tool; use its own option "
                "(python -m cloud.tpu submit --help)"
            )
    return tuple(values)


def output(value: str | None, name: str) -> tuple[str, str | None]:
    """(local directory, gs:// URI or None) from --output-dir."""
    if value and value.startswith("gs://"):
        if not checks._BUCKET.fullmatch(value) or "," in value:
            raise ValueError(
                f"--output-dir {value!r} does not name a valid bucket path (3-222 "
                "lowercase letters, digits, '.', '_', '-'; no spaces or commas), e.g. "
                "gs://my-bucket/synann/run1"
            )
        return f"runs/{name}", value.rstrip("/")
    return checks.local_path(value or f"runs/{name}", "--output-dir"), None


def submission_from_args(args, train_args: list[str], target) -> Submission:
    """Check every input (no gcloud involved); raises ValueError."""
    acc = checks.accelerator(args.accelerator_type)
    runtime = checks.runtime_version(
        args.runtime_version or checks.default_runtime(acc), acc
    )
    rehearsing = bool(args.rehearse or args.rehearse_cloud)
    if args.provisioning not in PROVISIONING:
        raise ValueError(
            f"provisioning {args.provisioning!r} is not valid; use "
            + ", ".join(PROVISIONING)
        )
    max_run = checks.duration(args.max_run_duration)
    if max_run < MIN_RUN_S:
        raise ValueError(f"--max-run-duration {args.max_run_duration!r} is under 1m")
    if args.provisioning == "flex-start":
        _flex_start(acc, target, max_run)
    local, remote_output = output(args.output_dir, target.name)
    if args.detach and not remote_output:
        raise ValueError(
            "--detach needs --output-dir gs://BUCKET/PATH: the slice copies its logs "
            "and results there, since nothing copies them to this machine once the "
            "client has returned"
        )
    out = Path(local)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {local} is a file; give a directory")
    for old in ("output/", "logs/", "source.tar.gz") if not remote_output else ():
        if (out / old.rstrip("/")).exists():
            raise ValueError(
                f"{local} already holds {old} from an earlier run; choose a new "
                "--output-dir so old results cannot pass for new ones"
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
        checkpoint_dir = checks.checkpoint_dir(args.checkpoint_dir, rehearsing)
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
    if args.rehearse_preempt_after_epoch is not None:
        checks.count(
            args.rehearse_preempt_after_epoch, "--rehearse-preempt-after-epoch", 1
        )
        if not args.rehearse or not checkpoint_dir:
            raise ValueError(
                "--rehearse-preempt-after-epoch needs --rehearse and "
                "--checkpoint-dir (it preempts once that epoch's checkpoint is "
                "complete)"
            )
    if args.rehearse_fault and not args.rehearse:
        raise ValueError(
            "--rehearse-fault needs --rehearse (with --rehearse-cloud, give the "
            "faults to python -m cloud.rehearsal serve)"
        )
    for fault in args.rehearse_fault:
        if fault not in FAULTS:
            raise ValueError(
                f"--rehearse-fault {fault!r} is not known; use one of "
                + ", ".join(FAULTS)
            )
    train = checks.train_args(train_args)
    checks.global_batch(train, acc)
    network = Network(
        network=network_name(args.network, "--network"),
        subnetwork=network_name(args.subnetwork, "--subnetwork"),
        internal_ips=args.internal_ips,
        tags=tags(args.tags),
        labels=labels(args.labels),
        gcloud_args=gcloud_args(args.gcloud_create_arg),
    )
    return Submission(
        target=target,
        acc=acc,
        runtime=runtime,
        backend=backend,
        provisioning=args.provisioning,
        wait_timeout_s=checks.duration(args.wait_timeout),
        poll_s=checks.poll_interval(args.poll_interval),
        local_dir=local,
        source=source,
        excludes=list(args.exclude),
        extras=extras,
        run_timeout_s=checks.duration(args.run_timeout),
        keep=args.keep,
        max_run_s=max_run,
        remote_output=remote_output,
        detach=args.detach,
        train_args=train,
        env=dict(checks.env_var(e) for e in args.env),
        rehearse=rehearsing,
        retries=retries,
        checkpoint_dir=checkpoint_dir,
        service_account=checks.service_account(args.service_account)
        if args.service_account
        else None,
        network=network,
        limits=REHEARSAL_LIMITS if rehearsing else Limits(),
    )


def _flex_start(acc: checks.Accelerator, target, max_run: int) -> None:
    if not target.queued:
        raise ValueError(
            "--provisioning flex-start is a queued resource's provisioning model; "
            "leave out --tpu-vm"
        )
    if acc.generation not in FLEX_START_GENERATIONS:
        raise ValueError(
            f"--provisioning flex-start on {acc.name} is refused: flex-start is "
            f"offered for {', '.join(FLEX_START_GENERATIONS)} only (preview, some "
            "zones)"
        )
    if max_run > FLEX_START_MAX_S:
        raise ValueError(
            "--provisioning flex-start runs at most 7 days; lower --max-run-duration"
        )


def add_submit_options(p) -> None:
    """submit's options (besides --name, --zone and the other shared ones)."""
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
        help="on-demand (default), spot (cheaper, can be preempted), reserved, or "
        "flex-start (v5litepod and v6e, preview: Google deletes the VMs at "
        "--max-run-duration)",
    )
    p.add_argument(
        "--wait-timeout",
        default="1h",
        help="how long to wait for the TPU, e.g. 30m, 2h (default 1h); a queued "
        "resource request also expires then",
    )
    p.add_argument(
        "--poll-interval", default="30", help="seconds between state checks (30)"
    )
    p.add_argument(
        "--run-timeout",
        default=DEFAULT_RUN_TIMEOUT,
        help=f"stop training after this long, e.g. 3h (default {DEFAULT_RUN_TIMEOUT})",
    )
    p.add_argument(
        "--max-run-duration",
        default=DEFAULT_MAX_RUN,
        help="every worker deletes the slice this long after the create request, "
        f"whatever happens (default {DEFAULT_MAX_RUN}); a wall-clock deadline in "
        "the slice's metadata and labels",
    )
    p.add_argument(
        "--detach",
        action="store_true",
        help="return once training runs; the slice copies its results to "
        "--output-dir gs://... and deletes itself (follow it with wait)",
    )
    p.add_argument(
        "--service-account",
        metavar="EMAIL",
        help="the service account the TPU VMs run as (default: the project's "
        "Compute Engine default); it must be allowed to delete the TPU and write "
        "the gs:// directories",
    )
    p.add_argument(
        "--output-dir",
        help="new local directory for output/, logs/ and source.tar.gz (default "
        "runs/NAME), or gs://BUCKET/PATH, where the slice copies logs and results "
        "(runs/NAME then holds the local files)",
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
        "checkpoint to; a local directory in a rehearsal",
    )
    p.add_argument(
        "--retries",
        default="0",
        metavar="N",
        help="when the slice is lost (preempted, in maintenance, FAILED or "
        "SUSPENDED, no worker answering), delete it, create a new one and resume "
        "from --checkpoint-dir, at most N times (default 0)",
    )
    p.add_argument("--network", help="the VPC network (default: default)")
    p.add_argument("--subnetwork", help="the subnetwork, in the zone's region")
    p.add_argument(
        "--internal-ips",
        action="store_true",
        help="create the TPU without external IP addresses (ssh and scp then go to "
        "the internal ones: run from inside the VPC; the workers need Cloud NAT)",
    )
    p.add_argument(
        "--tags",
        action="append",
        default=[],
        metavar="TAG[,TAG]",
        help="network tags for firewall rules (repeatable)",
    )
    p.add_argument(
        "--labels",
        action="append",
        default=[],
        metavar="KEY=VALUE[,...]",
        help="labels for the TPU, besides the tool's tool and deadline (repeatable)",
    )
    p.add_argument(
        "--gcloud-create-arg",
        action="append",
        default=[],
        metavar="--FLAG[=VALUE]",
        help="another flag for gcloud's create command, as given (repeatable), "
        "e.g. --gcloud-create-arg=--reservation=my-reservation",
    )
    p.add_argument(
        "--rehearse",
        action="store_true",
        help="run this submission on this machine first, no TPU: a rehearsal cloud "
        "(python -m cloud.rehearsal) for the run, the real gcloud, ssh and scp "
        "(OpenSSH's sshd needed); the package install is stubbed",
    )
    p.add_argument(
        "--rehearse-preempt-after-epoch",
        metavar="K",
        help="with --rehearse and --checkpoint-dir: once epoch K's checkpoint is "
        "complete, every worker gets SIGTERM and a few seconds later the slice "
        "is PREEMPTED (the preempt-sigterm fault)",
    )
    p.add_argument(
        "--rehearse-fault",
        action="append",
        default=[],
        metavar="NAME",
        help="with --rehearse: inject a fault (repeatable): " + ", ".join(FAULTS),
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="leave the TPU running at the end (until its deadline); prints the "
        "delete command",
    )
