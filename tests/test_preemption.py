"""training/supervisor/preemption.py and status.py: SIGTERM is recorded as a stop
(with what the metadata server says), not a failure, and with
--checkpoint-dir the steps done since the last epoch are saved so that
--resume loses at most the step in flight."""

from __future__ import annotations

import http.server
import importlib.util
import json
import signal
import socket
import threading
import time

import faults
import keras
import pytest
from conftest import write_mnist
from processes import finish, mlp_args, start_script, wait_for_line

from training import checkpoints
from training.supervisor import preemption, status

JAX = keras.backend.backend() == "jax"


@pytest.fixture
def metadata_server(monkeypatch):
    """A stand-in for the metadata server on 127.0.0.1: answers
    `server.answer` after `server.delay` seconds and records the headers;
    status.METADATA_PREEMPTED_URL points at it."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            server.requests.append((self.path, dict(self.headers)))
            time.sleep(server.delay)
            body = server.answer.encode()
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/text")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:  # the client gave up waiting (the slow case)
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.answer, server.delay, server.requests = "TRUE", 0.0, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/computeMetadata/v1/instance/preempted"
    monkeypatch.setattr(status, "METADATA_PREEMPTED_URL", url)
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.any_backend
@pytest.mark.parametrize(("answer", "expected"), [("TRUE", True), ("FALSE", False)])
def test_the_metadata_servers_answer(metadata_server, answer, expected):
    metadata_server.answer = answer
    assert status.preempted() is expected
    ((path, headers),) = metadata_server.requests
    assert path == "/computeMetadata/v1/instance/preempted"
    assert headers.get("Metadata-Flavor") == "Google"


@pytest.mark.any_backend
def test_a_slow_or_absent_metadata_server_is_no_answer(metadata_server, monkeypatch):
    metadata_server.delay = 5.0
    start = time.monotonic()
    assert status.preempted(timeout=0.3) is None
    assert time.monotonic() - start < 1.5
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/"
    monkeypatch.setattr(status, "METADATA_PREEMPTED_URL", closed)
    start = time.monotonic()
    assert status.preempted() is None
    assert time.monotonic() - start < 2.0
    metadata_server.delay, metadata_server.answer = 0.0, "maybe"
    assert status.preempted(metadata_server_url(metadata_server)) is None


def metadata_server_url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/"


@pytest.mark.any_backend
def test_a_signal_while_training_waits_for_the_partial_save(metadata_server, tmp_path):
    """on_signal asks the training loop (here a thread standing in for
    SaveCheckpoint) to save, and reports what it saved."""
    reporter = status.Reporter(str(tmp_path / "status-{process}.json"))
    request = preemption.StopRequest()
    request.active = True

    def training_loop():
        request.requested.wait(5)
        request.answer({"epoch": 2, "steps": 7})

    threading.Thread(target=training_loop, daemon=True).start()
    message, code = preemption.on_signal(
        signal.SIGTERM, request, reporter.report, grace=5
    )
    assert code == status.EXIT_SIGTERM
    assert message == (
        "ended by SIGTERM (the metadata server says this VM was preempted); "
        "saved epoch 2 up to step 7 (--resume continues after it)"
    )
    record = status.read(tmp_path / "status-0.json")
    assert record["status"] == "preempted" and record["exit"] == 143
    assert record["preempted"] is True
    assert record["checkpoint"] == {"epoch": 2, "steps": 7}


@pytest.mark.any_backend
def test_a_loop_that_never_reaches_a_step_is_waited_for_no_longer_than_the_grace(
    metadata_server, tmp_path
):
    metadata_server.answer = "FALSE"
    reporter = status.Reporter(str(tmp_path / "s-{process}.json"))
    request = preemption.StopRequest()
    request.active = True
    start = time.monotonic()
    message, code = preemption.on_signal(
        signal.SIGINT, request, reporter.report, grace=0.5
    )
    assert time.monotonic() - start < 2.5
    assert code == status.EXIT_SIGINT
    record = status.read(tmp_path / "s-0.json")
    assert (record["status"], record["preempted"]) == ("terminated", False)
    assert record["checkpoint"] is None
    assert "training reached no step boundary" in record["checkpoint_note"]


@pytest.mark.any_backend
def test_the_first_report_wins(tmp_path):
    reporter = status.Reporter(str(tmp_path / "st-{process}.json"), 3, 4)
    assert reporter.report("stalled", 75, "stalled:\n  no progress", epoch=2)
    assert not reporter.report("failed", 1, "later")
    record = status.read(tmp_path / "st-3.json")
    assert record["status"] == "stalled" and record["message"] == (
        "stalled: no progress"
    )
    assert (record["process"], record["processes"], record["epoch"]) == (3, 4, 2)
    assert list(tmp_path.iterdir()) == [tmp_path / "st-3.json"]  # no temp file


def test_sigterm_is_a_stop_not_a_failure(mnist_dir, tmp_path):
    """Any backend, no --checkpoint-dir: status 143 and `terminated` (no
    metadata server here: preempted is null), within seconds."""
    out = tmp_path / "out"
    proc = start_script(
        mlp_args(mnist_dir, out, 3, *faults.spec("slow_steps(0.2)")), {}
    )
    wait_for_line(proc, "faults: epoch 2 step 1 done", timeout=240)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    (result,) = finish([proc], timeout=60)
    assert result.returncode == 143, result.output[-2000:]
    assert time.monotonic() - sent < 10
    record = json.loads((out / "status.json").read_text())
    assert (record["status"], record["exit"], record["preempted"]) == (
        "terminated",
        143,
        None,
    )
    assert "checkpoint" not in record
    assert "mnist.py: error: process 0 of 1: ended by SIGTERM" in result.output


STEPS = 10  # training steps per epoch in the test below (160 samples / 16)


@pytest.mark.skipif(
    not JAX or importlib.util.find_spec("orbax") is None,
    reason="--checkpoint-dir needs jax and orbax-checkpoint (the checkpoint extra)",
)
def test_sigterm_mid_epoch_saves_the_steps_and_resume_continues_after_them(tmp_path):
    data_dir = write_mnist(tmp_path / "mnist", n_train=176)  # 160 train + 16 val
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    args = mlp_args(data_dir, out, 3, "--checkpoint-dir", str(ckpt))
    proc = start_script([*args, *faults.spec("slow_steps(0.3)")], {})
    lines = wait_for_line(proc, "epoch 2 step 3 done", timeout=240)
    proc.send_signal(signal.SIGTERM)
    (result,) = finish([proc], timeout=60)
    assert result.returncode == 143, result.output[-2000:]
    done = [ln for ln in (*lines, *result.output.splitlines()) if "epoch 2 step" in ln]
    steps_done = int(done[-1].split()[4])  # the last step completed at exit
    record = json.loads((out / "status.json").read_text())
    assert record["status"] == "terminated" and record["exit"] == 143
    saved = record["checkpoint"]
    assert saved["epoch"] == 2 and 3 <= saved["steps"] < STEPS
    assert steps_done - saved["steps"] <= 1  # at most the step in flight
    print(f"SIGTERM after step 3; saved {saved['steps']}, done {steps_done}")
    assert checkpoints.completed_epochs(str(ckpt)) == [1]
    assert checkpoints.partial_steps(str(ckpt), 2) == saved["steps"]

    (resumed,) = finish([start_script([*args, "--resume"], {})], timeout=240)
    assert resumed.returncode == 0, resumed.output[-2000:]
    assert (
        f"Resuming {ckpt} after epoch 1 and {saved['steps']} steps of epoch 2"
        in resumed.output
    )
    rows = json.loads((out / "history.json").read_text())
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    # The cosine schedule runs on the optimizer's step count: after epoch 2
    # it is exactly 2 x STEPS (no step lost or repeated, the partial epoch
    # restored with its optimizer state).
    schedule = keras.optimizers.schedules.CosineDecay(2e-3, 3 * STEPS, alpha=0.01)
    for row, steps in ((rows[1], 2 * STEPS), (rows[2], 3 * STEPS)):
        expected = float(keras.ops.convert_to_numpy(schedule(steps)))
        assert row["learning_rate"] == pytest.approx(expected, rel=1e-5)
    assert checkpoints.completed_epochs(str(ckpt)) == [2, 3]
    assert status.read(out / "status.json")["status"] == "ok"
