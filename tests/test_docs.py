"""The documentation runs: every Python example in README.md and docs/, the
script in examples/, and every relative link in README.md.

Each page's Python blocks run in order, in one namespace, on the backend
under test, in a scratch directory. A comment just before a block may say
how it runs (keys separated by ";"):

    <!-- snippet: needs=tf_keras -->       modules that must be importable
    <!-- snippet: backends=tensorflow -->  the backends it applies to
    <!-- snippet: setup=legacy_h5 -->      files to write first (SETUPS below)
    <!-- snippet: skip=REASON -->          not run here, and why
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(
    r"(?:<!-- snippet: (?P<marks>.*?) -->\s*\n)?^```python\n(?P<code>.*?)^```",
    re.M | re.S,
)


def _marks(text: str | None) -> dict[str, str]:
    marks = {}
    for item in filter(None, (part.strip() for part in (text or "").split(";"))):
        key, _, value = item.partition("=")
        marks[key.strip()] = value.strip()
    return marks


def _snippets():
    for page in PAGES:
        text = page.read_text()
        for number, match in enumerate(BLOCK.finditer(text), start=1):
            line = text.count("\n", 0, match.start("code"))
            yield page, number, line, _marks(match["marks"]), match["code"]


SNIPPETS = list(_snippets())


def _write_legacy_h5(directory: Path) -> None:
    """reference_model.h5 and reference_weights.h5, written by tf_keras with
    the reference layer's formula and config (tests/legacy_reference.py)."""
    script = ROOT / "tests" / "legacy_reference.py"
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    subprocess.run(
        [sys.executable, str(script), str(directory)], check=True, env=env, cwd=ROOT
    )
    (directory / "legacy.h5").rename(directory / "reference_model.h5")
    (directory / "legacy_weights.h5").rename(directory / "reference_weights.h5")


SETUPS = {"legacy_h5": _write_legacy_h5}


def _why_not(marks: dict[str, str]) -> str | None:
    """Why a snippet does not run in this environment (None: it runs)."""
    if "skip" in marks:
        return f"not runnable in tests: {marks['skip']}"
    backends = [b for b in marks.get("backends", "").split(",") if b]
    if backends and keras.backend.backend() not in backends:
        return f"applies to {', '.join(backends)} only"
    missing = [
        name
        for name in marks.get("needs", "").split(",")
        if name and importlib.util.find_spec(name) is None
    ]
    if missing:
        return f"needs {', '.join(missing)}, not installed here"
    return None


#: Per page: the namespace its snippets share and the snippets run so far.
_PAGES_RUN: dict[Path, dict] = {}


def _run_page_up_to(page: Path, number: int, tmp_path_factory, monkeypatch):
    state = _PAGES_RUN.setdefault(
        page,
        {
            "namespace": {"__name__": "__snippet__"},
            "done": 0,
            "cwd": tmp_path_factory.mktemp(page.stem),
        },
    )
    monkeypatch.chdir(state["cwd"])
    for snippet_page, n, line, marks, code in SNIPPETS:
        if snippet_page != page or n <= state["done"] or n > number:
            continue
        state["done"] = n
        if _why_not(marks) is not None:
            continue
        if "setup" in marks:
            SETUPS[marks["setup"]](state["cwd"])
        source = "\n" * line + code  # tracebacks name the page's own line numbers
        exec(compile(source, str(page), "exec"), state["namespace"])


@pytest.mark.parametrize(
    "page, number, marks",
    [(page, n, marks) for page, n, _, marks, _ in SNIPPETS],
    ids=[f"{page.relative_to(ROOT)}:{line + 1}" for page, _, line, _, _ in SNIPPETS],
)
def test_snippet_runs(page, number, marks, tmp_path_factory, monkeypatch):
    reason = _why_not(marks)
    if reason is not None:
        pytest.skip(f"{page.relative_to(ROOT)} block {number}: {reason}")
    _run_page_up_to(page, number, tmp_path_factory, monkeypatch)


def test_snippet_marks_are_known():
    for page, _, line, marks, _ in SNIPPETS:
        unknown = set(marks) - {"needs", "backends", "setup", "skip"}
        assert not unknown, f"{page.name}:{line + 1}: unknown snippet marks {unknown}"
        assert marks.get("setup", "") in {"", *SETUPS}, f"{page.name}:{line + 1}"
        assert "skip" not in marks or marks["skip"], f"{page.name}:{line + 1}: say why"


@pytest.mark.slow
def test_example_runs(tmp_path):
    """examples/mnist_synapse.py, as a user runs it, on 3 batches per epoch."""
    env = {
        **os.environ,
        "SYNANN_EXAMPLE_STEPS": "3",
        "MPLBACKEND": "Agg",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "mnist_synapse.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "test accuracy:" in result.stdout
    assert "same predictions" in result.stdout
    assert (tmp_path / "beta.png").stat().st_size > 0
    assert (tmp_path / "mnist_synapse.keras").stat().st_size > 0


def _github_slug(heading: str) -> str:
    """The anchor GitHub (and mkdocs's default toc) gives a heading."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_readme_links_resolve():
    """README.md is read on the repository host, outside the mkdocs build:
    its relative links must name files that exist (and headings there)."""
    text = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (ROOT / path) if path else ROOT / "README.md"
        assert file.exists(), f"README.md links to missing {path}"
        if anchor and file.suffix == ".md":
            headings = re.findall(r"^#+ (.*)$", file.read_text(), re.M)
            slugs = {_github_slug(h) for h in headings}
            assert anchor in slugs, f"README.md links to missing #{anchor} in {path}"


NARRATION = re.compile(
    r"\b(sessions?|earlier session|before this change|this change|issue \d+)\b",
    re.I,
)


def test_documents_do_not_narrate_their_making():
    """Markdown outside data and results folders describes the project as it
    is, not how it was made."""
    skipped = {".tox", ".git", "data", "results", "node_modules", "site"}
    pages = [
        p
        for p in ROOT.rglob("*.md")
        if not skipped & set(p.relative_to(ROOT).parts[:-1])
    ]
    for page in pages:
        for number, line in enumerate(page.read_text().splitlines(), start=1):
            match = NARRATION.search(line)
            assert match is None, f"{page.relative_to(ROOT)}:{number}: {match[0]!r}"
