"""The `fit` of one run: its callbacks, the state they carry over from the
completed epochs (training/resume.py), and the epochs left to train.

The callbacks, in order (training/callbacks.py, Keras's own, the user's):

1. the stall watchdog (first: its epoch-end phase covers the others'
   epoch-end work; training/supervisor/stall.py);
2. ReduceLROnPlateau with --schedule plateau;
3. EpochLog: history rows, history.csv/json after every epoch (the chief);
4. BestWeights: the best epoch's weights in memory, with --checkpoint-dir or
   several jax processes (every process holds them);
5. SaveCheckpoint with --checkpoint-dir: every epoch's state, and the partial
   epoch when the run is asked to stop (every process together);
6. on the chief: ModelCheckpoint (best.keras) and BackupAndRestore
   (OUTPUT_DIR/backup) when the best epoch is not kept in memory, and
   TensorBoard with --tensorboard;
7. --callbacks, the user's.
"""

from __future__ import annotations

from pathlib import Path

import keras

from training import callbacks, checkpoints, resume


class Fitting:
    """See the module docstring: built after the model (it restores the
    completed epochs into it), then `fit`, then `best_model`."""

    def __init__(self, args, strategy, supervisor, model, out: Path, start):
        self.args, self.strategy, self.supervisor = args, strategy, supervisor
        self.out, self.start = out, start
        self.checkpointer = None
        if args.checkpoint_dir:
            self.checkpointer = checkpoints.Checkpointer(args.checkpoint_dir)
        restored = resume.restore(model, start, out, strategy, self.checkpointer)
        self.rows = restored.rows
        self.best = restored.best
        several_jax = strategy.backend == "jax" and strategy.process_count > 1
        if self.best is None and (args.checkpoint_dir or several_jax):
            self.best = callbacks.BestWeights()
        self.callbacks = self._callbacks(restored.plateau)

    def _callbacks(self, plateau_start) -> list:
        args, strategy, chief = self.args, self.strategy, self.strategy.is_chief
        found = [self.supervisor.stall_watchdog(args.stall_bound)]
        plateau = None
        if args.schedule == "plateau":
            plateau = keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss", factor=0.2, patience=5, min_lr=1e-5
            )
        found += [plateau, callbacks.EpochLog(self.out, self.rows, write=chief)]
        found.append(self.best)
        if self.checkpointer is not None:
            save = callbacks.SaveCheckpoint(
                self.checkpointer,
                self.rows,
                self.best,
                plateau=plateau,
                plateau_start=plateau_start,
                settings=settings(args),
                processes=strategy.process_count,
                stop_request=self.supervisor.stop,
            )
            save.step_offset = self.start.steps
            found.append(save)
        if chief and self.best is None:
            best_so_far = max(
                (row.get("val_accuracy", -1.0) for row in self.rows), default=None
            )
            found += [
                keras.callbacks.ModelCheckpoint(
                    str(self.out / "best.keras"),
                    monitor="val_accuracy",
                    mode="max",
                    save_best_only=True,
                    initial_value_threshold=best_so_far,
                ),
                keras.callbacks.BackupAndRestore(
                    str(self.out / "backup"), delete_checkpoint=False
                ),
            ]
        if chief and args.tensorboard:
            if keras.backend.backend() == "tensorflow":
                found.append(keras.callbacks.TensorBoard(args.tensorboard))
            else:  # no TensorFlow needed: tensorboard's own writer
                found.append(callbacks.EventFileTensorBoard(args.tensorboard))
        for spec in args.callbacks:
            found += callbacks.load(spec)
        return [c for c in found if c is not None]

    def fit(self, model, splits, steps_per_epoch: int) -> None:
        """Train the epochs left: a partial epoch first (its remaining steps),
        then the others."""
        args, first = self.args, self.start.epoch
        fits = []
        if self.start.steps:
            fits.append((first, first + 1, steps_per_epoch - self.start.steps))
            first += 1
        if first < args.epochs or not fits:
            fits.append((first, args.epochs, None))
        try:
            for initial, last, steps in fits:
                self.strategy.fit(
                    model,
                    splits.x_train,
                    splits.y_train,
                    batch_size=args.batch_size,
                    epochs=last,
                    validation_data=(splits.x_val, splits.y_val),
                    callbacks=self.callbacks,
                    initial_epoch=initial,
                    verbose=args.verbose,
                    **({"steps_per_epoch": steps} if steps else {}),
                )
        finally:
            self.supervisor.training_ended()
            if self.checkpointer is not None:
                self.checkpointer.close()

    def best_model(self, model):
        """The model to report (every process): the best epoch's weights."""
        if self.best is not None:
            return self.strategy.restore_best(model, weights=self.best.weights)
        return self.strategy.restore_best(model, self.out / "best.keras")


def settings(args) -> dict:
    """The run's settings, recorded in each checkpoint."""
    keys = ("model", "epochs", "batch_size", "learning_rate", "schedule", "seed")
    keys += ("optimizer", "momentum", "filters", "dropout")
    return {k: getattr(args, k) for k in keys} | {"synapse": not args.dense_baseline}
