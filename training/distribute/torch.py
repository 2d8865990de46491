"""torch: DistributedDataParallel ("ddp", one process per device, started by
torchrun) or one device ("default")."""

from __future__ import annotations

import atexit
import math
import os
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from training.distribute.base import Strategy, chief_only


@dataclass
class TorchDDP(Strategy):
    """DistributedDataParallel, one process per device, started by torchrun.

    `fit` is a plain torch loop around the compiled Keras model, the way the
    Keras guide "distributed_training_with_torch" runs a Keras model under DDP,
    but with the model's own loss, optimizer (its constraints included, e.g.
    the Synapse kernel clip) and metrics:

    - every step takes the same global batch on all ranks (one permutation per
      epoch, seeded from rank 0); rank r trains on its strided share
      (batch_size / process_count samples); an epoch's sample order is padded by
      wrapping around, like `DistributedSampler`, so every share is equal;
    - DDP averages the gradients during `backward()`, then each rank applies
      them with `model.optimizer`, so the weights stay identical;
    - metric states (totals and counts) are summed over ranks at the end of
      each epoch, and validation (each rank a strided share, summed the same
      way) gives the `val_` logs, so every rank sees the same epoch logs;
    - callbacks run through `keras.callbacks.CallbackList`; on non-chief ranks
      the file-writing ones (`CHIEF_ONLY_CALLBACKS`, or `chief_only = True`)
      are left out and there is no progress bar. After `on_train_begin` (where
      BackupAndRestore may restore) rank 0's weights, optimizer state and
      initial epoch are broadcast; after each epoch rank 0's `stop_training`
      (so a stop asked for mid-epoch takes effect at the epoch's end).

    Like Keras's own torch trainer it uses `model._symbolic_build` and
    `model._loss_tracker`. `devices` has one entry per process.
    """

    local_rank: int = 0
    device: str = "cpu"

    def fit(
        self,
        model,
        x,
        y,
        *,
        batch_size,
        epochs=1,
        validation_data=None,
        callbacks=None,
        initial_epoch=0,
        verbose="auto",
    ):
        from torch.nn.parallel import DistributedDataParallel

        self.check_batch(batch_size)
        local_batch = batch_size // self.process_count
        n = len(x)
        steps = math.ceil(n / batch_size)
        model.to(self.device)
        model._symbolic_build(data_batch=(x[:local_batch], y[:local_batch]))
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)

        kept = [c for c in callbacks or [] if self.is_chief or not chief_only(c)]
        verbose = verbose if self.is_chief else 0
        callback_list = keras.callbacks.CallbackList(
            kept,
            add_history=True,
            add_progbar=verbose != 0,
            verbose=verbose,
            epochs=epochs,
            steps=steps,
            model=model,
        )
        model.stop_training = False
        callback_list.on_train_begin()
        initial_epoch = getattr(model, "_initial_epoch", None) or initial_epoch
        initial_epoch = int(self._broadcast_scalar(initial_epoch))
        self._broadcast_variables(model)
        # NumPy's global generator: keras.utils.set_random_seed seeds it.
        seed = np.random.randint(2**31 - 1)  # noqa: NPY002
        seed = int(self._broadcast_scalar(seed))
        ddp = DistributedDataParallel(
            model, device_ids=[self.local_rank] if self.device != "cpu" else None
        )

        epoch_logs: dict[str, float] = {}
        for epoch in range(initial_epoch, epochs):
            model.reset_metrics()
            callback_list.on_epoch_begin(epoch)
            model.train()
            order = np.random.default_rng([seed, epoch]).permutation(n)
            order = np.concatenate([order, order[: (-n) % self.process_count]])
            for step in range(steps):
                callback_list.on_train_batch_begin(step)
                part = order[step * batch_size : (step + 1) * batch_size]
                part = part[self.process_index :: self.process_count]
                logs = self._train_step(ddp, model, x[part], y[part])
                callback_list.on_train_batch_end(step, logs)
            epoch_logs = self._reduced_metrics(model)
            model.eval()
            if validation_data is not None:
                val_logs = self._validate(model, validation_data, local_batch)
                epoch_logs.update({f"val_{k}": v for k, v in val_logs.items()})
            callback_list.on_epoch_end(epoch, epoch_logs)
            model.stop_training = bool(self._broadcast_scalar(model.stop_training))
            if model.stop_training:
                break
        if isinstance(model.optimizer, keras.optimizers.Optimizer) and epochs > 0:
            model.optimizer.finalize_variable_values(model.trainable_weights)
        callback_list.on_train_end(logs=epoch_logs)
        del ddp
        return model.history

    def _tensor(self, array):
        import torch

        return torch.as_tensor(np.asarray(array), device=self.device)

    def _train_step(self, ddp, model, x, y) -> dict:
        """One step on this rank's share; DDP averages gradients in backward()."""
        import torch

        x, y = self._tensor(x), self._tensor(y)
        y_pred = ddp(x, training=True)
        model.zero_grad()
        loss = model.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
        model._loss_tracker.update_state(loss, sample_weight=x.shape[0])
        loss = model.optimizer.scale_loss(loss)
        loss.backward()
        variables = model.trainable_variables
        with torch.no_grad():
            model.optimizer.apply([v.value.grad for v in variables], variables)
        return model.compute_metrics(x, y, y_pred, sample_weight=None)

    def _validate(self, model, data, local_batch: int) -> dict[str, float]:
        import torch

        model.reset_metrics()
        xv, yv = (a[self.process_index :: self.process_count] for a in data[:2])
        with torch.no_grad():
            for start in range(0, len(xv), local_batch):
                x = self._tensor(xv[start : start + local_batch])
                y = self._tensor(yv[start : start + local_batch])
                y_pred = model(x, training=False)
                loss = model.compute_loss(x=x, y=y, y_pred=y_pred, training=False)
                model._loss_tracker.update_state(loss, sample_weight=x.shape[0])
                model.compute_metrics(x, y, y_pred, sample_weight=None)
        return self._reduced_metrics(model)

    def _reduced_metrics(self, model) -> dict[str, float]:
        """Sum every metric state over ranks (all Keras built-ins are sums)."""
        import torch
        import torch.distributed as dist

        with torch.no_grad():
            for metric in model.metrics:
                for variable in metric.variables:
                    value = variable.value.detach().clone()
                    dist.all_reduce(value, op=dist.ReduceOp.SUM)
                    variable.assign(value)
        return {
            k: float(keras.ops.convert_to_numpy(v))
            for k, v in model.get_metrics_result().items()
        }

    def any_process(self, flag: bool) -> bool:
        """Whether `flag` is set on any rank (an all-reduce)."""
        import torch
        import torch.distributed as dist

        value = torch.tensor([float(bool(flag))], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def _broadcast_scalar(self, value) -> float:
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.broadcast(tensor, src=0)
        return tensor.item()

    def _broadcast_variables(self, model) -> None:
        """Copy rank 0's model and optimizer variables to every rank."""
        import torch
        import torch.distributed as dist

        variables = list(model.variables)
        if model.optimizer is not None:
            variables += list(model.optimizer.variables)
        with torch.no_grad():
            for variable in variables:
                value = variable.value.detach().clone()
                dist.broadcast(value, src=0)
                variable.assign(value)

    def restore_best(self, model, path=None, weights=None):
        """`weights` if given (the same on every rank), else the chief's best
        checkpoint, its weights broadcast to every rank (ranks on other
        machines cannot read the chief's file)."""
        if weights is not None:
            model.set_weights(weights)
            return model
        found = self.is_chief and path is not None and Path(path).is_file()
        if self._broadcast_scalar(found):
            if self.is_chief:
                model.set_weights(keras.saving.load_model(path).get_weights())
            self._broadcast_variables(model)
        return model

    def evaluate(self, model, x, y, *, batch_size, verbose=0):
        """Every rank evaluates all of (x, y) (the weights are the same)."""
        return super().evaluate(
            model, x, y, batch_size=batch_size, verbose=verbose if self.is_chief else 0
        )

    def predict(self, model, x, *, batch_size, verbose=0):
        """Every rank predicts all of x (the weights are the same)."""
        verbose = verbose if self.is_chief else 0
        return super().predict(model, x, batch_size=batch_size, verbose=verbose)

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _torch_device_name(torch) -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu:0"


def resolve(name: str) -> Strategy:
    import torch

    env = os.environ
    world_size = int(env.get("WORLD_SIZE", "1") or 1)
    if name == "auto":
        name = "ddp" if world_size > 1 else "default"
    if name == "default":
        return Strategy("default", "torch", [_torch_device_name(torch)])
    missing = [
        k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in env
    ]
    if world_size < 2 or missing:
        raise ValueError(
            "'ddp' needs several processes started by torchrun "
            f"(WORLD_SIZE={world_size}, missing {missing or 'nothing'}); run "
            "torchrun --nproc_per_node=N training/mnist.py ..., or use 'default'."
        )
    import torch.distributed as dist

    rank, local_rank = int(env["RANK"]), int(env["LOCAL_RANK"])
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"'ddp' LOCAL_RANK {local_rank} has no GPU "
                f"({torch.cuda.device_count()} visible); use --nproc_per_node <= that."
            )
        torch.cuda.set_device(local_rank)  # Keras's "cuda" device follows this
        backend, device, kind = "nccl", f"cuda:{local_rank}", "cuda"
    else:
        backend, device, kind = "gloo", "cpu", "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    strategy = TorchDDP(
        "ddp",
        "torch",
        [f"{kind}:{r}" for r in range(world_size)],
        is_chief=rank == 0,
        process_index=rank,
        local_rank=local_rank,
        process_count=world_size,
        device=device,
    )
    atexit.register(strategy.close)  # the CLI may also call close() itself
    return strategy
