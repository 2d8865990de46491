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


def _provisioning(provisioning: str) -> list[str]:
    return {"on-demand": [], "spot": ["--spot"], "reserved": ["--reserved"]}[
        provisioning
    ]


def create(
    t: Target,
    accelerator_type: str,
    runtime_version: str,
    provisioning: str = "on-demand",
    valid_for_s: int | None = None,
    service_account: str | None = None,
) -> list[str]:
    """Create a queued resource (one node named like it) or a plain TPU VM.

    A queued resource request expires after `valid_for_s`; a TPU VM is created
    with --async and the caller waits with `describe`.
    """
    if t.queued:
        argv = [GCLOUD, *QR, "create", t.name, f"--node-id={t.name}", *t.where()]
        argv += [
            f"--accelerator-type={accelerator_type}",
            f"--runtime-version={runtime_version}",
            *_provisioning(provisioning),
        ]
        if service_account:
            argv.append(f"--service-account={service_account}")
        if valid_for_s:
            argv.append(f"--valid-until-duration={valid_for_s}s")
        return argv + ["--quiet"]
    return [
        GCLOUD,
        *VM,
        "create",
        t.name,
        *t.where(),
        f"--accelerator-type={accelerator_type}",
        f"--version={runtime_version}",
        *_provisioning(provisioning),
        *([f"--service-account={service_account}"] if service_account else []),
        "--async",
        "--quiet",
    ]


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
