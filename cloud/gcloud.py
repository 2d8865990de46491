"""Pure functions that build gcloud argv lists for Cloud TPU (nothing runs here).

The lists go to subprocess as argv, never through a local shell. Remote paths are
relative to the remote user's home directory.
"""

from __future__ import annotations

from dataclasses import dataclass

GCLOUD = "gcloud"
QR = ["compute", "tpus", "queued-resources"]
VM = ["compute", "tpus", "tpu-vm"]

REMOTE_TARBALL = "synann_src.tar.gz"
REMOTE_DIR = "synann_run"  # src/ (the code), output/, logs/worker-N.log

QR_STATE = "value(state.state)"  # WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, ...
VM_STATE = "value(state)"  # CREATING, READY, ...
NAME_ONLY = "value(name)"
NODE_JSON = "json"  # the TPU VM node: state, networkEndpoints (one per worker)


#: ssh options on every gcloud ssh and scp (gcloud sets none of these): a
#: worker that stops answering ends the connection within 30 s x 4 = 2 min
#: (exit 255) instead of TCP's hours, and a connection attempt waits at most
#: 30 s (gcloud tries 10 times, 5 s apart).
KEEPALIVE = ("ServerAliveInterval=30", "ServerAliveCountMax=4", "ConnectTimeout=30")


@dataclass(frozen=True)
class Target:
    """Where a TPU lives; `queued` says whether it comes from a queued resource.
    `internal_ip`: ssh and scp to the workers' internal addresses.
    `ssh_options`: `-o` options for every ssh and scp."""

    name: str
    zone: str
    project: str | None = None
    queued: bool = True
    internal_ip: bool = False
    ssh_options: tuple[str, ...] = KEEPALIVE

    def where(self) -> list[str]:
        flags = [f"--zone={self.zone}"]
        if self.project:
            flags.append(f"--project={self.project}")
        return flags

    def ssh_flags(self, flag: str) -> list[str]:
        """`flag` (--ssh-flag or --scp-flag) for each ssh option, and
        --internal-ip if asked for."""
        flags = [f"{flag}=-o{option}" for option in self.ssh_options]
        return flags + (["--internal-ip"] if self.internal_ip else [])


#: The labels every resource the tool creates carries (`sweep` finds them):
#: TOOL_LABEL=TOOL, and DEADLINE_LABEL=the Unix time it deletes itself at.
TOOL_LABEL, TOOL, DEADLINE_LABEL = "tool", "keras-synann", "deadline"


@dataclass(frozen=True)
class Create:
    """What `create` asks for besides the name: the TPU, its capacity and
    network, the labels and metadata it carries, and gcloud flags passed
    through as given (`extra`)."""

    accelerator_type: str
    runtime_version: str
    provisioning: str = "on-demand"  # on-demand, spot, reserved, flex-start
    valid_for_s: int | None = None  # how long a queued request may wait
    max_run_s: int | None = None  # flex-start: Google deletes the VMs then
    service_account: str | None = None
    network: str | None = None
    subnetwork: str | None = None
    internal_ips: bool = False
    tags: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    metadata: tuple[tuple[str, str], ...] = ()
    metadata_files: tuple[tuple[str, str], ...] = ()
    extra: tuple[str, ...] = ()

    def common(self) -> list[str]:
        """Flags that queued resources and TPU VMs share."""
        argv = [f"--accelerator-type={self.accelerator_type}"]
        if self.service_account:
            argv.append(f"--service-account={self.service_account}")
        if self.network:
            argv.append(f"--network={self.network}")
        if self.subnetwork:
            argv.append(f"--subnetwork={self.subnetwork}")
        if self.internal_ips:
            argv.append("--internal-ips")
        if self.tags:
            argv.append("--tags=" + ",".join(self.tags))
        for flag, pairs in (
            ("--labels", self.labels),
            ("--metadata", self.metadata),
            ("--metadata-from-file", self.metadata_files),
        ):
            if pairs:
                argv.append(flag + "=" + ",".join(f"{k}={v}" for k, v in pairs))
        return argv


def _provisioning(spec: Create) -> list[str]:
    if spec.provisioning == "flex-start":
        return [
            "--provisioning-model=flex-start",
            f"--max-run-duration={spec.max_run_s}s",
        ]
    return {"on-demand": [], "spot": ["--spot"], "reserved": ["--reserved"]}[
        spec.provisioning
    ]


