"""Pack the working tree into a tarball for the TPU workers.

Left out: version control, caches, virtual environments, build outputs, run
outputs (runs/), the local output directory, and common secret files. The
carried MNIST files under training/data/ are small and go along, so workers do
not download them.
"""

from __future__ import annotations

import fnmatch
import os
import tarfile
from pathlib import Path

# Directory names left out wherever they appear.
SKIP_DIRS = {
    ".git",
    ".hg",
    ".tox",
    ".nox",
    ".venv",
    "venv",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    ".ipynb_checkpoints",
    "node_modules",
}
# Directory names left out at the top of the tree only.
SKIP_TOP_DIRS = {"build", "dist", "runs", ".whl"}
# File and directory name patterns left out anywhere.
SKIP_PATTERNS = (
    "*.egg-info",
    "*.pyc",
    "*.pyo",
    ".DS_Store",
    ".env",
    "*.pem",
    "*.p12",
    "*.key",
    "*credentials*.json",
    "*service-account*.json",
    "*service_account*.json",
    "client_secret*.json",
)


def _skipped(name: str, patterns) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def select_files(root: Path, skip_paths=(), patterns=()) -> list[Path]:
    """Files under `root` (relative paths, sorted) that go to the workers.

    `skip_paths` are absolute paths left out with everything below them;
    `patterns` are extra name globs left out anywhere.
    """
    root = Path(root).resolve()
    skip = {Path(p).resolve() for p in skip_paths}
    globs = SKIP_PATTERNS + tuple(patterns)
    chosen = []
    for here, dirs, files in os.walk(root):
        base = Path(here)
        top = base == root
        dirs[:] = sorted(
            d
            for d in dirs
            if d not in SKIP_DIRS
            and not (top and d in SKIP_TOP_DIRS)
            and not _skipped(d, globs)
            and (base / d).resolve() not in skip
        )
        for f in sorted(files):
            path = base / f
            if not _skipped(f, globs) and path.resolve() not in skip:
                chosen.append(path.relative_to(root))
    return chosen


def write_tarball(
    root: Path, files: list[Path], dest: Path, extra: dict | None = None
) -> int:
    """Write a gzip tarball of `files` (relative to `root`) and of `extra`
    ({name in the tarball: local file}); returns its size."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w:gz") as tar:
        for rel in files:
            tar.add(Path(root) / rel, arcname=rel.as_posix(), recursive=False)
        for name, path in (extra or {}).items():
            tar.add(path, arcname=name, recursive=False)
    return dest.stat().st_size
