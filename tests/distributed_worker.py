"""Train a tiny Synapse model under one strategy and print its results as JSON.

Run by tests/test_distribute.py in a subprocess (or under torchrun), with the
environment that gives the wanted devices:

    python tests/distributed_worker.py NAME [--out DIR] [--epochs E]
        [--initial-epoch I] [--batch B]

The chief prints one line, `RESULT {...}`: strategy name, devices, replica
count, the history, the final validation accuracy, whether tensorflow was
imported by `resolve()`, predictions, and (for DDP) what each rank ran.
`run(...)` returns the same in the calling process (one device needs no
environment of its own).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_synann  # noqa: E402
from training import distribute  # noqa: E402


def make_data(seed: int = 0, n: int = 768, features: int = 8, classes: int = 3):
    """A few hundred separable samples: the class is the argmax of a linear map."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    w = rng.normal(size=(features, classes)).astype("float32")
    y = np.argmax(x @ w, axis=1).astype("int32")
    return (x[:512], y[:512]), (x[512:], y[512:])


def build_model(features: int = 8, classes: int = 3) -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((features,)),
            keras.layers.Dense(12, activation="sigmoid"),
            keras_synann.Synapse(),
            keras.layers.Dense(classes, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(0.02),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("--out", default=None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--initial-epoch", type=int, default=0)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    result = run(args.name, args.out, args.epochs, args.initial_epoch, args.batch)
    if result is not None:
        print("RESULT " + json.dumps(result), flush=True)


def run(name, out=None, epochs=3, initial_epoch=0, batch=32) -> dict | None:
    """Train under the strategy `name`; the results on the chief, else None."""
    args = argparse.Namespace(
        name=name, out=out, epochs=epochs, initial_epoch=initial_epoch, batch=batch
    )
    strategy = distribute.resolve(args.name)
    tf_imported = "tensorflow" in sys.modules
    keras.utils.set_random_seed(1234)
    (x, y), (xv, yv) = make_data()
    with strategy.scope():
        model = build_model()
    callbacks = []
    if args.out:  # one folder per rank, to see which ranks wrote files
        out = os.path.join(args.out, "rank" + os.environ.get("RANK", "0"))
        os.makedirs(out, exist_ok=True)
        callbacks = [
            keras.callbacks.CSVLogger(os.path.join(out, "log.csv")),
            keras.callbacks.ModelCheckpoint(
                os.path.join(out, "m.weights.h5"), save_weights_only=True
            ),
        ]
    history = strategy.fit(
        model,
        x,
        y,
        batch_size=args.batch,
        epochs=args.epochs,
        validation_data=(xv, yv),
        callbacks=callbacks,
        initial_epoch=args.initial_epoch,
        verbose=0,
    )
    evaluation = strategy.evaluate(model, xv, yv, batch_size=args.batch)
    predictions = strategy.predict(model, xv, batch_size=args.batch)
    small = strategy.predict(model, xv[:29], batch_size=args.batch)  # odd, < batch
    weights_sum = float(sum(np.abs(w).sum() for w in model.get_weights()))
    result = {
        "name": strategy.name,
        "backend": strategy.backend,
        "devices": [str(d) for d in strategy.devices],
        "num_replicas": strategy.num_replicas,
        "is_chief": strategy.is_chief,
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "epochs_run": list(history.epoch),
        "evaluation": {k: float(v) for k, v in evaluation.items()},
        "weights_sum": weights_sum,
        "predict_accuracy": float(np.mean(np.argmax(predictions, axis=1) == yv)),
        "predict_small_matches": bool(np.allclose(small, predictions[:29], atol=1e-5)),
        "tensorflow_imported": tf_imported,
    }
    if strategy.name == "ddp":
        import torch
        import torch.distributed as dist

        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(
            gathered,
            {
                "rank": dist.get_rank(),
                "weights_sum": weights_sum,
                "history": result["history"],
            },
        )
        result["ranks"] = gathered
        del torch
    strategy.close()
    return result if strategy.is_chief else None


if __name__ == "__main__":
    main()
