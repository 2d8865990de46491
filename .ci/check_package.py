"""Checks the built distributions as PyPI and a user will see them (tox -e package).

    python .ci/check_package.py DIST [--min-jax]

DIST holds what .ci/build_wheels.py wrote: the sdist, the pure wheel and the
binary wheels. This runs `twine check --strict` on all of them,
`check-wheel-contents` on the wheels and `auditwheel show` on the manylinux
ones, then installs this machine's binary wheel and the pure wheel, each into
a fresh virtual environment in a temporary directory outside the repository,
with no C compiler on PATH and an empty cache, and on each backend
installed here (jax, tensorflow, torch) checks in a fresh process that:

- binary wheel: "auto" picks `cpu`, from the packaged library of this CPU's
  level; the first forward and gradient call (its time printed) compiles
  nothing and matches float64 NumPy, as does every packaged level this CPU
  runs (called directly); under jax a model also saves and loads;
- pure wheel: "auto" falls back, with a one-line reason and one warning.

The backends are not installed again: the fresh environments see this
environment's site-packages (a .pth file) behind the wheel under test.
--min-jax also installs the binary wheel with the oldest versions
pyproject.toml allows (constraints-min.txt: jax 0.7.0) into one more fresh
environment and runs the jax check there: the packaged XLA FFI handlers load
under the oldest and the newest jax.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
import time
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("jax", "tensorflow", "torch")

SMOKE = r"""
import json, os, sys, time, warnings
import numpy as np

venv_dir, version, expect, cache = sys.argv[1:5]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import keras
    import keras_synann
    from keras_synann import ops as synann_ops
    from keras_synann.kernels import cpu_build
    from keras_synann.testing import value_and_grad

    assert keras_synann.__file__.startswith(venv_dir), keras_synann.__file__
    assert keras_synann.__version__ == version, (keras_synann.__version__, version)
    backend = keras.backend.backend()
    variant = "xla_ffi" if backend == "jax" else "pthreads"
    rng = np.random.default_rng(0)
    x = rng.uniform(0.01, 0.99, (16, 96)).astype("float32")
    kernel = rng.uniform(0.0, 0.6, (96, 96)).astype("float32")
    g = rng.normal(size=(16, 96)).astype("float32")
    auto = synann_ops.resolve_implementation("auto", x, kernel)

    def loss(x, kernel):
        s = synann_ops.log_inhibition(x, kernel)
        return keras.ops.sum(s * keras.ops.convert_to_tensor(g))

    start = time.perf_counter()
    value, (dx, dw) = value_and_grad(loss)(x, kernel)
    dw = keras.ops.convert_to_numpy(dw)
    first = time.perf_counter() - start

f = 1.0 - x.astype("float64")[:, :, None] * kernel.astype("float64")[None]
q = g.astype("float64")[:, None, :] / f
np.testing.assert_allclose(float(value), (g * np.log(f).sum(axis=1)).sum(), rtol=2e-5)
np.testing.assert_allclose(keras.ops.convert_to_numpy(dx), -(q * kernel).sum(axis=2), rtol=1e-4, atol=1e-4)
np.testing.assert_allclose(dw, -(x[:, :, None] * q).sum(axis=0), rtol=1e-4, atol=1e-4)
ours = [str(w.message) for w in caught if "keras_synann" in str(w.message)]
result = {"backend": backend, "auto": auto, "first_call_s": round(first, 3)}
result["versions"] = f"keras {keras.__version__}, {backend} {sys.modules[backend].__version__}"
if expect == "packaged":
    info = cpu_build.describe(variant)
    assert auto == "cpu", (auto, info)
    assert info["origin"] == "packaged", info
    assert not os.path.exists(cache), os.listdir(cache)
    assert not ours, ours
    result.update(level=info["level"], library=os.path.basename(info["path"]))
    # Every packaged level this CPU runs, called directly: the forward and dx.
    import ctypes
    from keras_synann.kernels import cpu_levels
    checked = []
    for level in cpu_levels.supported():
        lib = cpu_build._declared(ctypes.CDLL(str(cpu_build.packaged(level))))
        s, dx, dw = (np.empty_like(a) for a in (g, x, kernel))
        ptr = lambda a: a.ctypes.data
        lib.synann_forward(ptr(x), ptr(kernel), ptr(s), 16, 96, 96, 16, 1e-6, 1e-38, 2)
        lib.synann_backward(ptr(x), ptr(kernel), ptr(g), ptr(dx), ptr(dw), 16, 96, 96, 1e-6, 2)
        np.testing.assert_allclose(s, np.log(f).sum(axis=1), rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(dx, -(q * kernel).sum(axis=2), rtol=1e-4, atol=1e-4)
        checked.append(level)
    result["levels_checked"] = checked
    if backend == "jax":
        result["xla_ffi_api"] = info["xla_ffi_api"]
        model = keras.Sequential([keras.Input((96,)), keras_synann.Synapse()])
        model.save("smoke.keras")
        loaded = keras.models.load_model("smoke.keras")
        np.testing.assert_allclose(model.predict(x, verbose=0), loaded.predict(x, verbose=0))
else:
    reason = cpu_build.unavailable(variant)
    assert auto != "cpu" and reason and "\n" not in reason, (auto, reason)
    assert len(ours) == 1, ours
    result.update(reason=reason, warning=ours[0])
print(json.dumps(result))
"""


def run(*argv, **kwargs) -> subprocess.CompletedProcess:
    shown = ("SMOKE" if a == SMOKE else str(a) for a in argv)
    print("+", " ".join(shown), flush=True)
    return subprocess.run([str(a) for a in argv], check=True, **kwargs)


def host_wheel(dist: Path) -> Path:
    """The binary wheel for this machine."""
    machine = platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "arm64"}.get(machine, machine)
    (wheel,) = (
        w
        for w in dist.glob("keras_synann-*.whl")
        if not w.name.endswith("-any.whl") and w.name.endswith(f"{machine}.whl")
    )
    return wheel


def fresh_env(root: Path, wheel: Path, share_site: bool) -> Path:
    """A new virtual environment with `wheel` installed (no dependencies) and,
    where `share_site`, this environment's packages behind it; its python."""
    venv.create(root, with_pip=False, symlinks=os.name != "nt")
    python = root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet",
        "--no-deps", wheel)  # fmt: skip
    if share_site:
        site = subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
        (Path(site) / "zz_shared_backends.pth").write_text("\n".join(sorted(ours)))
    return python