def create(t: Target, spec: Create) -> list[str]:
    """Create a queued resource (one node named like it) or a plain TPU VM.

    A queued resource request expires after `spec.valid_for_s`; flex-start is
    a queued resource of gcloud's alpha track (v2alpha1). A TPU VM is created
    with --async and the caller waits with `describe`.
    """
    if t.queued:
        alpha = ["alpha"] if spec.provisioning == "flex-start" else []
        argv = [GCLOUD, *alpha, *QR, "create", t.name, f"--node-id={t.name}"]
        argv += [*t.where(), f"--runtime-version={spec.runtime_version}"]
        argv += [*spec.common(), *_provisioning(spec)]
        if spec.valid_for_s:
            argv.append(f"--valid-until-duration={spec.valid_for_s}s")
        return argv + [*spec.extra, "--quiet"]
    argv = [GCLOUD, *VM, "create", t.name, *t.where()]
    argv += [f"--version={spec.runtime_version}", *spec.common(), *_provisioning(spec)]
    return argv + [*spec.extra, "--async", "--quiet"]


def resource_path(t: Target, project: str) -> str:
    """The API path of what `delete` deletes (the slice's agent deletes it)."""
    kind = "queuedResources" if t.queued else "nodes"
    return f"projects/{project}/locations/{t.zone}/{kind}/{t.name}"


def list_resources(zone: str, project: str | None, queued: bool) -> list[str]:
    """Every queued resource (or TPU VM) of the zone, as JSON."""
    argv = [GCLOUD, *(QR if queued else VM), "list", f"--zone={zone}"]
    return argv + ([f"--project={project}"] if project else []) + ["--format=json"]


def storage_cat(uri: str) -> list[str]:
    """Print a Cloud Storage object (wildcards allowed)."""
    return [GCLOUD, "storage", "cat", uri]


def describe(t: Target, fmt: str | None = None) -> list[str]:
    """Describe the queued resource (or the TPU VM), optionally in a --format."""
    argv = [GCLOUD, *(QR if t.queued else VM), "describe", t.name, *t.where()]
    return argv + ([f"--format={fmt}"] if fmt else [])


def describe_vm(t: Target, fmt: str | None = None) -> list[str]:
    """Describe the TPU VM node itself, whatever created it."""
    argv = [GCLOUD, *VM, "describe", t.name, *t.where()]
    return argv + ([f"--format={fmt}"] if fmt else [])


def ready_state(t: Target) -> str:
    return "ACTIVE" if t.queued else "READY"


def scp_to(t: Target, local: str, remote: str, worker: str) -> list[str]:
    """Copy a local file to `remote` on one worker. One worker per command:
    with several (--worker=all) gcloud requires the ssh key in the ssh-agent
    and fails with SSHKeyNotInAgent when an agent holds only other keys."""
    return [
        GCLOUD,
        *VM,
        "scp",
        local,
        f"{t.name}:{remote}",
        *t.where(),
        f"--worker={worker}",
        *t.ssh_flags("--scp-flag"),
        "--quiet",
    ]


def scp_back(t: Target, remote: str, local_dir: str, worker: str = "0") -> list[str]:
    """Copy the remote directory `remote` into the existing local directory."""
    return [
        GCLOUD,
        *VM,
        "scp",
        "--recurse",
        f"{t.name}:{remote}",
        local_dir,
        *t.where(),
        f"--worker={worker}",
        *t.ssh_flags("--scp-flag"),
        "--quiet",
    ]


def ssh(t: Target, command: str, worker: str = "all") -> list[str]:
    """Run the remote shell string `command` on one worker or on all at once."""
    return [
        GCLOUD,
        *VM,
        "ssh",
        t.name,
        *t.where(),
        f"--worker={worker}",
        f"--command={command}",
        *t.ssh_flags("--ssh-flag"),
        "--quiet",
    ]


def delete(t: Target) -> list[str]:
    """Delete the queued resource with its TPU (--force), or the TPU VM."""
    if t.queued:
        return [GCLOUD, *QR, "delete", t.name, *t.where(), "--force", "--quiet"]
    return [GCLOUD, *VM, "delete", t.name, *t.where(), "--quiet"]


def delete_named(name: str, zone: str, project: str | None, queued: bool) -> list[str]:
    """`delete` for a resource found by `sweep`."""
    return delete(Target(name, zone, project, queued))
