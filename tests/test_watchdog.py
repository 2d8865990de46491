"""training/supervisor/heartbeat.py: the heartbeat's decisions (with a
stand-in for jax's key-value store), and training/distribute/cluster.py: the
checks made before joining."""

from __future__ import annotations

import threading
import time

import pytest
from processes import port_held_like_grpc

from training.distribute import cluster
from training.supervisor import heartbeat

pytestmark = pytest.mark.any_backend
P = heartbeat.PREFIX


class Store:
    """What the watchdog uses of jax's coordination-service client."""

    def __init__(self):
        self.data: dict[str, str] = {}
        self.down = False
        self.lock = threading.Lock()

    def key_value_set(self, key, value, allow_overwrite=False):
        with self.lock:
            if self.down:
                raise RuntimeError("UNAVAILABLE: connection refused")
            if key in self.data and not allow_overwrite:
                raise RuntimeError(f"ALREADY_EXISTS: {key}")
            self.data[key] = value

    def key_value_dir_get(self, prefix):
        with self.lock:
            if self.down:
                raise RuntimeError("UNAVAILABLE: connection refused")
            return [(k, v) for k, v in self.data.items() if k.startswith(prefix)]


class Exited(Exception):
    pass


def watchdog(store, index=0, count=3, timeout=10.0):
    codes = []

    def exit_(code):
        codes.append(code)
        raise Exited(code)

    dog = heartbeat.Heartbeat(store, index, count, timeout=timeout, interval=0.05)
    dog._exit = exit_
    return dog, codes


def test_carries_on_while_everyone_beats():
    dog, _ = watchdog(Store())
    entries = {f"{P}beat/1": "1", f"{P}beat/2": "1"}
    assert dog.check(entries, now=time.monotonic()) is None


def test_a_failed_process_is_named():
    dog, _ = watchdog(Store())
    entries = {f"{P}failed/2": "PinMismatch: numpy 2.4 (pinned 0.1)"}
    assert dog.check(entries, now=0.0) == (
        "stopping because process 2 failed: PinMismatch: numpy 2.4 (pinned 0.1)"
    )


def test_silence_longer_than_the_timeout_is_named():
    dog, _ = watchdog(Store(), timeout=10.0)
    start = time.monotonic()
    entries = {f"{P}beat/1": "5", f"{P}beat/2": "7"}
    assert dog.check(entries, now=start + 1) is None
    entries[f"{P}beat/2"] = "8"  # process 2 beats on, process 1 does not
    assert dog.check(entries, now=start + 9) is None
    why = dog.check(entries, now=start + 12)
    assert why.startswith("stopping because process 1 has not been heard from")
    assert cluster.ENV_WATCHDOG_TIMEOUT in why


def test_a_finished_process_may_go_quiet():
    dog, _ = watchdog(Store(), count=2, timeout=1.0)
    entries = {f"{P}beat/1": "3", f"{P}done/1": ""}
    assert dog.check(entries, now=time.monotonic() + 100) is None


def test_reports_are_recorded_once():
    store = Store()
    dog, _ = watchdog(store, index=1)
    dog.failed("RuntimeError:\n  something   broke")
    dog.failed("a second reason")  # ignored: the first stands
    dog.done()  # ignored too
    assert store.data == {f"{P}failed/1": "RuntimeError: something broke"}


def test_the_loop_ends_the_process_naming_the_failed_one(capsys):
    store = Store()
    dog, codes = watchdog(store, index=0, count=2)
    store.data[f"{P}failed/1"] = "ended by SIGTERM"
    with pytest.raises(Exited):
        dog._loop()
    assert codes == [143]  # process 1's own status: asked to stop, not failed
    assert capsys.readouterr().err == (
        "mnist.py: error: process 0 of 2: stopping because process 1 failed: "
        "ended by SIGTERM\n"
    )


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        ("stalled: no training progress for 70 s in train", 75),
        ("ended by SIGTERM (the metadata server says this VM was preempted)", 143),
        ("ended by SIGINT", 130),
        ("RuntimeError: boom", heartbeat.EXIT_OTHER_FAILED),
    ],
)
def test_a_stopped_process_takes_the_others_exit_status(reason, code):
    store = Store()
    dog, codes = watchdog(store, index=0, count=2)
    ends = []
    dog.on_end = lambda message, status: ends.append((message, status))
    store.data[f"{P}failed/1"] = reason
    with pytest.raises(Exited):
        dog._loop()
    assert codes == [code]
    assert ends == [(f"stopping because process 1 failed: {reason}", code)]


def test_the_loop_ends_when_the_service_is_gone(capsys):
    store = Store()
    store.down = True
    dog, codes = watchdog(store, index=1, count=2, timeout=0.3)
    with pytest.raises(Exited):
        dog._loop()
    assert codes == [heartbeat.EXIT_OTHER_FAILED]
    assert "coordination service on process 0 has been unreachable" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("raw", ["0", "-5", "soon"])
def test_bad_timeouts_are_one_line_errors(monkeypatch, raw):
    monkeypatch.setenv(cluster.ENV_WATCHDOG_TIMEOUT, raw)
    with pytest.raises(cluster.JoinError, match="expected a positive number"):
        cluster.watchdog_timeout()


def test_coordinator_from_the_keras_variables(monkeypatch):
    monkeypatch.setenv(
        "KERAS_DISTRIBUTION_JOB_ADDRESSES", "10.0.0.1:7001,10.0.0.2:7001"
    )
    monkeypatch.setenv("KERAS_DISTRIBUTION_NUM_PROCESSES", "2")
    monkeypatch.setenv("KERAS_DISTRIBUTION_PROCESS_ID", "1")
    assert cluster.coordinator_from_env() == ("10.0.0.1:7001", 2, 1)
    monkeypatch.setenv("KERAS_DISTRIBUTION_NUM_PROCESSES", "3")
    with pytest.raises(cluster.JoinError, match="names 2 processes"):
        cluster.coordinator_from_env()
    for key in ("JOB_ADDRESSES", "NUM_PROCESSES", "PROCESS_ID"):
        monkeypatch.delenv(f"KERAS_DISTRIBUTION_{key}")
    assert cluster.coordinator_from_env() == (None, None, None)  # jax detects


def test_a_port_in_use_is_refused_and_a_free_one_is_not():
    with port_held_like_grpc() as port:
        with pytest.raises(cluster.JoinError, match=f"port {port} is in use"):
            cluster.check_port_free(f"127.0.0.1:{port}")
    cluster.check_port_free(f"127.0.0.1:{port}")  # free again: no error