def smoke(python: Path, home: Path, backend: str, version: str, expect: str) -> dict:
    """SMOKE under `backend` with no compiler on PATH and an empty cache."""
    cache = home / f"cache-{backend}-{expect}"
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"PYTHONPATH", "VIRTUAL_ENV", "CC", "KERAS_SYNANN_CPU_LEVEL"}
        and not key.startswith("KERAS_SYNANN")
    }
    env.update(
        PATH=str(python.parent),  # the environment's own scripts only: no compiler
        KERAS_BACKEND=backend,
        KERAS_HOME=str(home / "keras-home"),
        KERAS_SYNANN_CACHE=str(cache),
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    start = time.perf_counter()
    out = run(
        python, "-I", "-c", SMOKE, python.parents[1], version, expect, cache,
        cwd=home, env=env, capture_output=True, text=True,
    ).stdout  # fmt: skip
    result = json.loads(out.strip().splitlines()[-1])
    result["process_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result), flush=True)
    return result


def importable(name: str) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {name}"],
                          capture_output=True).returncode == 0  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dist", type=Path)
    parser.add_argument("--min-jax", action="store_true")
    args = parser.parse_args(argv)
    dist = args.dist.resolve()
    start = time.perf_counter()
    (sdist,) = dist.glob("keras_synann-*.tar.gz")
    wheels = sorted(dist.glob("keras_synann-*.whl"))
    version = sdist.name[len("keras_synann-") : -len(".tar.gz")]
    assert all(w.name.split("-")[1] == version for w in wheels), wheels
    (pure,) = (w for w in wheels if w.name.endswith("-py3-none-any.whl"))

    run(sys.executable, "-m", "twine", "check", "--strict", sdist, *wheels)
    run(sys.executable, "-m", "check_wheel_contents", *wheels)
    for wheel in wheels:
        if "manylinux" in wheel.name:
            run(sys.executable, "-m", "auditwheel", "show", wheel)

    backends = [b for b in BACKENDS if importable(b)]
    assert backends, "no backend installed"
    binary = host_wheel(dist)
    with tempfile.TemporaryDirectory(prefix="keras-synann-smoke-") as tmp:
        home = Path(tmp)
        for wheel, expect in ((binary, "packaged"), (pure, "fallback")):
            python = fresh_env(home / expect, wheel, share_site=True)
            for backend in backends:
                smoke(python, home, backend, version, expect)
        if args.min_jax:
            python = fresh_env(home / "min", binary, share_site=False)
            env = {**os.environ, "PIP_CONSTRAINT": str(REPO / "constraints-min.txt")}
            run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet",
                f"{binary}[jax]", env=env)  # fmt: skip
            smoke(python, home, "jax", version, "packaged")
    print(
        f"checked {len(wheels)} wheels and the sdist in {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
