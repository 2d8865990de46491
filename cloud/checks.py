"""Input checks for Cloud TPU runs, done before any gcloud command.

Every check raises `ValueError` with one line: what was wrong and what is accepted.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from training import cli as training_cli

BACKENDS = ("jax", "tensorflow")
PROVISIONING = ("on-demand", "spot", "reserved")

# Per TPU generation: what the number in "<generation>-<N>" counts, how many of
# them one host (TPU VM) holds in a multi-host slice, and the default runtime
# version (from /work/shared/FACTS.md). Assumptions, used for messages and input
# checks only (gcloud has the final word):
# - v2, v3, v4, v5p: N counts TensorCores, 2 per chip, 4 chips per host, so 8 per
#   host: v4-8 and v5p-8 are single-host, v4-32 has 4 hosts.
# - v5litepod (v5e), v6e: N counts chips; -1, -4 and -8 are single-host, larger
#   slices (-16 and up, powers of two) have 4 chips per host: v5litepod-32 has 8.
GENERATIONS: dict[str, tuple[str, int, str]] = {
    "v2": ("TensorCores", 8, "tpu-ubuntu2204-base"),
    "v3": ("TensorCores", 8, "tpu-ubuntu2204-base"),
    "v4": ("TensorCores", 8, "tpu-ubuntu2204-base"),
    "v5p": ("TensorCores", 8, "v2-alpha-tpuv5"),
    "v5litepod": ("chips", 4, "v2-alpha-tpuv5-lite"),
    "v6e": ("chips", 4, "v2-alpha-tpuv6e"),
}
SINGLE_HOST_CHIP_COUNTS = (1, 4, 8)
#: Generations whose TPUs tensorflow-tpu 2.19 reaches through PJRT (the
#: PJRT_DEVICE / pluggable-device variables cloud/remote.py sets); v2-v4 TPU
#: VMs need the tpu-vm-tf-* runtimes instead, which this tool does not use.
TF_PJRT_GENERATIONS = ("v5litepod", "v5p", "v6e")
#: Distributions that bring the stock `tensorflow` package with them (tf-keras's
#: own requirements name tensorflow); on a tensorflow-tpu worker a second
#: `tensorflow` would replace the TPU build's module.
PULLS_TENSORFLOW = ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tf-keras")

_NAME = re.compile(r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?")
_ZONE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")
_PROJECT = re.compile(r"(?:[a-z][a-z0-9.-]*[a-z0-9]:)?[a-z][a-z0-9-]{4,28}[a-z0-9]")
_ACCELERATOR = re.compile(r"([a-z0-9]+)-([0-9]+)")
_RUNTIME = re.compile(r"[a-z0-9][a-z0-9.-]{0,62}")
_EXTRA = re.compile(r"[a-z0-9][a-z0-9_-]*")
_REQUIREMENT = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")
_BUCKET = re.compile(r"gs://[a-z0-9][a-z0-9._-]{1,221}[a-z0-9](/[^\s]*)?")
_DURATION = re.compile(r"(?:[0-9]+[smhd])+|[0-9]+")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Accelerator:
    """A parsed accelerator type such as v5litepod-8."""

    name: str
    generation: str
    count: int
    hosts: int

    @property
    def multi_host(self) -> bool:
        return self.hosts > 1

    @property
    def devices_per_host(self) -> int:
        """jax devices per host: one per chip (v4 and v5p chips are megacores,
        so one device per 2 TensorCores; v2 and v3 show every TensorCore)."""
        unit, per_host, _ = GENERATIONS[self.generation]
        if unit == "chips":
            return self.count if self.hosts == 1 else per_host
        return 8 if self.generation in ("v2", "v3") else 4

    def describe(self) -> str:
        unit = GENERATIONS[self.generation][0]
        hosts = "1 host" if self.hosts == 1 else f"{self.hosts} hosts"
        return f"{self.name} ({self.count} {unit}, {hosts})"


#: What a name must look like: its pattern and, in words, what is accepted.
_FORMATS = {
    "TPU name": (
        _NAME,
        "use 1-63 lowercase letters, digits or hyphens, starting with a letter "
        "and not ending with a hyphen",
    ),
    "zone": (
        _ZONE,
        "expected REGION-ZONE such as us-central2-b, us-west4-a or europe-west4-a",
    ),
    "project": (
        _PROJECT,
        "expected a project ID: 6-30 lowercase letters, digits or hyphens, "
        "starting with a letter",
    ),
    "package extra": (
        _EXTRA,
        "use a name from pyproject.toml's [project.optional-dependencies], e.g. tfds",
    ),
}


def _named(what: str, value: str) -> str:
    """`value` if it has the format of a `what` (`_FORMATS`), else ValueError."""
    pattern, accepted = _FORMATS[what]
    if not pattern.fullmatch(value):
        raise ValueError(f"{what} {value!r} is not valid; {accepted}")
    return value


def tpu_name(value: str) -> str:
    """A TPU (and queued resource) name, per GCP resource naming rules."""
    return _named("TPU name", value)


def zone(value: str) -> str:
    return _named("zone", value)


def project(value: str) -> str:
    return _named("project", value)


def accelerator(value: str) -> Accelerator:
    """Parse and check an accelerator type; the host count is for messages only."""
    known = ", ".join(f"{g}-N" for g in GENERATIONS)
    match = _ACCELERATOR.fullmatch(value)
    if not match or match.group(1) not in GENERATIONS:
        raise ValueError(
            f"accelerator type {value!r} is not valid; expected one of {known}, "
            "e.g. v5litepod-8, v4-32, v6e-8, v5p-8"
        )
    generation, count = match.group(1), int(match.group(2))
    unit, per_host, _ = GENERATIONS[generation]
    if unit == "TensorCores":
        if count < 8 or count % 8:
            raise ValueError(
                f"accelerator type {value!r} is not valid; {generation}-N counts "
                "TensorCores, N is a multiple of 8 (8 per host), e.g. "
                f"{generation}-8, {generation}-32"
            )
        hosts = count // 8
    else:
        power_of_two = count & (count - 1) == 0
        if not (count in SINGLE_HOST_CHIP_COUNTS or (count >= 16 and power_of_two)):
            raise ValueError(
                f"accelerator type {value!r} is not valid; {generation}-N counts "
                "chips, N is 1, 4, 8 (one host) or a power of two from 16 "
                f"({per_host} chips per host), e.g. {generation}-8, {generation}-32"
            )
        hosts = 1 if count in SINGLE_HOST_CHIP_COUNTS else count // per_host
    return Accelerator(value, generation, count, hosts)


def default_runtime(acc: Accelerator) -> str:
    return GENERATIONS[acc.generation][2]


def runtime_version(value: str, acc: Accelerator) -> str:
    """A runtime version; a known default of another TPU generation is refused."""
    if not _RUNTIME.fullmatch(value):
        raise ValueError(
            f"runtime version {value!r} is not valid; expected lowercase letters, "
            f"digits, dots and hyphens, e.g. {default_runtime(acc)}"
        )
    for generation, (_, _, runtime) in GENERATIONS.items():
        if value == runtime != default_runtime(acc):
            raise ValueError(
                f"runtime version {value!r} is for {generation}, not {acc.name}; "
                f"use {default_runtime(acc)} (the default) or another runtime for "
                f"{acc.generation}"
            )
    return value


def backend(value: str) -> str:
    if value not in BACKENDS:
        hint = " (torch on TPU needs torch_xla, which this tool does not set up)"
        raise ValueError(
            f"backend {value!r} is not supported on Cloud TPU; use "
            f"{' or '.join(BACKENDS)}" + (hint if value == "torch" else "")
        )
    return value


def extra(value: str) -> str:
    """A package extra installed on the workers besides the backend's."""
    return _named("package extra", value)


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_extras(pyproject: Path) -> tuple[str, dict[str, list[str]]]:
    """(project name, {extra: requirements}) from a pyproject.toml; an absent
    or unreadable file gives ("", {})."""
    try:
        project = tomllib.loads(Path(pyproject).read_text()).get("project", {})
    except (OSError, tomllib.TOMLDecodeError):
        return "", {}
    return project.get("name", ""), dict(project.get("optional-dependencies", {}))


