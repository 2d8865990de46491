"""setuptools' build, plus the C loops compiled per CPU level into binary wheels.

    python -m build                  # the sdist and the pure py3-none-any wheel
    KERAS_SYNANN_PREBUILT=all KERAS_SYNANN_FFI_INCLUDE=DIR python -m build --wheel
                                     # + _lib/synann_<level>.so: py3-none-<platform>

Read only while building a wheel:

- KERAS_SYNANN_PREBUILT: "all" (every level of the target machine) or levels
  separated by commas; unset or empty, the wheel is pure and the loops compile
  on first use.
- KERAS_SYNANN_TARGET: the machine to build for (default this one); "aarch64"
  on an x86_64 host cross-compiles (with zig).
- KERAS_SYNANN_CC: the compiler command (default $CC, else cc); "zig" is
  `python -m ziglang cc -target <machine>-linux-gnu.2.17`, which links
  against glibc 2.17 (manylinux2014) from any Linux host.
- KERAS_SYNANN_FFI_INCLUDE: the directory holding xla/ffi/api/c_api.h of the
  oldest jaxlib the package supports (`python .ci/ffi_header.py DIR` writes it).

The libraries are loaded with ctypes and the XLA FFI, not imported by
CPython, so the wheel is tagged py3-none-<platform>: one per platform for
every Python 3.11+.
"""

import importlib.util
import os
import shlex
import sys
import time
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py

KERNELS = Path(__file__).resolve().parent / "keras_synann" / "kernels"


def _module(name):
    """keras_synann/kernels/NAME.py, loaded by path (keras_synann imports keras)."""
    spec = importlib.util.spec_from_file_location(
        f"_build_{name}", KERNELS / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _host():
    return _module("cpu_levels").machine()


def _target():
    return os.environ.get("KERAS_SYNANN_TARGET", "").strip() or _host()


def _levels():
    """The levels to build (none: a pure wheel)."""
    levels = _module("cpu_levels")
    wanted = os.environ.get("KERAS_SYNANN_PREBUILT", "").strip()
    known = levels.for_machine(_target())
    if wanted in ("", "none"):
        return ()
    if wanted == "all":
        return known
    names = tuple(name.strip() for name in wanted.split(","))
    unknown = [name for name in names if name not in known]
    if unknown:
        sys.exit(
            f"KERAS_SYNANN_PREBUILT must be 'all' or levels of {_target()} "
            f"({', '.join(known)}). Received: {wanted!r}"
        )
    return names


#: zig's names of the levels' CPUs (its -march reads "-" as "remove a feature").
ZIG_CPUS = {
    "x86-64": "x86_64",
    "x86-64-v3": "x86_64_v3",
    "x86-64-v4": "x86_64_v4",
    "armv8-a": "generic",
}


def _macos_target():
    """The oldest macOS the wheel supports: $MACOSX_DEPLOYMENT_TARGET, else 11.0
    (arm64) or 10.13 (x86_64)."""
    default = "11.0" if _target() == "aarch64" else "10.13"
    return os.environ.get("MACOSX_DEPLOYMENT_TARGET") or default


def _compiler(level):
    """(compiler command, flags) for `level`."""
    command = os.environ.get("KERAS_SYNANN_CC", "").strip()
    if command == "zig":
        target = f"{_target()}-linux-gnu.2.17"
        cc = [sys.executable, "-m", "ziglang", "cc", "-target", target]
        return cc, (f"-march={ZIG_CPUS[level]}",)
    cc = shlex.split(command or os.environ.get("CC", "") or "cc")
    flags = _module("cpu_levels").LEVELS[level].flags
    if sys.platform == "darwin":
        flags = (*flags, f"-mmacosx-version-min={_macos_target()}")
    return cc, flags


class BuildPy(build_py):
    """build_py, then one library per level into keras_synann/kernels/_lib/."""

    def run(self):
        super().run()
        levels = _levels()
        if not levels:
            return
        include = os.environ.get("KERAS_SYNANN_FFI_INCLUDE", "")
        if not (Path(include) / "xla" / "ffi" / "api" / "c_api.h").is_file():
            sys.exit(
                "KERAS_SYNANN_PREBUILT needs KERAS_SYNANN_FFI_INCLUDE: a directory "
                "with xla/ffi/api/c_api.h (python .ci/ffi_header.py DIR writes it). "
                f"Received: {include!r}"
            )
        compile_ = _module("cpu_compile")
        out_dir = Path(self.build_lib) / "keras_synann" / "kernels" / "_lib"
        for level in levels:
            out = out_dir / _module("cpu_levels").LEVELS[level].library
            start = time.perf_counter()
            cc, flags = _compiler(level)
            error = compile_.compile_library(cc, "xla_ffi", flags, out, (include,))
            if error:
                sys.exit(f"the C loops for {level} did not compile: {error}")
            print(f"built {out.name} in {time.perf_counter() - start:.1f} s")


class BinaryDistribution(Distribution):
    """Platform-specific (platlib) where the wheel carries libraries."""

    def has_ext_modules(self):
        return bool(_levels())


class BdistWheel(bdist_wheel):
    """A py3-none-<platform> wheel when it carries libraries, else py3-none-any."""

    def finalize_options(self):
        if _levels() and not self.plat_name:
            if sys.platform == "darwin":  # (not the interpreter's universal2)
                arch = "arm64" if _target() == "aarch64" else _target()
                self.plat_name = f"macosx_{_macos_target().replace('.', '_')}_{arch}"
            elif _target() != _host():
                self.plat_name = f"linux_{_target()}"
        super().finalize_options()

    def get_tag(self):
        python, abi, plat = super().get_tag()
        return (python, abi, plat) if self.root_is_pure else ("py3", "none", plat)


setup(
    distclass=BinaryDistribution,
    cmdclass={"build_py": BuildPy, "bdist_wheel": BdistWheel},
)
