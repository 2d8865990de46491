"""Training state saved at the end of every epoch, by every process together,
so that a run continues (`training/mnist.py --resume --checkpoint-dir DIR`)
after a crash or a preempted TPU with any number of jax processes.

Written with orbax-checkpoint's `CheckpointManager` (jax backend only): every
process takes part in each save and restore, and orbax writes local paths and
`gs://` buckets alike. Layout of DIR:

    DIR/<E>/                 the state after epoch E (E = 1, 2, ...); only the
                             two most recent are kept
        commit_success.txt   written by orbax once every process's part of the
                             checkpoint is on storage: without it the
                             checkpoint is incomplete and ignored (locally orbax
                             also builds it as DIR/<E>.orbax-checkpoint-tmp-*
                             and renames it when done)
        state/               the model's variables (weights, batch-norm
                             statistics, dropout seeds) and the optimizer's
                             (slots, iteration count, learning rate), each a list
                             in Keras's variable order (orbax PyTree)
        best/                the model's variables after the best epoch so far
                             (highest val_accuracy), as NumPy arrays
        meta/metadata        JSON: {"format", "epoch", "history" (one row per
                             epoch 1..E), "best_epoch", "best_value",
                             "plateau" (ReduceLROnPlateau's counters or null),
                             "settings" (model, batch size, ...), "processes"}
        _CHECKPOINT_METADATA orbax's own
    DIR/partial/<E>/         the state K steps into epoch E, saved when the run
                             was asked to stop (SIGTERM, SIGINT;
                             training/preemption.py): the same layout, with
                             "steps": K in the metadata and the history of
                             epochs 1..E-1; only the newest is kept. `--resume`
                             continues from it when E is the epoch after the
                             last complete one, training the epoch's other
                             steps (with the resumed run's own shuffle, as any
                             resumed epoch)

A checkpoint written by P processes restores on any other number: the arrays
are read into the current run's layout.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from training.cli import first_line

FORMAT = 1
#: Checkpoints kept (the newest first); older ones are deleted after a save.
KEEP = 2
COMMIT_FILE = "commit_success.txt"
META = ("meta", "metadata")
PARTIAL = "partial"
_STEP = re.compile(r"[1-9][0-9]*")


class CheckpointError(Exception):
    """A checkpoint cannot be used or written (one-line message)."""


def _is_remote(directory: str) -> bool:
    return "://" in directory


def completed_epochs(directory: str) -> list[int]:
    """The epochs E (ascending) whose checkpoint DIR/<E> is complete, that is,
    those `--resume` may continue from (it takes the last). [] when DIR does
    not exist. Local paths only need the standard library; other URIs go
    through etils.epath (orbax's file layer)."""
    if _is_remote(directory):
        from etils import epath

        root = epath.Path(directory)
    else:
        root = Path(directory)
    if not root.is_dir():
        return []
    epochs = []
    for child in root.iterdir():
        if _STEP.fullmatch(child.name) and _complete(child):
            epochs.append(int(child.name))
    return sorted(epochs)


def _complete(step_dir) -> bool:
    return (step_dir / COMMIT_FILE).exists() and (step_dir.joinpath(*META)).exists()


@dataclass
class Saved:
    """What a checkpoint holds besides the arrays."""

    epoch: int
    history: list[dict]
    best_epoch: int = 0
    best_value: float | None = None
    plateau: dict | None = None
    settings: dict = field(default_factory=dict)
    processes: int = 1
    steps: int = 0  # > 0: a partial checkpoint, `steps` steps into `epoch`

    def to_json(self) -> dict:
        return {"format": FORMAT, **self.__dict__}

    @classmethod
    def from_json(cls, data: dict) -> Saved:
        if data.get("format") != FORMAT:
            raise CheckpointError(
                f"checkpoint format {data.get('format')!r} is not {FORMAT}"
            )
        fields = {k: v for k, v in data.items() if k != "format"}
        return cls(**fields)


def partial_steps(directory: str, epoch: int) -> int:
    """The steps of epoch `epoch` that DIR/partial/<epoch> holds (0: none, or
    not complete)."""
    if _is_remote(directory):
        from etils import epath

        step_dir = epath.Path(directory) / PARTIAL / str(epoch)
    else:
        step_dir = Path(directory, PARTIAL, str(epoch))
    if not (step_dir.is_dir() and _complete(step_dir)):
        return 0
    data = json.loads(step_dir.joinpath(*META).read_text())
    return int(data.get("steps", 0)) if data.get("epoch") == epoch else 0


def _manager(directory: str, create: bool, keep: int = KEEP):
    import orbax.checkpoint as ocp

    path = directory if _is_remote(directory) else os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=create,
        # Saves run on the training loop's thread: every process issues the
        # same collective steps in the same order (an orbax thread would not).
        enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager(path, options=options)


def _variables(model) -> tuple[list, list]:
    optimizer = model.optimizer
    if optimizer is not None and not optimizer.built:
        optimizer.build(model.trainable_variables)
    return list(model.variables), list(optimizer.variables if optimizer else [])


class Checkpointer:
    """Saves and restores one run's checkpoints in `directory` (every process
    constructs one and calls the same methods in the same order)."""

    def __init__(self, directory: str):
        self.directory = directory
        self._mgr = None
        self._partial = None

    def _get(self, create: bool = True, partial: bool = False):
        if partial:
            if self._partial is None:
                where = self.directory.rstrip("/") + "/" + PARTIAL
                self._partial = _manager(where, create, keep=1)
            return self._partial
        if self._mgr is None:
            self._mgr = _manager(self.directory, create)
        return self._mgr

    def latest(self) -> int:
        """The last complete epoch (0 if none)."""
        epochs = completed_epochs(self.directory)
        return epochs[-1] if epochs else 0

    def save(self, model, best: list, saved: Saved) -> None:
        """Write epoch `saved.epoch`: the model's and optimizer's variables,
        `best` (NumPy arrays, the best epoch's model variables) and `saved`."""
        import orbax.checkpoint as ocp

        model_vars, opt_vars = _variables(model)
        state = {
            "model": [v.value for v in model_vars],
            "optimizer": [v.value for v in opt_vars],
        }
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            best=ocp.args.StandardSave({"model": list(best)}),
            meta=ocp.args.JsonSave(saved.to_json()),
        )
        mgr = self._get(partial=saved.steps > 0)
        try:
            if saved.steps and saved.epoch in mgr.all_steps():
                mgr.delete(saved.epoch)  # stopped twice in the same epoch
            mgr.save(saved.epoch, args=args, force=True)
            mgr.wait_until_finished()
        except Exception as e:
            raise CheckpointError(
                f"writing checkpoint {saved.epoch} to {self.directory} failed: "
                + first_line(e)
            ) from e

    def restore(self, model, epoch: int, partial: bool = False) -> tuple[Saved, list]:
        """Load epoch `epoch` (`partial`: DIR/partial/<epoch>) into `model` (its
        variables and its optimizer's, in their current layout); returns the
        metadata and the best epoch's model variables (NumPy arrays)."""
        import jax
        import numpy as np
        import orbax.checkpoint as ocp

        model_vars, opt_vars = _variables(model)

        def target(variables):
            return [
                jax.ShapeDtypeStruct(
                    v.value.shape, v.value.dtype, sharding=v.value.sharding
                )
                for v in variables
            ]

        abstract = {"model": target(model_vars), "optimizer": target(opt_vars)}
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            best=ocp.args.StandardRestore(),
            meta=ocp.args.JsonRestore(),
        )
        try:
            mgr = self._get(create=False, partial=partial)
            restored = mgr.restore(epoch, args=args)
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {epoch} in {self.directory} does not fit this model "
                f"(written for other settings?): {first_line(e)}"
            ) from None
        saved = Saved.from_json(dict(restored.meta))
        for variables, values in (
            (model_vars, restored.state["model"]),
            (opt_vars, restored.state["optimizer"]),
        ):
            for variable, value in zip(variables, values, strict=True):
                variable.assign(value)
        best = [np.asarray(a) for a in restored.best["model"]]
        return saved, best

    def close(self) -> None:
        for mgr in (self._mgr, self._partial):
            if mgr is not None:
                mgr.close()
        self._mgr = self._partial = None


def read_saved(directory: str, epoch: int) -> Saved:
    """The metadata of checkpoint `epoch` (local paths; no jax needed)."""
    path = Path(directory, str(epoch), *META)
    return Saved.from_json(json.loads(path.read_text()))
