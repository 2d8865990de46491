"""Compiling the C loops: the command for one level, and the first-use build.

Two libraries can be built from the package's sources:

- "loops": cpu_loops.c (tensorflow and torch call it through ctypes);
- "xla_ffi": cpu_loops.c and cpu_ffi.c, its XLA FFI handlers (jax), against
  the FFI header in `include` (jaxlib's `jax.ffi.include_dir()`).

A wheel's build step compiles "xla_ffi" once per level (it serves every
backend); a first use without a packaged library compiles what the backend
needs into a cache directory (`$KERAS_SYNANN_CACHE`, else
`$XDG_CACHE_HOME/keras_synann` or ~/.cache/keras_synann), once per source,
compiler, flags and (for `native`) CPU.

Only the standard library is imported here: the wheel's build step loads this
file by path.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

#: The sources of each library.
SOURCES = {"loops": ("cpu_loops.c",), "xla_ffi": ("cpu_loops.c", "cpu_ffi.c")}
OPTIMIZE = ("-O3", "-g0")
LINK = ("-fPIC", "-shared", "-pthread")
#: The reason given when no compiler is found.
NO_COMPILER = "no C compiler found ($CC, cc, gcc, clang)"


def compiler() -> str | None:
    """The C compiler: `$CC`, else cc, gcc or clang on PATH; None if there is none."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def source(name: str) -> str:
    """The text of one of the package's C files."""
    return Path(__file__).with_name(name).read_text()


def flag_sets(level_flags: tuple[str, ...] | None) -> tuple[tuple[str, ...], ...]:
    """The flag sets a build tries, in order: a level's own flags, or for
    `native` (None) -march=native and then none (compilers for other CPUs
    may not know -march=native)."""
    if level_flags is None:
        return (("-march=native",), ())
    return (level_flags,)


def command(
    cc: Sequence[str],
    library: str,
    flags: Sequence[str],
    directory: Path,
    out: Path,
    include: Sequence[str] = (),
) -> list[str]:
    """The compile command for `library` with its sources written into `directory`."""
    paths = []
    for name in SOURCES[library]:
        path = Path(directory) / name
        path.write_text(source(name))
        paths.append(str(path))
    includes = [f"-I{d}" for d in include] if library == "xla_ffi" else []
    return [*cc, *OPTIMIZE, *flags, *includes, *LINK, *paths, "-o", str(out)]


def compile_library(
    cc: Sequence[str],
    library: str,
    flags: Sequence[str],
    out: Path,
    include: Sequence[str] = (),
) -> str:
    """Compiles `library` into `out` (atomically: a concurrent build of the
    same file agrees); "" on success, else the compiler's last error line."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / "out.so"
        result = subprocess.run(
            command(cc, library, flags, Path(tmp), built, include),
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            return (result.stderr.strip().splitlines() or ["failed"])[-1]
        os.replace(built, out)
    return ""


def build(
    cc: str,
    library: str,
    level_flags: tuple[str, ...] | None,
    include: Sequence[str] = (),
) -> tuple[Path | None, str]:
    """(the cached library, built now unless cached, ""), or (None, the error).

    `level_flags`: a level's compiler flags, or None for `native`.
    """
    version = subprocess.run(
        [cc, "--version"], capture_output=True, text=True, check=False
    ).stdout
    texts = [source(name) for name in SOURCES[library]]
    cpu = _cpu_id() if level_flags is None else ""
    error = ""
    for flags in flag_sets(level_flags):
        key = hashlib.sha256(
            "\0".join([*texts, cc, version, cpu, *flags, *include]).encode()
        ).hexdigest()[:20]
        target = cache_dir() / f"synann_{library}_{key}.so"
        if target.exists():
            return target, ""
        try:
            error = compile_library([cc], library, flags, target, include)
        except OSError as e:
            return None, str(e)
        if not error:
            return target, ""
    return None, error


def cache_dir() -> Path:
    """Where libraries compiled on first use are kept."""
    root = os.environ.get("KERAS_SYNANN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
        "keras_synann",
    )
    return Path(root)


def _cpu_id() -> str:
    """What a -march=native build depends on: the CPU model and its features."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [
            line
            for line in text.splitlines()
            if line.startswith(("model name", "flags", "Features", "CPU part"))
        ]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()
