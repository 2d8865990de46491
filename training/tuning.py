"""What the training script sets for the machine before the backend starts
(docs/training.md, "CPU settings the script applies"):

- glibc malloc keeps freed memory for reuse (allocator.py; SYNANN_MALLOC=0
  turns it off);
- under jax on a CPU, XLA's own convolutions instead of YNNPACK fusions
  (xla_flags.py, which jax_platform.py tells whether jax will run on a CPU;
  SYNANN_XLA_FLAGS=0 turns it off).

`tuned(backend)` applies both and yields what took effect (metrics.json's
`cpu_settings`); XLA_FLAGS is restored afterwards, for callers that run the
script in their own process.
"""

from __future__ import annotations

import contextlib
import os

from training import allocator, xla_flags


@contextlib.contextmanager
def tuned(backend: str):
    """Apply the settings above for the Keras `backend`; yields
    {"malloc": ..., "xla_flags": ...}, what was applied."""
    before = os.environ.get("XLA_FLAGS")
    settings = {
        "malloc": allocator.tune_malloc(),
        "xla_flags": xla_flags.tune_xla_cpu(backend),
    }
    try:
        yield settings
    finally:
        if before is None:
            os.environ.pop("XLA_FLAGS", None)
        else:
            os.environ["XLA_FLAGS"] = before
