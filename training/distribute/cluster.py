"""Several jax processes as one run: joining them.

`join()` replaces `keras.distribution.initialize()` (which calls
`jax.distributed.initialize` and then Keras's cross-process seed agreement
unless a seed was set) so that its timeouts can be set:

- the coordinator (process 0) listens on the port of the first address in
  `KERAS_DISTRIBUTION_JOB_ADDRESSES`, or on a Cloud TPU slice on 8482
  (`JAX_COORDINATOR_PORT` overrides it); jax's gRPC server binds that port
  with SO_REUSEPORT, so a second coordinator on a port still held by another
  run would bind too and the kernel would split the connecting processes
  between the two runs, each then waiting for processes that joined the
  other. `join()` refuses a coordinator port that is in use instead.
- `SYNANN_JOIN_TIMEOUT` (seconds, default 300): how long a process waits for
  the others to join.
- `SYNANN_WATCHDOG_TIMEOUT` (seconds, default 60): how long a process may go
  unheard before the others stop (training/supervisor/heartbeat.py). jax's
  own heartbeat (a process not heard from is declared dead and every process
  aborts) is set to twice that, so that ours, which names the process,
  speaks first.

After joining, `distributed_client()` is jax's coordination-service client,
whose key-value store the supervisor's heartbeat keeps its record in.
"""

from __future__ import annotations

import errno
import inspect
import os
import socket

from training.cli import first_line

ENV_JOIN_TIMEOUT = "SYNANN_JOIN_TIMEOUT"
ENV_WATCHDOG_TIMEOUT = "SYNANN_WATCHDOG_TIMEOUT"
DEFAULT_JOIN_TIMEOUT = 300
DEFAULT_WATCHDOG_TIMEOUT = 60.0


class JoinError(Exception):
    """The processes could not form a cluster (one-line message)."""


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise JoinError(f"{name}={raw!r} is not valid; expected a positive number")
    return value


def coordinator_from_env() -> tuple[str | None, int | None, int | None]:
    """(coordinator address, process count, process id) from the
    KERAS_DISTRIBUTION_* variables; None where unset (jax then detects them,
    e.g. from the Cloud TPU metadata)."""
    env = os.environ
    addresses = [a for a in env.get("KERAS_DISTRIBUTION_JOB_ADDRESSES", "").split(",")]
    addresses = [a.strip() for a in addresses if a.strip()]
    count = env.get("KERAS_DISTRIBUTION_NUM_PROCESSES", "").strip()
    index = env.get("KERAS_DISTRIBUTION_PROCESS_ID", "").strip()
    try:
        count_value = int(count) if count else None
        index_value = int(index) if index else None
    except ValueError:
        raise JoinError(
            "KERAS_DISTRIBUTION_NUM_PROCESSES and KERAS_DISTRIBUTION_PROCESS_ID "
            f"must be integers; got {count!r} and {index!r}"
        ) from None
    if len(addresses) > 1 and count_value not in (None, len(addresses)):
        raise JoinError(
            f"KERAS_DISTRIBUTION_JOB_ADDRESSES names {len(addresses)} processes "
            f"but KERAS_DISTRIBUTION_NUM_PROCESSES={count_value}"
        )
    return (addresses[0] if addresses else None), count_value, index_value


def check_port_free(address: str) -> None:
    """Raise JoinError if something listens on `address`'s port (host:port):
    a socket without SO_REUSEPORT cannot bind a port that a gRPC server holds."""
    port = int(address.rsplit(":", 1)[1])
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            probe = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 here
        try:
            probe.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise JoinError(
                    f"the coordinator port {port} is in use on this machine (a "
                    "run still going, or another program); end it or choose "
                    "another port in KERAS_DISTRIBUTION_JOB_ADDRESSES"
                ) from None
            if e.errno == errno.EADDRNOTAVAIL:
                continue
            raise
        finally:
            probe.close()
        return


def join(agree_on_seed: bool = True) -> None:
    """Join this process to the others of the run (see the module docstring).
    Seed Keras first (keras.utils.set_random_seed): otherwise the processes
    agree on a seed with a collective step here (unless `agree_on_seed` is
    False: a process that joins only to report its failure)."""
    import jax

    if distributed_client() is not None:
        return
    address, count, index = coordinator_from_env()
    timeout = int(_seconds(ENV_JOIN_TIMEOUT, DEFAULT_JOIN_TIMEOUT))
    heartbeat = int(2 * watchdog_timeout()) + 1
    if address is not None and index == 0:
        check_port_free(address)
    options = {"initialization_timeout": timeout}
    # jax releases since mid-2025 take the heartbeat timeout; older ones keep 100 s.
    if (
        "heartbeat_timeout_seconds"
        in inspect.signature(jax.distributed.initialize).parameters
    ):
        options["heartbeat_timeout_seconds"] = max(heartbeat, 10)
    try:
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=count,
            process_id=index,
            **options,
        )
    except Exception as e:  # jax raises several kinds; all mean: no cluster
        raise JoinError(
            f"process {index if index is not None else '?'} could not join "
            f"the others within {timeout} s ({ENV_JOIN_TIMEOUT}): {first_line(e)}"
        ) from None
    if agree_on_seed:
        _agree_on_seed()


def _agree_on_seed() -> None:
    """What keras.distribution.initialize does after joining: agree on a seed
    across processes when none was set (a collective; none when seeded)."""
    try:
        from keras.src.backend.jax.distribution_lib import initialize_rng
    except ImportError:  # older Keras: it has no such step
        return
    initialize_rng()


def watchdog_timeout() -> float:
    return _seconds(ENV_WATCHDOG_TIMEOUT, DEFAULT_WATCHDOG_TIMEOUT)


def distributed_client():
    """jax's coordination-service client (None before joining)."""
    from jax._src import distributed

    return distributed.global_state.client
