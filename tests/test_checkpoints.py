"""training/checkpoints.py and training/mnist.py --checkpoint-dir in one process
(several processes: tests/test_multiprocess.py)."""

from __future__ import annotations

import importlib.util
import json
import shutil

import faults
import keras
import pytest

from training import callbacks, checkpoints, mnist

JAX = keras.backend.backend() == "jax"
jax_only = pytest.mark.skipif(
    not JAX or importlib.util.find_spec("orbax") is None,
    reason="--checkpoint-dir needs jax and orbax-checkpoint (the checkpoint extra)",
)


def _args(mnist_dir, out, ckpt, *extra):
    return [
        "--model", "mlp", "--data-dir", str(mnist_dir), "--output-dir", str(out),
        "--val-size", "16", "--batch-size", "16", "--verbose", "0",
        "--checkpoint-dir", str(ckpt), *extra,
    ]  # fmt: skip


def _epoch_dir(root, name, commit=True, meta=True):
    step = root / name
    (step / "meta").mkdir(parents=True)
    if meta:
        (step / "meta" / "metadata").write_text("{}")
    if commit:
        (step / checkpoints.COMMIT_FILE).write_text("")


@pytest.mark.any_backend
def test_completed_epochs_only_counts_complete_checkpoints(tmp_path):
    root = tmp_path / "ckpt"
    assert checkpoints.completed_epochs(str(root)) == []  # no directory yet
    _epoch_dir(root, "2")
    _epoch_dir(root, "10")
    _epoch_dir(root, "11", commit=False)  # being written (gs://) or cut short
    _epoch_dir(root, "12", meta=False)
    _epoch_dir(root, "13.orbax-checkpoint-tmp-1700000000")  # being written
    _epoch_dir(root, "0")
    _epoch_dir(root, "best")
    (root / "3").write_text("not a directory")
    assert checkpoints.completed_epochs(str(root)) == [2, 10]


@pytest.mark.any_backend
def test_saved_round_trip_and_format_check():
    saved = checkpoints.Saved(epoch=2, history=[{"epoch": 1}, {"epoch": 2}])
    assert checkpoints.Saved.from_json(saved.to_json()) == saved
    with pytest.raises(checkpoints.CheckpointError, match="format 99"):
        checkpoints.Saved.from_json({**saved.to_json(), "format": 99})


@pytest.mark.any_backend
def test_plateau_counters_survive_a_resume():
    """SaveCheckpoint restores ReduceLROnPlateau's counters after that
    callback's own on_train_begin has reset them."""
    plateau = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", patience=5)
    plateau.wait, plateau.cooldown_counter, plateau.best = 3, 1, 0.25
    state = callbacks.plateau_state(plateau)
    assert state == {"wait": 3, "cooldown_counter": 1, "best": 0.25}
    fresh = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", patience=5)
    save = callbacks.SaveCheckpoint(
        None, [], callbacks.BestWeights(), plateau=fresh, plateau_start=state
    )
    keras.callbacks.CallbackList([fresh, save]).on_train_begin()
    assert callbacks.plateau_state(fresh) == state
    empty = keras.callbacks.ReduceLROnPlateau()
    keras.callbacks.CallbackList([empty]).on_train_begin()
    assert callbacks.plateau_state(empty)["best"] is None  # inf is not JSON


@jax_only
def test_resume_from_the_checkpoint_dir_when_the_output_dir_is_gone(
    mnist_dir, tmp_path
):
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    args = _args(mnist_dir, out, ckpt, "--epochs", "3", "--schedule", "plateau")
    with pytest.raises(RuntimeError, match="raised after epoch 2"):
        mnist.main([*args, *faults.spec("fail_after(2)")])
    assert checkpoints.completed_epochs(str(ckpt)) == [1, 2]
    first_two = checkpoints.read_saved(str(ckpt), 2).history
    shutil.rmtree(out)  # the first attempt's machine is gone

    assert mnist.main([*args, "--resume"]) == 0
    rows = json.loads((out / "history.json").read_text())
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert rows[:2] == first_two
    metrics = json.loads((out / "metrics.json").read_text())
    best = max(rows, key=lambda r: r["val_accuracy"])["epoch"]
    assert metrics["best_epoch"] == best and metrics["epochs"] == 3
    assert (out / "best.keras").is_file()
    assert checkpoints.completed_epochs(str(ckpt)) == [2, 3]

    # Resuming a finished run trains nothing more and reports the same run.
    assert mnist.main([*args, "--resume"]) == 0
    assert json.loads((out / "history.json").read_text()) == rows


@jax_only
def test_resume_with_an_empty_checkpoint_dir_starts_at_epoch_one(
    mnist_dir, tmp_path, capsys
):
    ckpt = tmp_path / "ckpt"
    args = _args(mnist_dir, tmp_path / "out", ckpt, "--epochs", "1", "--resume")
    assert mnist.main(args) == 0
    printed = capsys.readouterr().out
    assert f"Nothing to resume in {ckpt} (no completed epoch); starting at epoch 1" in (
        printed
    )
    assert checkpoints.completed_epochs(str(ckpt)) == [1]


@jax_only
def test_a_fresh_run_does_not_overwrite_a_checkpoint_dir(mnist_dir, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    args = _args(mnist_dir, tmp_path / "out", ckpt, "--epochs", "1")
    assert mnist.main(args) == 0
    capsys.readouterr()
    assert mnist.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --resume to continue it" in err


@pytest.mark.skipif(JAX, reason="the other backends refuse --checkpoint-dir")
def test_checkpoint_dir_needs_jax(mnist_dir, tmp_path, capsys):
    args = _args(mnist_dir, tmp_path / "out", tmp_path / "ckpt", "--epochs", "1")
    assert mnist.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--checkpoint-dir needs the jax backend" in err
