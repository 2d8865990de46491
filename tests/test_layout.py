"""The layout in docs/development.md is the tree: every path it names exists,
and every file of the packages, scripts and CI is named there."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Folders whose every file the layout names (elsewhere, the folder is enough).
EVERY_FILE = ("keras_synann", "training", "cloud", "benchmarks", "examples", ".ci")
#: Where the descriptions start: a line beginning there continues the one above.
DESCRIPTION_COLUMN = 27

pytestmark = pytest.mark.any_backend


def _layout_lines() -> list[str]:
    text = (ROOT / "docs" / "development.md").read_text()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return [line[4:] for line in section.splitlines() if line.startswith("    ")]


def named_paths() -> list[str]:
    """The paths the layout names, folders ending in "/"."""
    paths, stack = [], []  # stack: (indent, folder)
    for line in _layout_lines():
        indent = len(line) - len(line.lstrip())
        if indent + 4 >= DESCRIPTION_COLUMN:
            continue
        name = line.split()[0]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = "".join(folder for _, folder in stack) + name
        paths.append(path)
        if name.endswith("/"):
            stack.append((indent, name))
    return paths


def _tracked_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return out.splitlines()


def test_every_named_path_exists():
    missing = [path for path in named_paths() if not (ROOT / path).exists()]
    assert not missing, f"docs/development.md names missing paths: {missing}"


def test_every_file_is_named():
    named = set(named_paths())
    leaves = {p for p in named if p.endswith("/") and not any(
        q != p and q.startswith(p) for q in named
    )}  # fmt: skip

    def covered(path: str) -> bool:
        parts = path.split("/")
        folders = ["/".join(parts[:k]) + "/" for k in range(1, len(parts))]
        # In EVERY_FILE a folder covers its files only when the layout lists none
        # of them (data, results); elsewhere a named folder is enough.
        enough = leaves if parts[0] in EVERY_FILE else named
        return path in named or any(folder in enough for folder in folders)

    unnamed = [path for path in _tracked_files() if not covered(path)]
    unnamed = [p for p in unnamed if "/" in p or not p.startswith(".")]
    assert not unnamed, f"docs/development.md's layout does not name: {unnamed}"
