"""The time limits of a submission: on each gcloud command the client runs,
and on what the slice's agent does; a rehearsal's are shorter."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Client-side time limits, in seconds, on every gcloud command a
    submission runs (nothing waits unbounded while a TPU bills). When one
    passes, the command and its ssh/scp are stopped; after a remote step,
    the logs that can still be fetched are, and the TPU is deleted.

    run is --run-timeout plus `run_margin_s` (startup, the joining of the
    workers, writing the outputs); delete is retried with backoff within
    `delete_s`. After a SIGTERM ended a worker's training, the slice's state
    is watched for `preempt_poll_s` before the run counts as failed rather
    than preempted. On the slice, the agent copies every `copy_every_s`;
    worker 0 of a detached run deletes the slice `end_grace_s` after its
    training ended (the other workers' last copies land first); training
    gets SIGTERM `stop_grace_s` before the slice's deadline."""

    # The steps, in order.
    copy_s: int = 1800
    install_s: int = 1800
    preflight_s: int = 300
    run_margin_s: int = 600
    logs_s: int = 300
    # Copying back, reading the slice's state, deleting it.
    copy_back_s: int = 900
    probe_s: int = 300
    describe_s: int = 120
    delete_s: int = 900
    preempt_poll_s: int = 300
    # On the slice (cloud/agent.py).
    copy_every_s: int = 60
    end_grace_s: int = 120
    stop_grace_s: int = 120


#: --run-timeout and --max-run-duration when none is given.
DEFAULT_RUN_TIMEOUT = "2h"
DEFAULT_MAX_RUN = "4h"
#: A rehearsal's limits and ssh options: loopback answers at once, so a
#: silent worker is found in seconds (2 s x 3 keepalives).
REHEARSAL_LIMITS = Limits(
    copy_s=120,
    install_s=300,
    preflight_s=120,
    run_margin_s=15,
    logs_s=15,
    copy_back_s=30,
    probe_s=40,
    describe_s=60,
    delete_s=60,
    preempt_poll_s=30,
    copy_every_s=2,
    end_grace_s=5,
    stop_grace_s=10,
)
REHEARSAL_KEEPALIVE = (
    "ServerAliveInterval=2",
    "ServerAliveCountMax=3",
    "ConnectTimeout=3",
)
