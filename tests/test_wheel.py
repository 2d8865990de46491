"""A binary wheel carries the C loops for its CPU levels, and the installed
package runs them with no compiler on PATH, compiling nothing.

(tox -e package checks the release wheels themselves, built with zig for
every level, on every backend; this builds one level with the compiler
here, under jax, whose XLA FFI handlers make the library's widest use.)
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import keras
import pytest

from keras_synann.kernels import cpu_compile, cpu_levels

REPO = Path(__file__).resolve().parents[1]

RUN = r"""
import os, sys
site, cache = sys.argv[1:3]
sys.path.insert(0, site)
import numpy as np
from keras import ops
import keras_synann
from keras_synann import ops as synann_ops
from keras_synann.kernels import cpu_build

assert keras_synann.__file__.startswith(site), keras_synann.__file__
rng = np.random.default_rng(0)
x = rng.uniform(0, 1, (5, 40)).astype("float32")
kernel = rng.uniform(0, 0.6, (40, 40)).astype("float32")
s = ops.convert_to_numpy(synann_ops.log_inhibition(x, kernel))
expected = np.log1p(-x[:, :, None].astype(np.float64) * kernel[None]).sum(axis=1)
np.testing.assert_allclose(s, expected, rtol=2e-5, atol=2e-5)
info = cpu_build.describe("xla_ffi")
print(synann_ops.resolve_implementation("auto", x, kernel), info["origin"], info["level"])
print(os.path.exists(cache))
"""


@pytest.mark.slow
@pytest.mark.skipif(keras.backend.backend() != "jax", reason="runs under jax")
def test_a_binary_wheel_runs_the_loops_without_a_compiler(tmp_path):
    import jax

    level = cpu_levels.choose({})[0]
    if level == cpu_levels.NATIVE:
        pytest.skip(f"no packaged level for {cpu_levels.machine()}")
    # Build from a copy of what the sdist holds, so that no stale build
    # directory of the checkout leaks into the wheel.
    source = tmp_path / "source"
    shutil.copytree(REPO / "keras_synann", source / "keras_synann",
                    ignore=shutil.ignore_patterns("__pycache__", "_lib"))  # fmt: skip
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        KERAS_SYNANN_PREBUILT=level,
        KERAS_SYNANN_FFI_INCLUDE=jax.ffi.include_dir(),
        KERAS_SYNANN_CC=cpu_compile.compiler(),
    )
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-w", str(wheels)],
        check=True, capture_output=True, text=True, env=env,
    )  # fmt: skip
    (wheel,) = wheels.glob("keras_synann-*.whl")
    assert wheel.name.startswith("keras_synann-") and "-py3-none-linux_" in wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert f"keras_synann/kernels/_lib/{cpu_levels.LEVELS[level].library}" in names
    assert (
        "keras_synann/kernels/cpu_loops.c" in names
    )  # (for KERAS_SYNANN_CPU_LEVEL=native)
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names), names
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    empty = tmp_path / "bin"
    empty.mkdir()
    cache = tmp_path / "cache"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTHON", "KERAS_SYNANN", "CC"))
    }
    env.update(KERAS_BACKEND="jax", KERAS_SYNANN_CACHE=str(cache), PATH=str(empty))
    result = subprocess.run(
        [sys.executable, "-I", "-c", RUN, str(site), str(cache)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["cpu", "packaged", level, "False"]