def tensorflow_pullers(extra_name: str, pyproject: Path) -> list[str]:
    """The requirements of `extra_name` (following the project's references to
    its own extras) that bring the stock tensorflow package."""
    name, table = project_extras(pyproject)
    found, todo, seen = [], [extra_name], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for requirement in table.get(current, []):
            match = _REQUIREMENT.match(requirement)
            if not match:
                continue
            if name and _normalized(match.group(1)) == _normalized(name):
                todo += [e.strip() for e in (match.group(2) or "").split(",")]
            elif _normalized(match.group(1)) in PULLS_TENSORFLOW:
                found.append(requirement.strip())
    return found


def extras(values: list[str], pyproject: Path, backend: str, always=()) -> list[str]:
    """Extras for the workers: each one pyproject.toml defines, and on
    tensorflow workers none (nor the `always` ones) that would install stock
    tensorflow beside tensorflow-tpu."""
    _, table = project_extras(pyproject)
    for value in values:
        extra(value)
        if value not in table:
            known = ", ".join(sorted(table)) or "none"
            raise ValueError(
                f"package extra {value!r} is not in {pyproject}'s "
                f"[project.optional-dependencies] (defined: {known})"
            )
    if backend == "tensorflow":
        for value in [*always, *values]:
            pulled = tensorflow_pullers(value, pyproject)
            if pulled:
                raise ValueError(
                    f"package extra {value!r} requires {', '.join(pulled)}, which "
                    "would install the stock tensorflow package beside tensorflow-tpu "
                    "on the tensorflow workers; leave it out, or use --backend jax"
                )
    return list(values)


