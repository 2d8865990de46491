"""Several jax processes as one run (2 processes x 2 simulated CPU devices over
loopback, gloo collectives), started as users start training/mnist.py:

- the setting that hung (the carried MNIST, validation of more batches than
  jaxlib's CPU client keeps in flight: it hung every time without the fix);
- when one process fails, exits, is killed or hangs, the others stop within a
  bounded time with one line naming it; SIGTERM ends a process that waits in
  a collective step; a process that fails before joining stops the others;
- checkpoints written by all processes, resumed with 2 -> 1 -> 2 processes.

They depend on how the pinned jaxlib's coordination service and gloo
collectives behave (marker `pinned`: tox's `min` env leaves them out).
"""

from __future__ import annotations

import json
import signal
import time

import faults
import keras
import numpy as np
import pytest
from processes import (
    finish,
    mlp_args,
    port_held_like_grpc,
    start_cluster,
    start_script,
    wait_for_line,
)

import keras_synann  # noqa: F401  (best.keras holds its layers)
from cloud.rehearsal.workers import cluster_env, free_ports
from training import checkpoints, data
from training.distribute import cluster
from training.supervisor import heartbeat, preemption, status

pytestmark = [
    pytest.mark.skipif(
        keras.backend.backend() != "jax", reason="multi-process runs are jax's"
    ),
    pytest.mark.pinned,
]
#: The watchdog's timeout in these runs (seconds): short, to keep tests fast.
WATCHDOG = "8"


def assert_ok(results):
    for r in results:
        assert r.returncode == 0, r.output[-3000:]


def error_lines(output: str) -> list[str]:
    return [ln for ln in output.splitlines() if ln.startswith("mnist.py: error:")]


# ----------------------------------------------------------------------------
# The setting that hung


def test_lenet_on_the_carried_mnist_does_not_hang(tmp_path):
    """Each epoch validates on 5,000 samples in 157 batches of 32: more steps
    than jaxlib's CPU client keeps in flight (32), which deadlocked the
    processes whenever Keras queued them all."""
    args = [
        "--epochs", "2", "--steps-per-epoch", "10", "--batch-size", "32",
        "--verbose", "2", "--output-dir", str(tmp_path / "out"),
    ]  # fmt: skip
    results = finish(start_cluster(args), timeout=240)
    assert_ok(results)
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    tests = [
        [ln for ln in r.output.splitlines() if ln.startswith("Test accuracy")]
        for r in results
    ]
    assert tests[0] == tests[1] and len(tests[0]) == 1


# ----------------------------------------------------------------------------
# The watchdog


def test_the_others_stop_when_a_process_raises(mnist_dir, tmp_path):
    env = {cluster.ENV_WATCHDOG_TIMEOUT: WATCHDOG}
    args = mlp_args(mnist_dir, tmp_path / "out")
    fault = {1: {"args": faults.spec("fail_after(1)")}}
    first, second = finish(start_cluster(args, env=env, per_process=fault))
    assert second.returncode == 1 and "RuntimeError" in second.output
    assert first.returncode == heartbeat.EXIT_OTHER_FAILED
    (line,) = error_lines(first.output)
    assert line.startswith("mnist.py: error: process 0 of 2: stopping because ")
    assert "process 1 failed: RuntimeError: faults.fail_after raised" in line


def test_the_others_stop_when_a_process_is_killed(mnist_dir, tmp_path):
    """SIGKILL leaves no word: the others notice the missing heartbeat."""
    env = {cluster.ENV_WATCHDOG_TIMEOUT: WATCHDOG}
    args = mlp_args(mnist_dir, tmp_path / "out")
    kill = {1: {"args": faults.spec("kill_after(1)")}}
    first, second = finish(start_cluster(args, env=env, per_process=kill))
    assert second.returncode == -signal.SIGKILL
    assert first.returncode == heartbeat.EXIT_OTHER_FAILED
    (line,) = error_lines(first.output)
    assert line.startswith(
        "mnist.py: error: process 0 of 2: stopping because process 1 has not "
        f"been heard from for {WATCHDOG} s"
    )


