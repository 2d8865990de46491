"""Writes the XLA FFI C header of the oldest supported jaxlib into a directory.

    python .ci/ffi_header.py DIR       # DIR/xla/ffi/api/c_api.h (and api.h, ffi.h)

The binary wheels' XLA FFI handlers are compiled against it
(KERAS_SYNANN_FFI_INCLUDE=DIR): a handler reports the API version of the
header it was built with, and XLA accepts versions from 0.1 up to its own, so
a build against the floor of the `jax` extra (constraints-min.txt: jaxlib
0.7.0, API 0.1) loads under every jax the package supports. The header is
read from the jaxlib wheel that pip downloads (one wheel, any platform: the
header is the same); nothing is installed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def floor() -> str:
    """The jaxlib version constraints-min.txt pins."""
    text = (REPO / "constraints-min.txt").read_text()
    return re.search(r"^jaxlib==(\S+)$", text, re.MULTILINE).group(1)


def main(dest: Path) -> None:
    version = floor()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary", ":all:", "--platform", "manylinux2014_x86_64",
             "--python-version", "3.11", "--dest", tmp, f"jaxlib=={version}"],
            check=True,
            env={**os.environ, "PIP_CONSTRAINT": ""},  # (not the current pins)
        )  # fmt: skip
        (wheel,) = Path(tmp).glob("jaxlib-*.whl")
        prefix = "jaxlib/include/"
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if name.startswith(prefix + "xla/ffi/api/") and name.endswith(".h"):
                    target = dest / name[len(prefix) :]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(z.read(name))
    header = (dest / "xla" / "ffi" / "api" / "c_api.h").read_text()
    api = re.findall(r"#define XLA_FFI_API_(?:MAJOR|MINOR) (\d+)", header)
    print(f"jaxlib {version}'s XLA FFI header (API {'.'.join(api)}) in {dest}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    main(Path(sys.argv[1]).resolve())