def tensorflow_slice(acc: Accelerator) -> None:
    """Refuse the slices tensorflow-tpu cannot run on as this tool installs it."""
    if acc.multi_host:
        raise ValueError(
            f"--backend tensorflow on {acc.name} ({acc.hosts} hosts) is refused: "
            "multi-host tensorflow needs the tpu-vm-tf-*-pod runtimes and is "
            "untested here; use --backend jax, or a single-host slice"
        )
    if acc.generation not in TF_PJRT_GENERATIONS:
        raise ValueError(
            f"--backend tensorflow on {acc.name} is refused: tensorflow-tpu reaches "
            f"TPUs through PJRT on {', '.join(TF_PJRT_GENERATIONS)} only ("
            f"{acc.generation} needs the tpu-vm-tf-* runtimes, untested here); use "
            "--backend jax, or a v5litepod, v5p or v6e slice"
        )


def checkpoint_dir(value: str, rehearse: bool) -> str:
    """Where every worker writes the training checkpoints: a gs:// bucket path
    on Cloud TPU (a worker's disk goes with the TPU); a local directory, made
    absolute, in a rehearsal (the workers are local processes)."""
    if "\n" in value or "\x00" in value or not value.strip():
        raise ValueError(f"--checkpoint-dir {value!r} is not a usable path")
    if rehearse:
        if "://" in value:
            raise ValueError(
                f"--checkpoint-dir {value!r}: a rehearsal's workers are processes "
                "on this machine; give a local directory"
            )
        return str(Path(value).resolve())
    if not value.startswith("gs://"):
        raise ValueError(
            f"--checkpoint-dir {value!r} is not a gs:// path; a TPU worker's disk "
            "is deleted with the TPU, so checkpoints must go to a bucket, e.g. "
            "gs://my-bucket/synann/run1"
        )
    if not _BUCKET.fullmatch(value):
        raise ValueError(
            f"--checkpoint-dir {value!r} does not name a valid bucket: bucket "
            "names have 3 to 222 characters (lowercase letters, digits, '.', '_', "
            "'-', starting and ending with a letter or digit), and the path no "
            "spaces; e.g. gs://my-bucket/synann/run1"
        )
    return value.rstrip("/")