def test_sigterm_ends_a_process_waiting_in_a_collective(mnist_dir, tmp_path):
    """Process 1 hangs after epoch 1; process 0 then waits in epoch 2's first
    collective step, where jax's preemption notifier used to swallow
    SIGTERM. It ends with 143 and process 1 stops, naming it."""
    env = {cluster.ENV_WATCHDOG_TIMEOUT: "60"}  # only SIGTERM may end this run
    args = mlp_args(
        mnist_dir,
        tmp_path / "out",
        3,
        "--status-file",
        str(tmp_path / "status-{process}.json"),
    )
    hang = {1: {"args": faults.spec("hang_after(1)")}}
    procs = start_cluster(args, env=env, per_process=hang)
    wait_for_line(procs[1], "faults: hang after epoch 1", timeout=240)
    time.sleep(3)  # process 0 is in the next step by now
    assert procs[0].poll() is None
    sent = time.monotonic()
    procs[0].send_signal(signal.SIGTERM)
    first, second = finish(procs, timeout=60)
    assert first.returncode == 143, first.output[-2000:]
    assert time.monotonic() - sent < 30
    assert error_lines(first.output) == [
        "mnist.py: error: process 0 of 2: ended by SIGTERM"
    ]
    # Process 1 stops with process 0's status: asked to stop, not a failure.
    assert second.returncode == 143
    assert "stopping because process 0 failed: ended by SIGTERM" in second.output
    for p in (0, 1):
        record = status.read(tmp_path / f"status-{p}.json")
        assert (record["status"], record["exit"]) == ("terminated", 143)
        assert record["preempted"] is None  # no metadata server here


#: The stall bound of the test below (s), and the most the processes may
#: take beyond it (process 0 waits up to 4.5 s for the others to read why).
#: The bound holds for the first step too, which compiles: on a loaded 2-core
#: machine that took more than 8 s.
STALL, STALL_SLACK = 15, 10


def test_a_stall_with_every_process_alive_ends_them_all(mnist_dir, tmp_path):
    """Process 1 hangs after epoch 1, alive (its heartbeats carry on);
    process 0 waits in epoch 2's first collective step. The heartbeat
    watchdog (60 s here) cannot see it; the stall watchdog ends both."""
    env = {cluster.ENV_WATCHDOG_TIMEOUT: "60"}
    args = mlp_args(
        mnist_dir,
        tmp_path / "out",
        3,
        "--stall-timeout",
        str(STALL),
        "--status-file",
        str(tmp_path / "status-{process}.json"),
    )
    hang = {1: {"args": faults.spec("hang_after(1)")}}
    procs = start_cluster(args, env=env, per_process=hang)
    wait_for_line(procs[1], "faults: hang after epoch 1", timeout=240)
    hung = time.monotonic()
    results = finish(procs, timeout=120)
    took = time.monotonic() - hung
    ended = ", ".join(f"process {i} {r.seconds:.1f} s" for i, r in enumerate(results))
    print(f"after the hang, bound {STALL} s: ended at {ended}")
    for r in results:
        assert r.returncode == status.EXIT_STALLED, r.output[-2000:]
        (line,) = error_lines(r.output)
        assert "stalled: no training progress for" in line
    assert took < STALL + STALL_SLACK
    for p in (0, 1):
        record = status.read(tmp_path / f"status-{p}.json")
        assert (record["status"], record["exit"]) == ("stalled", 75)
        assert record["process"] == p and record["processes"] == 2


def test_a_failed_start_up_check_stops_the_others(mnist_dir, tmp_path):
    """Process 1's pins check fails after joining; process 0 does not wait."""
    pins = tmp_path / "pins.txt"
    pins.write_text("numpy==0.0.1\n")
    args = mlp_args(mnist_dir, tmp_path / "out")
    bad = {1: {"env": {"SYNANN_PINS": str(pins)}}}
    first, second = finish(start_cluster(args, per_process=bad), timeout=120)
    assert second.returncode == 1
    assert "this environment is not the tested one" in error_lines(second.output)[0]
    assert first.returncode == heartbeat.EXIT_OTHER_FAILED
    assert "process 1 failed: this environment is not the tested one" in first.output


def test_a_process_failing_before_joining_stops_the_others(mnist_dir, tmp_path):
    """A bad argument on process 1: it joins only to say so, and process 0
    stops at once instead of waiting for it (SYNANN_JOIN_TIMEOUT)."""
    env = {cluster.ENV_JOIN_TIMEOUT: "200"}
    args = mlp_args(mnist_dir, tmp_path / "out")
    bad = {1: {"args": ["--learning-rate", "0"]}}
    first, second = finish(start_cluster(args, env=env, per_process=bad), 120)
    assert second.returncode == 2
    assert first.returncode == heartbeat.EXIT_OTHER_FAILED
    assert "process 1 failed: --learning-rate must be a positive number" in (
        first.output
    )
    assert first.seconds < 100  # far from the join timeout


def test_a_coordinator_port_in_use_is_refused(mnist_dir, tmp_path):
    """gRPC would share the port (SO_REUSEPORT) with the run holding it."""
    with port_held_like_grpc() as port:
        ports = [port, *free_ports(1)]
        proc = start_script(
            mlp_args(mnist_dir, tmp_path / "out"), cluster_env(ports, 2, process=0)
        )
        (result,) = finish([proc], timeout=120)
    assert result.returncode == 1
    (line,) = error_lines(result.output)
    assert f"the coordinator port {port} is in use" in line


# ----------------------------------------------------------------------------
# Checkpoints and --resume with another process count


