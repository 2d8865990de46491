"""training/distribute: name checks, and 1 vs several devices per backend.

Multi-device runs happen in subprocesses (tests/distributed_worker.py) whose
environment gives the devices before the backend starts: jax with 4 simulated
CPU devices, tensorflow with 2 logical CPUs under MirroredStrategy, torch with
2 gloo processes under torchrun; the one-device run they are compared with
runs in this process. Each backend's tests run only under that backend, so a
jax or torch test process never imports tensorflow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import distributed_worker
import keras
import numpy as np
import pytest
from conftest import write_mnist
from processes import finish, mlp_args, start_script

from cloud.rehearsal.workers import cluster_env, free_ports
from training import distribute

BACKEND = keras.backend.backend()
WORKER = Path(__file__).with_name("distributed_worker.py")
# Same global batch and seed on 1 and on N devices: the final validation
# accuracies must agree this closely (jax and tensorflow agree to float noise;
# torch DDP shuffles differently from model.fit, so only within noise).
ACCURACY_TOLERANCE = 0.04
# Epochs 1..3 of 4: each run trains 3 epochs and must honour initial_epoch.
WORKER_ARGS = ["--epochs", "4", "--initial-epoch", "1"]

only = {
    name: pytest.mark.skipif(BACKEND != name, reason=f"{name} backend only")
    for name in ("jax", "tensorflow", "torch")
}


def run_worker(args: list[str], env: dict[str, str], launcher=()) -> dict:
    """Run the worker (optionally under a launcher) and parse its RESULT line."""
    full_env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("XLA_FLAGS", distribute.ENV_TF_LOGICAL_CPUS, "WORLD_SIZE")
    }
    full_env.update(
        KERAS_BACKEND=BACKEND, TF_CPP_MIN_LOG_LEVEL="3", OMP_NUM_THREADS="1", **env
    )
    command = [sys.executable, *launcher, str(WORKER), *args, *WORKER_ARGS]
    proc = subprocess.run(
        command, env=full_env, capture_output=True, text=True, timeout=300
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def run_here(name: str = "default") -> dict:
    """The worker's run in this process, with WORKER_ARGS's epochs."""
    return distributed_worker.run(name, epochs=4, initial_epoch=1)


def assert_parity(single: dict, multi: dict, replicas: int) -> None:
    assert single["num_replicas"] == 1
    assert multi["num_replicas"] == replicas == len(multi["devices"])
    assert single["epochs_run"] == multi["epochs_run"] == [1, 2, 3]
    acc_1 = single["history"]["val_accuracy"][-1]
    acc_n = multi["history"]["val_accuracy"][-1]
    assert acc_1 > 0.8, single["history"]  # it learned something
    assert abs(acc_1 - acc_n) <= ACCURACY_TOLERANCE, (acc_1, acc_n)
    for result in (single, multi):
        accuracy = result["history"]["val_accuracy"][-1]
        assert result["evaluation"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
        assert result["predict_accuracy"] == pytest.approx(accuracy, abs=1e-6)
        assert result["predict_small_matches"]


# ----------------------------------------------------------------------------
# Names and small pieces (every backend)


def test_unknown_name():
    with pytest.raises(ValueError, match="Unknown distribution 'nccl'"):
        distribute.resolve("nccl")


def test_name_of_another_backend():
    other = {"jax": "mirrored", "tensorflow": "ddp", "torch": "data_parallel"}
    with pytest.raises(ValueError, match=f"does not run on the {BACKEND} backend"):
        distribute.resolve(other.get(BACKEND, "ddp"))


def test_default_is_one_device():
    strategy = distribute.resolve("default")
    assert (strategy.name, strategy.backend) == ("default", BACKEND)
    assert strategy.num_replicas == 1 and strategy.is_chief


@pytest.mark.any_backend
def test_global_batch_must_split_over_replicas():
    strategy = distribute.JaxDataParallel("data_parallel", "jax", ["cpu:0"] * 4)
    with pytest.raises(ValueError, match="multiple of the 4 replicas"):
        strategy.fit(
            None,
            np.zeros((8, 2)),
            np.zeros(8),
            batch_size=30,
            epochs=1,
            validation_data=None,
            callbacks=[],
        )


@pytest.mark.any_backend
def test_trim_drops_the_remainder_with_a_warning(recwarn):
    x, y = np.arange(10), np.arange(10) * 2
    with pytest.warns(UserWarning, match="last 2 of 10"):
        tx, ty = distribute.trim((x, y), 4, "training")
    np.testing.assert_array_equal(tx, x[:8])
    np.testing.assert_array_equal(ty, y[:8])
    recwarn.clear()
    kept = distribute.trim((x[:8], y[:8]), 4, "training")  # already even
    assert not recwarn.list
    np.testing.assert_array_equal(kept[0], x[:8])
    np.testing.assert_array_equal(kept[1], y[:8])


@pytest.mark.any_backend
@pytest.mark.parametrize("shuffle", [False, True])
def test_global_batches_do_not_depend_on_the_process_count(shuffle):
    """Stacking every process's part of step k gives one process's step k."""
    x = np.arange(100, dtype="float32")[:, None] * [1.0, -1.0]
    y = np.arange(100)

    def batches(processes, index):
        keras.utils.set_random_seed(7)  # as every process does
        data = distribute.GlobalBatches(
            x, y, 16, 4, process_index=index, process_count=processes, shuffle=shuffle
        )
        epochs = []
        for _ in range(2):
            epochs.append([data[k] for k in range(len(data))])
            data.on_epoch_end()
        return epochs

    one = batches(1, 0)
    parts = [batches(2, p) for p in (0, 1)]
    assert len(one[0]) == 7  # ceil(100 / 16); the last batch has 4 samples
    for epoch in range(2):
        for k, (xb, yb) in enumerate(one[epoch]):
            stacked = np.concatenate([parts[p][epoch][k][1] for p in (0, 1)])
            np.testing.assert_array_equal(stacked, yb)
            np.testing.assert_array_equal(xb[:, 0], yb)  # x rows travel with y
            assert len(parts[0][epoch][k][1]) == len(yb) // 2
    seen = np.sort(np.concatenate([yb for _, yb in one[0]]))
    np.testing.assert_array_equal(seen, y)  # every sample once per epoch
    first = [yb for _, yb in one[0]]
    second = [yb for _, yb in one[1]]
    reshuffled = any(
        not np.array_equal(a, b) for a, b in zip(first, second, strict=True)
    )
    assert reshuffled == shuffle


@pytest.mark.any_backend
@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, False),
        ({"SYNANN_MULTIHOST": "1"}, True),
        ({"SYNANN_MULTIHOST": "0", "KERAS_DISTRIBUTION_NUM_PROCESSES": "4"}, False),
        ({"KERAS_DISTRIBUTION_NUM_PROCESSES": "2"}, True),
        ({"KERAS_DISTRIBUTION_NUM_PROCESSES": "1"}, False),
        ({"KERAS_DISTRIBUTION_JOB_ADDRESSES": "10.0.0.1:1,10.0.0.2:1"}, True),
        ({"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1"}, True),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),
        ({"MEGASCALE_NUM_SLICES": "2"}, True),
    ],
)
def test_jax_multihost_detection(monkeypatch, env, expected):
    for key in (
        "SYNANN_MULTIHOST",
        "KERAS_DISTRIBUTION_NUM_PROCESSES",
        "KERAS_DISTRIBUTION_JOB_ADDRESSES",
        "TPU_WORKER_HOSTNAMES",
        "TPU_PROCESS_ADDRESSES",
        "MEGASCALE_NUM_SLICES",
    ):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert distribute.jax.multihost_requested() is expected


# ----------------------------------------------------------------------------
# jax


@only["jax"]
def test_jax_resolve_on_one_device():
    import jax

    if len(jax.devices()) > 1:
        pytest.skip("this process already has several jax devices")
    assert distribute.resolve("auto").name == "default"
    with pytest.raises(ValueError, match="'data_parallel' needs more than one"):
        distribute.resolve("data_parallel")


@only["jax"]
def test_jax_data_parallel_matches_one_device():
    single = run_here()
    flags = "--xla_force_host_platform_device_count=4"
    multi = run_worker(["auto"], {"XLA_FLAGS": flags})
    assert multi["name"] == "data_parallel"
    assert multi["devices"] == ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]
    assert not multi["tensorflow_imported"]
    assert_parity(single, multi, 4)
    # The same computation, split 4 ways: equal up to float summation order.
    assert multi["weights_sum"] == pytest.approx(single["weights_sum"], rel=1e-4)


def finish_all(procs, timeout: float = 300) -> list[str]:
    """Wait for every process (killing all at the timeout); their outputs.
    Each must exit 0."""
    results = finish(procs, timeout)
    for r in results:
        assert r.returncode == 0, r.output[-3000:]
    return [r.output for r in results]


def printed_test_accuracy(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.startswith("Test accuracy:")]
    assert len(lines) == 1, output[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def two_jax_processes(tmp_path_factory):
    """1 process x 4 devices, then 2 processes x 2 devices over loopback (one
    cluster, with --resume and nothing to resume): their output directories
    and printed outputs."""
    root = tmp_path_factory.mktemp("two")
    mnist_dir = write_mnist(root / "mnist")
    flags = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    one = root / "one"
    (single,) = finish_all([start_script(mlp_args(mnist_dir, one, 2), flags)])
    ports = free_ports(2)
    procs = [
        start_script(
            [*mlp_args(mnist_dir, root / f"p{i}", 2), "--resume"],
            cluster_env(ports, 2, process=i),
        )
        for i in range(2)
    ]
    return root, single, finish_all(procs)


@only["jax"]
def test_jax_two_processes_train_like_one(two_jax_processes):
    """2 processes x 2 devices over loopback (one cluster) against 1 process x
    4 devices: same global batches, so the same history and test accuracy."""
    tmp_path, single_out, outputs = two_jax_processes
    one = tmp_path / "one"
    metrics = json.loads((tmp_path / "p0" / "metrics.json").read_text())
    single = json.loads((one / "metrics.json").read_text())
    assert metrics["process_count"] == 2 and single["process_count"] == 1
    assert len(metrics["devices"]) == len(set(metrics["devices"])) == 4
    assert metrics["distribution"] == single["distribution"] == "data_parallel"
    assert not (tmp_path / "p1").exists()  # only process 0 writes
    # Every process evaluated and predicted, and printed the same numbers.
    assert printed_test_accuracy(outputs[0]) == printed_test_accuracy(outputs[1])
    assert outputs[0].count("Predicted") == outputs[1].count("Predicted") == 1
    history = json.loads((tmp_path / "p0" / "history.json").read_text())
    history_1 = json.loads((one / "history.json").read_text())
    for row, row_1 in zip(history, history_1, strict=True):
        assert row["val_accuracy"] == row_1["val_accuracy"]
        for key in ("loss", "val_loss", "accuracy"):
            assert row[key] == pytest.approx(row_1[key], rel=1e-5), key
    assert metrics["test_accuracy"] == pytest.approx(single["test_accuracy"])
    assert metrics["test_loss"] == pytest.approx(single["test_loss"], rel=1e-5)
    assert printed_test_accuracy(single_out) == printed_test_accuracy(outputs[0])


@only["jax"]
def test_jax_resume_of_several_processes_without_checkpoint_dir(two_jax_processes):
    """Only --checkpoint-dir holds a state every process can read: without it
    --resume says there is nothing to resume and starts at epoch 1 (so that a
    retry may always pass --resume)."""
    tmp_path, _, outputs = two_jax_processes
    for out in outputs:
        assert "with 2 processes --resume continues only from --checkpoint-dir" in out
    history = json.loads((tmp_path / "p0" / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]


# ----------------------------------------------------------------------------
# tensorflow


@only["tensorflow"]
def test_tensorflow_resolve_errors(monkeypatch):
    monkeypatch.delenv(distribute.ENV_TF_LOGICAL_CPUS, raising=False)
    if distribute.tensorflow.tpu_hint():
        pytest.skip("this machine may have a TPU")
    with pytest.raises(ValueError, match="'tpu' needs a TPU"):
        distribute.resolve("tpu")
    import tensorflow as tf

    if len(tf.config.list_logical_devices("GPU")) < 2:
        with pytest.raises(ValueError, match="'mirrored' needs several GPUs"):
            distribute.resolve("mirrored")
        assert distribute.resolve("auto").name == "default"


@only["tensorflow"]
def test_tensorflow_logical_cpus_value_is_checked(monkeypatch):
    monkeypatch.setenv(distribute.ENV_TF_LOGICAL_CPUS, "two")
    with pytest.raises(ValueError, match="expected a positive integer"):
        distribute.resolve("auto")


@only["tensorflow"]
def test_tensorflow_mirrored_matches_one_device():
    single = run_here()
    multi = run_worker(["auto"], {distribute.ENV_TF_LOGICAL_CPUS: "2"})
    assert multi["name"] == "mirrored"
    assert_parity(single, multi, 2)
    assert multi["weights_sum"] == pytest.approx(single["weights_sum"], rel=1e-4)


# ----------------------------------------------------------------------------
# torch


@only["torch"]
def test_torch_resolve_without_torchrun(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert distribute.resolve("auto").name == "default"
    with pytest.raises(ValueError, match="'ddp' needs several processes"):
        distribute.resolve("ddp")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="missing \\['RANK'"):
        distribute.resolve("ddp")


@only["torch"]
def test_torch_ddp_matches_one_device(tmp_path):
    single = run_here()
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    multi = run_worker(["auto", "--out", str(tmp_path)], {}, launcher=torchrun)
    assert multi["name"] == "ddp"
    assert multi["devices"] == ["cpu:0", "cpu:1"]
    assert not multi["tensorflow_imported"]
    assert_parity(single, multi, 2)
    # Both ranks end with the same weights and the same (all-reduced) logs.
    ranks = multi["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["weights_sum"] == ranks[1]["weights_sum"]
    assert ranks[0]["history"] == ranks[1]["history"]
    # Only the chief ran the file-writing callbacks.
    assert sorted(p.name for p in (tmp_path / "rank0").iterdir()) == [
        "log.csv",
        "m.weights.h5",
    ]
    assert not any((tmp_path / "rank1").iterdir())
    csv = (tmp_path / "rank0" / "log.csv").read_text().splitlines()
    assert csv[0].startswith("epoch") and len(csv) == 4


@only["torch"]
def test_torch_two_nodes_report_the_same_test_accuracy(mnist_dir, tmp_path):
    """Two torchrun launches with --nnodes=2 on loopback, as on two machines
    (each with its own output directory): both ranks train, load the chief's
    best checkpoint and print the same test accuracy; only rank 0 writes."""
    (port,) = free_ports(1)
    procs = [
        start_script(
            mlp_args(mnist_dir, tmp_path / f"node{node}", 2),
            {"OMP_NUM_THREADS": "1"},
            launcher=[
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node_rank={node}",
                "--nproc_per_node=1",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
            ],  # fmt: skip
        )
        for node in range(2)
    ]
    outputs = finish_all(procs)
    assert printed_test_accuracy(outputs[0]) == printed_test_accuracy(outputs[1])
    metrics = json.loads((tmp_path / "node0" / "metrics.json").read_text())
    assert metrics["distribution"] == "ddp" and metrics["process_count"] == 2
    assert f"{metrics['test_accuracy']:.4%}" in printed_test_accuracy(outputs[1])
    assert not (tmp_path / "node1").exists()