def checkpoint_extra(directory: str, backend: str, pyproject: Path) -> str:
    """The package extra the workers need to write checkpoints to `directory`:
    `gcs` for gs:// (orbax-checkpoint and its gs:// file system), else
    `checkpoint`. training/mnist.py writes them with orbax under jax only."""
    if backend != "jax":
        raise ValueError(
            f"--checkpoint-dir needs --backend jax (training writes checkpoints with "
            f"orbax under jax), not {backend}"
        )
    name = "gcs" if directory.startswith("gs://") else "checkpoint"
    if name not in project_extras(pyproject)[1]:
        raise ValueError(
            f"--checkpoint-dir needs the {name!r} extra (orbax-checkpoint), which "
            f"{pyproject} does not define"
        )
    return name


def count(value: str, what: str, low: int = 0) -> int:
    """A whole number >= low, for options such as --retries."""
    if not value.strip().isdigit() or int(value) < low:
        raise ValueError(f"{what} {value!r} is not valid; use a whole number >= {low}")
    return int(value)


def duration(value: str) -> int:
    """Seconds in a duration such as 90, 90s, 30m, 2h or 1h30m (must be > 0)."""
    text = value.strip().lower()
    if not _DURATION.fullmatch(text):
        raise ValueError(
            f"duration {value!r} is not valid; use seconds or units s, m, h, d, "
            "e.g. 600, 30m, 2h, 1h30m"
        )
    if text.isdigit():
        seconds = int(text)
    else:
        parts = re.findall(r"([0-9]+)([smhd])", text)
        seconds = sum(int(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"duration {value!r} must be longer than 0 seconds")
    return seconds


def poll_interval(value: str) -> float:
    """Seconds between readiness checks (0 allowed, for tests)."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ValueError(f"poll interval {value!r} is not valid; use seconds >= 0")
    return seconds


def local_path(value: str, what: str) -> str:
    """A local path gcloud scp will not mistake for INSTANCE:PATH or a flag."""
    if not value or ":" in value or "\n" in value:
        raise ValueError(
            f"{what} {value!r} is not usable; gcloud scp reads ':' as INSTANCE:PATH, "
            "use a path without ':' or newlines"
        )
    if value.startswith("-"):
        return "./" + value
    return value


def env_var(value: str) -> tuple[str, str]:
    """A KEY=VALUE pair for the training process on the workers."""
    key, sep, val = value.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise ValueError(
            f"--env {value!r} is not valid; use KEY=VALUE with KEY made of letters, "
            "digits and underscores, e.g. XLA_FLAGS=--xla_dump_to=/tmp/xla"
        )
    if key == "KERAS_BACKEND":
        raise ValueError("--env cannot set KERAS_BACKEND; use --backend")
    return key, val


def train_args(args: list[str]) -> list[str]:
    """Training arguments; the tool sets --output-dir and --checkpoint-dir."""
    for arg in args:
        if arg == "--output-dir" or arg.startswith("--output-dir="):
            raise ValueError(
                "do not pass --output-dir to training/mnist.py; give submit "
                "--output-dir LOCAL_DIR, the tool sets the remote one"
            )
        if arg == "--checkpoint-dir" or arg.startswith("--checkpoint-dir="):
            raise ValueError(
                "give --checkpoint-dir to submit (before --), not to "
                "training/mnist.py; the tool passes it to every worker"
            )
        if "\x00" in arg:
            raise ValueError("training arguments cannot contain NUL characters")
    return list(args)


def global_batch(train_args: list[str], acc: Accelerator) -> int:
    """The training's global batch (--batch-size, as training/cli.py reads it,
    its default included) must split evenly over every device of the slice;
    refused before anything is created, with the nearest batch sizes that
    would."""
    batch = training_cli.batch_size(train_args)
    devices = acc.hosts * acc.devices_per_host
    if batch % devices:
        lower, upper = batch // devices * devices, (batch // devices + 1) * devices
        nearest = " or ".join(str(b) for b in (lower, upper) if b > 0)
        raise ValueError(
            f"--batch-size {batch} does not split over the {devices} devices of "
            f"{acc.name}; use a multiple of {devices}, e.g. {nearest}"
        )
    return batch


_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")


def service_account(value: str) -> str:
    """A service account's email for the TPU VMs."""
    if not _EMAIL.fullmatch(value):
        raise ValueError(
            f"--service-account {value!r} is not an email address such as "
            "NAME@PROJECT.iam.gserviceaccount.com"
        )
    return value
