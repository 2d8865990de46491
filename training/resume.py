"""What a run continues from (--resume), and restoring it.

Two places hold a run's state (docs/training.md, "Checkpoints and resuming"):

- --checkpoint-dir (jax, any number of processes): every epoch's complete
  state (training/checkpoints.py), and a partial epoch saved when the run was
  asked to stop;
- OUTPUT_DIR/backup (one process): Keras's BackupAndRestore, which Keras
  itself restores inside `fit`; history.json holds the epochs' rows.

`start()` decides where the run starts, before the data and the model (the
seed of a resumed run depends on it); `restore()` then loads the state into
the built model. A run without --resume starts at epoch 1: it removes an old
backup and refuses a --checkpoint-dir that holds epochs.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from training import callbacks, checkpoints, outputs
from training.cli import UsageError


@dataclass
class Start:
    """Where a run starts: after `epoch` completed epochs and `steps` steps of
    the next one (a partial checkpoint)."""

    epoch: int = 0
    steps: int = 0


@dataclass
class Restored:
    """The state of the completed epochs: history rows, the best epoch (in
    memory when the run keeps it there) and ReduceLROnPlateau's counters."""

    rows: list[dict] = field(default_factory=list)
    best: callbacks.BestWeights | None = None
    plateau: dict | None = None


def start(args, strategy, out: Path) -> Start:
    """The completed epochs the run continues after and the steps of the next
    epoch already done: with --resume, the last complete checkpoint in
    --checkpoint-dir (and a partial one after it), else the backup in
    --output-dir (one process). Says what it found."""
    if strategy.is_chief and not args.resume and (out / "backup").exists():
        shutil.rmtree(out / "backup")  # a fresh run must not restore an old state
    epoch = _completed(args, strategy, out)
    steps = 0
    if args.checkpoint_dir and args.resume and epoch < args.epochs:
        steps = checkpoints.partial_steps(args.checkpoint_dir, epoch + 1)
        steps = strategy.agree(steps)
    if steps:
        print(
            f"Resuming {args.checkpoint_dir} after epoch {epoch} and {steps} steps "
            f"of epoch {epoch + 1} (saved when a run was stopped)."
        )
    return Start(epoch, steps)


def restore(model, start: Start, out: Path, strategy, checkpointer) -> Restored:
    """The state of the epochs before `start`, loaded into `model` (in the
    strategy's scope) from `checkpointer` when there is one; else the history
    rows of OUTPUT_DIR (Keras restores the backup itself)."""
    if checkpointer is None:
        rows = outputs.read_history(out) if start.epoch else []
        return Restored(rows=[r for r in rows if r["epoch"] <= start.epoch])
    if not (start.epoch or start.steps):
        return Restored()
    with strategy.scope():
        if start.steps:  # `steps` steps into the next epoch
            saved, weights = checkpointer.restore(model, start.epoch + 1, partial=True)
        else:
            saved, weights = checkpointer.restore(model, start.epoch)
    return Restored(
        rows=[row for row in saved.history if row["epoch"] <= start.epoch],
        best=callbacks.BestWeights(
            epoch=saved.best_epoch, value=saved.best_value, weights=weights
        ),
        plateau=saved.plateau,
    )


def backup_epoch(backup_dir: Path) -> int:
    """The number of completed epochs a Keras backup holds (0 if none)."""
    path = backup_dir / "training_metadata.json"
    return int(json.loads(path.read_text())["epoch"]) if path.is_file() else 0


def _completed(args, strategy, out: Path) -> int:
    if args.checkpoint_dir:
        done = checkpoints.completed_epochs(args.checkpoint_dir)
        if not args.resume:
            if done:
                raise UsageError(
                    f"--checkpoint-dir {args.checkpoint_dir} already holds epochs "
                    f"up to {done[-1]} of a run; pass --resume to continue it, or "
                    "choose an empty directory"
                )
            return 0
        where, epoch = args.checkpoint_dir, strategy.agree(done[-1] if done else 0)
    elif not args.resume:
        return 0
    elif strategy.backend == "jax" and strategy.process_count > 1:
        print(
            f"Nothing to resume in {out}: with {strategy.process_count} processes "
            "--resume continues only from --checkpoint-dir; starting at epoch 1."
        )
        return 0
    else:
        where, epoch = out, backup_epoch(out / "backup")
    if epoch > args.epochs:
        raise UsageError(
            f"{where} already holds {epoch} epochs; --epochs {args.epochs} is fewer"
        )
    partial = args.checkpoint_dir and checkpoints.partial_steps(args.checkpoint_dir, 1)
    if epoch == 0 and not partial:
        print(
            f"Nothing to resume in {where} (no completed epoch); starting at epoch 1."
        )
    elif epoch:
        print(f"Resuming {where} after epoch {epoch} of {args.epochs}.")
    return epoch
