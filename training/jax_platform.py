"""Whether jax will compute on an accelerator, decided without starting jax.

Settings that only suit jax's CPU backend (an XLA CPU flag, gloo collectives)
must be made before jax starts its backends, so they cannot ask jax. jax
counts as bound for an accelerator when any of these holds, checked in order:

- `JAX_PLATFORMS` (or the older `JAX_PLATFORM_NAME`) names a platform other
  than `cpu` (`JAX_PLATFORMS=cpu` alone means the CPU, whatever is installed);
- a TPU or GPU plugin is installed (`libtpu`, `jax-cuda*-plugin`,
  `jax-rocm*-plugin`): jax then prefers it;
- this machine is a TPU VM (`/dev/accel*` or `/dev/vfio/<n>` exist, or
  `TPU_NAME` / `TPU_WORKER_HOSTNAMES` / `TPU_ACCELERATOR_TYPE` are set).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Mapping
from importlib import metadata

#: Distribution-name prefixes of jax's accelerator plugins (PEP 503 names).
PLUGIN_PREFIXES = ("libtpu", "jax-cuda", "jax-rocm")
TPU_ENV = ("TPU_NAME", "TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE")
TPU_DEVICE_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*")


def _installed_distributions() -> Iterable[str]:
    for dist in metadata.distributions():
        name = dist.metadata.get("Name") or ""
        yield name.lower().replace("_", "-").replace(".", "-")


def _device_files() -> list[str]:
    return [path for pattern in TPU_DEVICE_FILES for path in glob.glob(pattern)]


def accelerator(environ: Mapping[str, str] | None = None) -> str | None:
    """Why jax will not run on the CPU alone (a short phrase), or None when it
    will (`environ` defaults to os.environ)."""
    environ = os.environ if environ is None else environ
    key = "JAX_PLATFORMS" if environ.get("JAX_PLATFORMS") else "JAX_PLATFORM_NAME"
    platforms = environ.get(key) or ""
    named = {p.strip().lower() for p in platforms.split(",") if p.strip()}
    if named:
        return f"{key}={platforms}" if named - {"cpu"} else None
    plugins = sorted(
        name for name in _installed_distributions() if name.startswith(PLUGIN_PREFIXES)
    )
    if plugins:
        return f"{plugins[0]} is installed"
    tpu_env = [key for key in TPU_ENV if environ.get(key)]
    if tpu_env:
        return f"{tpu_env[0]} is set (a TPU VM)"
    files = _device_files()
    if files:
        return f"{files[0]} exists (a TPU VM)"
    return None
