"""XLA CPU flags that the training script applies to itself under jax.

jaxlib 0.10 runs convolutions on a CPU through YNNPACK fusions by default. At
the lenet's shapes XLA's own convolution code (Eigen) is about twice as fast
(2-D convolution, batch 128, 12x12x16 -> 8x8x32: 1.1 ms against 2.3 ms; its
kernel gradient 2.5 against 3.4 ms, on a 2-core Intel Xeon), so the script
takes convolutions out of the YNNPACK fusions:

    XLA_FLAGS += --xla_cpu_experimental_ynn_fusion_type=-individual_convolution

XLA reads XLA_FLAGS once, when jax starts its backend, so this must run
before the first jax computation. It is left out when:

- the backend is not jax (TensorFlow's XLA may not know the flag, and an
  unknown flag in XLA_FLAGS aborts the process);
- jax will run on a TPU or GPU (`training.jax_platform.accelerator`: the flag
  would do nothing there, and the accelerator's own XLA, such as libtpu's,
  reads XLA_FLAGS too and may not know it);
- jaxlib is older than 0.8.2 (no such fusion type: the same abort);
- XLA_FLAGS already sets `--xla_cpu_experimental_ynn_fusion_type` (yours wins);
- `SYNANN_XLA_FLAGS=0` is in the environment.
"""

from __future__ import annotations

import os
import re
from importlib import metadata

from training import jax_platform

#: Set to "0" to leave XLA_FLAGS alone.
ENV = "SYNANN_XLA_FLAGS"
FLAG = "--xla_cpu_experimental_ynn_fusion_type"
VALUE = "-individual_convolution"
#: The first jaxlib with the `individual_convolution` YNN fusion type.
MIN_JAXLIB = (0, 8, 2)


def tune_xla_cpu(backend: str, environ=None) -> list[str]:
    """Appends the flags above to XLA_FLAGS in `environ` (default os.environ)
    when they apply; returns the flags added ([] when none)."""
    environ = os.environ if environ is None else environ
    if backend != "jax" or environ.get(ENV, "1").strip() == "0":
        return []
    current = environ.get("XLA_FLAGS", "")
    if FLAG in current or _jaxlib_version() < MIN_JAXLIB:
        return []
    if jax_platform.accelerator(environ) is not None:
        return []
    added = f"{FLAG}={VALUE}"
    environ["XLA_FLAGS"] = f"{current} {added}".strip()
    return [added]


def _jaxlib_version() -> tuple[int, ...]:
    try:
        release = metadata.version("jaxlib").split("+")[0]
    except metadata.PackageNotFoundError:
        return (0,)
    return tuple(int(re.match(r"\d*", p).group() or 0) for p in release.split(".")[:3])
