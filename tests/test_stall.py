"""training/supervisor/stall.py: the stall bound, and real hangs ended within
it (one process on every backend; two jax processes, all alive, in
tests/test_multiprocess.py)."""

from __future__ import annotations

import json
import threading
import time

import faults
import pytest
from processes import finish, mlp_args, start_script, wait_for_line

from training import cli, mnist
from training.supervisor import stall, status


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.mark.any_backend
def test_the_bound_follows_the_slowest_wait_of_each_phase():
    bounds = stall.Bounds()
    assert bounds.bound("train") == stall.FIRST_ALLOWANCE_S  # compiles first
    bounds.seen("train", 30.0)  # the compiling step
    assert bounds.bound("train") == 5 * 30.0
    assert bounds.bound("validation") == stall.FIRST_ALLOWANCE_S
    bounds.seen("validation", 0.5)
    assert bounds.bound("validation") == stall.FLOOR_S
    assert "slowest validation wait so far, 0.50 s" in bounds.explain("validation")
    fixed = stall.Bounds(fixed=7.0)
    assert fixed.bound("train") == fixed.bound("epoch-end") == 7.0


class Alive:
    def is_alive(self):
        return True


def watchdog(bounds):
    """A watchdog without its thread (check() is called by hand)."""
    clock = Clock()
    dog = stall.StallWatchdog(bounds, clock=clock)
    dog._thread = Alive()
    return dog, clock


@pytest.mark.any_backend
def test_steps_keep_it_quiet_and_a_stop_is_named():
    dog, clock = watchdog(stall.Bounds(floor=2.0, factor=5.0, first=50.0))
    dog.on_train_begin()
    dog.on_epoch_begin(0)
    clock.now += 40  # the first step compiles: within the first allowance
    assert dog.check(clock.now) is None
    dog.on_train_batch_end(0)
    for step in range(1, 4):
        clock.now += 0.1
        dog.on_train_batch_end(step)
    # slowest train wait: 40 s (the compile) -> bound 200 s
    clock.now += 199
    assert dog.check(clock.now) is None
    clock.now += 2
    why = dog.check(clock.now)
    assert why.startswith("stalled: no training progress for 201 s in train ")
    assert "(epoch 1, after step 4); the bound is 200 s" in why
    assert dog.details == {
        "phase": "train",
        "epoch": 1,
        "step": 4,
        "waited_s": 201.0,
        "bound_s": 200.0,
    }
    dog.on_train_end()
    assert dog.check(clock.now + 1000) is None  # off outside training


@pytest.mark.any_backend
def test_a_late_step_of_another_phase_only_counts_as_progress():
    """Keras may report a training step's end from its worker threads after
    validation began: that wait is not validation's first (compiling) one."""
    dog, clock = watchdog(stall.Bounds(floor=1.0, factor=5.0, first=50.0))
    dog.on_train_begin()
    dog.on_epoch_begin(0)
    clock.now += 1
    dog.on_train_batch_end(0)
    dog.on_test_begin()
    clock.now += 0.01
    dog.on_train_batch_end(1)  # late
    assert "validation" not in dog.bounds.slowest
    clock.now += 30  # validation compiles
    assert dog.check(clock.now) is None


@pytest.mark.any_backend
def test_the_thread_ends_the_process_with_75_and_a_status(tmp_path, capsys):
    reporter = status.Reporter(str(tmp_path / "status-{process}.json"), 1, 2)
    codes, told = [], []
    dog = stall.StallWatchdog(
        stall.Bounds(fixed=0.3),
        process_index=1,
        process_count=2,
        report=reporter.report,
        on_stall=told.append,
        exit=codes.append,
    )
    start = time.monotonic()
    dog.on_train_begin()
    dog._thread.join(5)
    took = time.monotonic() - start
    assert codes == [status.EXIT_STALLED]
    assert 0.3 < took < 2.0
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("mnist.py: error: process 1 of 2: stalled: no training")
    assert told and told[0].startswith("stalled: ")
    record = status.read(tmp_path / "status-1.json")
    assert record["status"] == "stalled" and record["exit"] == 75
    assert record["process"] == 1 and record["processes"] == 2
    assert record["bound_s"] == 0.3 and record["phase"] == "start"


@pytest.mark.any_backend
@pytest.mark.parametrize(
    ("raw", "bound"), [("auto", None), ("0", -1.0), ("12.5", 12.5)]
)
def test_stall_timeout_values(raw, bound):
    args = cli.parse_args(["--stall-timeout", raw])
    assert args.stall_bound == bound


@pytest.mark.any_backend
@pytest.mark.parametrize("raw", ["-1", "soon", "nan"])
def test_bad_stall_timeouts_are_usage_errors(raw):
    with pytest.raises(cli.UsageError, match="--stall-timeout must be auto"):
        cli.parse_args(["--stall-timeout", raw])


#: The bound of the hang tests (s), and the most they may take beyond it.
BOUND, SLACK = 6, 4


def test_a_hanging_callback_ends_the_run_within_the_bound(mnist_dir, tmp_path):
    """The process is alive and its training thread sleeps in an epoch-end
    callback: the watchdog ends it with status 75 and its status file, the
    bound after the epoch's end."""
    out = tmp_path / "out"
    args = mlp_args(mnist_dir, out, 2, "--stall-timeout", str(BOUND))
    proc = start_script([*args, *faults.spec("hang_after(1)")], {})
    line = wait_for_line(proc, "faults: hang after epoch 1", timeout=240)[-1]
    # From the end of the epoch's validation, where the epoch-end wait begins
    # (the best checkpoint and the backup are written before the hang).
    hung = float(line.split("at monotonic ")[1])
    (result,) = finish([proc], timeout=60)
    took = time.monotonic() - hung
    print(f"after the hang, bound {BOUND} s: ended at {took:.1f} s")
    assert result.returncode == status.EXIT_STALLED, result.output[-2000:]
    assert BOUND - 1 < took < BOUND + SLACK
    errors = [ln for ln in result.output.splitlines() if "error:" in ln]
    assert len(errors) == 1 and errors[0].startswith(
        "mnist.py: error: process 0 of 1: stalled: no training progress for "
    )
    record = json.loads((out / "status.json").read_text())
    assert record["status"] == "stalled" and record["exit"] == 75
    assert record["phase"] == "epoch-end" and record["epoch"] == 1
    assert record["bound_s"] == BOUND


def test_a_run_that_raises_leaves_no_watchdog_running(mnist_dir, tmp_path):
    """Keras skips on_train_end when a callback raises: the script stops the
    watchdog itself (else it would end the caller's process later). (A run
    that finishes says `ok`: tests/test_mnist_cli.py, test_script_end_to_end.)"""
    out = tmp_path / "out"
    args = mlp_args(mnist_dir, out, 2, "--verbose", "0", *faults.spec("fail_after(1)"))
    with pytest.raises(RuntimeError, match="raised after epoch 1"):
        mnist.main(args)
    time.sleep(1.5)  # the threads' poll intervals
    names = {t.name for t in threading.enumerate() if t.is_alive()}
    assert not names & {"synann-stall", "synann-signals"}
    record = json.loads((out / "status.json").read_text())
    assert record["status"] == "failed" and record["exit"] == 1
    assert record["message"].startswith("RuntimeError: faults.fail_after raised")
