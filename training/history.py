"""history.csv and history.json: one row per completed epoch."""

from __future__ import annotations

import json
import os
from pathlib import Path


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write(output_dir: Path, rows: list[dict]) -> None:
    atomic_write(output_dir / "history.json", json.dumps(rows, indent=1) + "\n")
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = [",".join(keys)]
    lines += [",".join(str(row.get(k, "")) for k in keys) for row in rows]
    atomic_write(output_dir / "history.csv", "\n".join(lines) + "\n")


def read(output_dir: Path) -> list[dict]:
    path = output_dir / "history.json"
    return json.loads(path.read_text()) if path.is_file() else []