def test_resume_with_other_process_counts(mnist_dir, tmp_path):
    """2 processes train epochs 1-2 and are killed; 1 process resumes epoch 3
    and is killed; 2 processes finish epoch 4. Each attempt has its own (new)
    output directory, as on a new TPU; the checkpoint directory is shared."""
    ckpt = str(tmp_path / "ckpt")

    def args(attempt, *extra):
        out = tmp_path / f"out{attempt}"
        return mlp_args(mnist_dir, out, 4, "--checkpoint-dir", ckpt, *extra)

    for r in finish(start_cluster(args(1, *faults.spec("kill_after(2)")))):
        assert r.returncode == -signal.SIGKILL, r.output[-2000:]
    assert checkpoints.completed_epochs(ckpt) == [1, 2]
    saved = checkpoints.read_saved(ckpt, 2)
    assert [row["epoch"] for row in saved.history] == [1, 2]
    assert saved.processes == 2

    one = start_script(
        args(2, "--resume", *faults.spec("kill_after(3)")),
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
    )
    (r,) = finish([one])
    assert r.returncode == -signal.SIGKILL, r.output[-2000:]
    assert f"Resuming {ckpt} after epoch 2 of 4." in r.output
    assert checkpoints.completed_epochs(ckpt) == [2, 3]  # the two newest

    results = finish(start_cluster(args(3, "--resume")))
    assert_ok(results)
    out = tmp_path / "out3"
    rows = json.loads((out / "history.json").read_text())
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4]
    assert rows[:3] == checkpoints.read_saved(ckpt, 3).history
    metrics = json.loads((out / "metrics.json").read_text())
    best = max(rows, key=lambda r: r["val_accuracy"])
    first_best = next(r for r in rows if r["val_accuracy"] == best["val_accuracy"])
    assert metrics["best_epoch"] == first_best["epoch"]
    assert metrics["val_accuracy"] == pytest.approx(first_best["val_accuracy"])
    # The reported test accuracy is best.keras's, computed here.
    splits = data.load_mnist(mnist_dir, val_size=16, seed=3)
    model = keras.saving.load_model(out / "best.keras")
    predicted = np.argmax(model.predict(splits.x_test, verbose=0), axis=-1)
    assert metrics["test_accuracy"] == pytest.approx(
        float(np.mean(predicted == splits.y_test)), abs=1e-6
    )
    assert not (tmp_path / "out1" / "metrics.json").exists()


def test_sigterm_mid_epoch_saves_the_steps_of_every_process(tmp_path):
    """SIGTERM to process 0 during epoch 2: at the next agreement step (every
    5 steps) both processes save the partial epoch together, both end with
    143, and 2 processes resume after those steps with the optimizer's step
    count exact."""
    from conftest import write_mnist

    steps_per_epoch = 10  # 160 training samples / 16
    data_dir = write_mnist(tmp_path / "mnist", n_train=176)
    ckpt = str(tmp_path / "ckpt")
    args = mlp_args(
        data_dir,
        tmp_path / "out",
        3,
        "--checkpoint-dir",
        ckpt,
        "--status-file",
        str(tmp_path / "status-{process}.json"),
    )
    env = {cluster.ENV_WATCHDOG_TIMEOUT: "30"}
    procs = start_cluster([*args, *faults.spec("slow_steps(0.3)")], env=env)
    wait_for_line(procs[0], "faults: epoch 2 step 1 done", 240)
    sent = time.monotonic()
    procs[0].send_signal(signal.SIGTERM)
    results = finish(procs, timeout=90)
    took = time.monotonic() - sent
    print(f"both ended {took:.1f} s after SIGTERM")
    expected = {"epoch": 2, "steps": preemption.AGREE_EVERY}
    for p, r in enumerate(results):
        assert r.returncode == 143, r.output[-2000:]
        record = status.read(tmp_path / f"status-{p}.json")
        assert record["status"] == "terminated" and record["exit"] == 143
        assert record["checkpoint"] == expected, record
        done = [ln for ln in r.output.splitlines() if "epoch 2 step" in ln]
        assert done[-1].endswith(f"step {preemption.AGREE_EVERY} done")  # none lost
    assert took < preemption.SAVE_GRACE_S + 10
    assert checkpoints.partial_steps(ckpt, 2) == preemption.AGREE_EVERY

    results = finish(start_cluster([*args, "--resume"]), timeout=240)
    assert_ok(results)
    assert (
        f"Resuming {ckpt} after epoch 1 and {preemption.AGREE_EVERY} steps of epoch 2"
        in results[0].output
    )
    rows = json.loads((tmp_path / "out" / "history.json").read_text())
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    total = 3 * steps_per_epoch
    schedule = keras.optimizers.schedules.CosineDecay(2e-3, total, alpha=0.01)
    expected_lr = float(keras.ops.convert_to_numpy(schedule(2 * steps_per_epoch)))
    assert rows[1]["learning_rate"] == pytest.approx(expected_lr, rel=1e-5)
