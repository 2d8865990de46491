"""The documentation runs: every Python example in README.md and docs/, every
shell command there that can run offline, the script in examples/, and every
relative link in README.md.

Each page's Python blocks run in order, in one namespace, on the backend
under test, in a scratch directory. A comment just before a block may say
how it runs (keys separated by ";"):

    <!-- snippet: needs=tf_keras -->       modules that must be importable
    <!-- snippet: backends=tensorflow -->  the backends it applies to
    <!-- snippet: setup=legacy_h5 -->      files to write first (SETUPS below)
    <!-- snippet: skip=REASON -->          not run here, and why

Shell commands are the lines of indented blocks that start with a program or
an environment assignment. Each one matches a rule in COMMANDS: it runs as
written, runs as written with SHORTER appended (a training run cut to two
steps of one epoch), or is skipped with the reason given there. A command that
no rule matches fails `test_every_shell_command_has_a_rule`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
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


@pytest.mark.any_backend
def test_snippet_marks_are_known():
    for page, _, line, marks, _ in SNIPPETS:
        unknown = set(marks) - {"needs", "backends", "setup", "skip"}
        assert not unknown, f"{page.name}:{line + 1}: unknown snippet marks {unknown}"
        assert marks.get("setup", "") in {"", *SETUPS}, f"{page.name}:{line + 1}"
        assert "skip" not in marks or marks["skip"], f"{page.name}:{line + 1}: say why"


#: Runs the script in argv[1] as `python SCRIPT` does, with keras.Model.fit
#: cut to 3 batches per epoch.
_THREE_STEPS = """
import os, runpy, sys
import keras
fit = keras.Model.fit
keras.Model.fit = lambda self, *a, **kw: fit(self, *a, **kw, steps_per_epoch=3)
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(sys.argv[0])
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_example_runs(tmp_path):
    """examples/mnist_synapse.py, as a user runs it, on 3 batches per epoch."""
    env = {**os.environ, "MPLBACKEND": "Agg", "TF_CPP_MIN_LOG_LEVEL": "3"}
    script = ROOT / "examples" / "mnist_synapse.py"
    result = subprocess.run(
        [sys.executable, "-c", _THREE_STEPS, str(script)],
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


@pytest.mark.any_backend
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


@pytest.mark.any_backend
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


# ---------------------------------------------------------------- shell commands

#: Programs whose lines in an indented block make it a shell block.
PROGRAMS = (
    "pip", "python", "tox", "git", "gcloud", "mkdocs", "jupytext", "torchrun",
    "bash", "pytest",
)  # fmt: skip
_ASSIGNMENT = re.compile(r"[A-Z_][A-Z0-9_]*=\S*")
#: Appended to a full training run so that it takes seconds: one epoch of two
#: steps on a 1,000-image validation split (the script, data and outputs are
#: the ones the full run uses).
SHORTER = "--epochs 1 --steps-per-epoch 2 --val-size 1000"


def _shell_lines(text: str):
    """(line number, command) for each command of the page's indented blocks."""
    lines = text.splitlines()
    fenced, previous_blank = False, True
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            fenced = not fenced
        if fenced or not line.startswith("    ") or not previous_blank:
            previous_blank = not line.strip() or (
                previous_blank and line.startswith("    ")
            )
            i += 1
            continue
        start, command = i + 1, line[4:]
        while command.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            command = command.rstrip()[:-1] + " " + lines[i].strip()
        command = re.sub(r"\s+#\s.*$", "", command).strip()  # a trailing comment
        words = command.split()
        while words and _ASSIGNMENT.fullmatch(words[0]):
            words = words[1:]
        if words and words[0] in PROGRAMS:
            yield start, command
        i += 1


SHELL_COMMANDS = [
    (page, line, command)
    for page in PAGES
    for line, command in _shell_lines(page.read_text())
]


@dataclass(frozen=True)
class Rule:
    pattern: str  # a regular expression the whole command matches
    skip: str = ""  # why it does not run in the tests ("" : it runs)
    append: str = ""  # arguments appended when it runs
    backend: str = ""  # runs only in the environment of this Keras backend
    needs: str = ""  # a program or module it needs, else skipped


TRAIN = r"(?:\S+=\S+\s+)*python training/mnist\.py"
COMMANDS = [
    Rule(r"pip install .*&& KERAS_BACKEND=jax python training/mnist\.py",
         skip="installs packages; the training command alone runs below"),
    Rule(r"pip install .*", skip="installs packages (network); tox installs the same extras"),
    Rule(r"pip freeze \| grep .*", needs="pip"),
    Rule(r"(?:\S+=\S+ )*tox.*", skip="runs tox itself, which runs these tests"),
    Rule(r"git tag .*", skip="tags and pushes a release"),
    Rule(r"mkdocs serve", skip="a server that does not exit; tox -e docs builds the site"),
    Rule(r"gcloud .*", skip="needs Google Cloud credentials and a project"),
    Rule(r"python -m cloud\.tpu submit --rehearse .*",
         skip="the Cloud TPU rehearsal takes minutes on 2 cores; tests/test_rehearsal.py "
         "rehearses the same plan (v4-16) on shorter training"),
    Rule(r"python -m cloud\.rehearsal serve --dir \S+",
         skip="a rehearsal cloud that runs until SIGTERM; tests/test_rehearsal.py starts one"),
    Rule(r"python -m cloud\.tpu submit --rehearse-cloud .*",
         skip="needs the rehearsal cloud of `serve` running; tests/test_rehearsal.py "
         "submits detached runs to one"),
    Rule(r"python -m cloud\.tpu submit .*", skip="creates a Cloud TPU (billed)"),
    Rule(r"python -m cloud\.tpu wait .*", skip="needs a run on a Cloud TPU"),
    Rule(r".*gs://BUCKET.*", skip="needs a Cloud Storage bucket"),
    Rule(r".*NUM_GPUS.*|torchrun --nnodes.*", skip="needs GPUs or several machines"),
    Rule(r"KERAS_DISTRIBUTION_JOB_ADDRESSES=.*",
         skip="one of two processes; tests/test_multiprocess.py starts both"),
    Rule(r"KERAS_BACKEND=jax python examples/mnist_synapse\.py",
         skip="a full example run; test_example_runs runs it on 3 batches per epoch"),
    Rule(r"jupytext --to notebook examples/mnist_synapse\.py", needs="jupytext"),
    Rule(r".*python -m benchmarks\..*|bash benchmarks/gpu\.sh", skip="benchmarks take minutes (GPU: a GPU)"),
    Rule(r"KERAS_BACKEND=jax pytest .*", skip="runs part of this suite, which tox runs"),
    Rule(rf"{TRAIN} --epochs 2 --steps-per-epoch 5"),
    Rule(rf"{TRAIN} --filters 10,20 --dropout 0.5 --optimizer sgd .* --epochs 200",
         append=SHORTER),
    Rule(r"KERAS_BACKEND=torch torchrun --standalone --nproc_per_node=2 training/mnist\.py",
         append=SHORTER, needs="torchrun"),
    Rule(rf"{TRAIN}(?: --model mlp --epochs 30| --distribution auto)?", append=SHORTER),
    Rule(rf"{TRAIN} --callbacks 'keras\.callbacks:EarlyStopping\(.*\)'",
         skip="a default run with one more flag; tests/test_mnist_cli.py trains with an "
         "EarlyStopping spec given the same way"),
]  # fmt: skip


def _rule(command: str) -> Rule | None:
    return next((r for r in COMMANDS if re.fullmatch(r.pattern, command)), None)


def _backend_of(command: str) -> str:
    match = re.search(r"(?:^|\s)KERAS_BACKEND=(\w+)", command)
    return match[1] if match else ""


@pytest.mark.any_backend
def test_every_shell_command_has_a_rule():
    assert SHELL_COMMANDS, "no shell commands found"
    unmatched = [
        f"{page.relative_to(ROOT)}:{line}: {command}"
        for page, line, command in SHELL_COMMANDS
        if _rule(command) is None
    ]
    assert not unmatched, "add a rule to COMMANDS for:\n" + "\n".join(unmatched)
    # Every rule still describes a command of the docs.
    used = {_rule(command) for _, _, command in SHELL_COMMANDS}
    assert [r.pattern for r in COMMANDS if r not in used] == []


def _scratch_tree(directory: Path) -> Path:
    """The repository's runnable parts, linked into `directory` (examples/
    copied: jupytext writes next to the script), so that commands write their
    outputs there, not into the checkout."""
    for name in ("keras_synann", "training", "cloud", "benchmarks", "tests"):
        (directory / name).symlink_to(ROOT / name)
    for name in ("constraints.txt", "pyproject.toml"):
        (directory / name).symlink_to(ROOT / name)
    shutil.copytree(ROOT / "examples", directory / "examples")
    return directory


def _why_command_not(command: str, rule: Rule) -> str | None:
    if rule.skip:
        return f"not run in tests: {rule.skip}"
    backend = _backend_of(command)
    if backend and backend != keras.backend.backend():
        return f"runs in the {backend} environment"
    if (
        rule.needs
        and shutil.which(rule.needs) is None
        and (importlib.util.find_spec(rule.needs) is None)
    ):
        return f"needs {rule.needs}, not installed here"
    return None


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    sorted({command for _, _, command in SHELL_COMMANDS}),
    ids=lambda command: command[:80],
)
def test_shell_command_runs(command, tmp_path):
    rule = _rule(command)
    assert rule is not None, command
    reason = _why_command_not(command, rule)
    if reason is not None:
        pytest.skip(reason)
    cwd = _scratch_tree(tmp_path)
    full = f"{command} {rule.append}".strip()
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        # `python`, `pip`, `torchrun` are this environment's.
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "MPLBACKEND": "Agg",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONPATH": str(cwd),
    }
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", full],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, (
        f"{shlex.quote(full)} exited {result.returncode}\n"
        + result.stdout[-2000:]
        + result.stderr[-4000:]
    )
    if "training/mnist.py" in command:
        assert "test accuracy" in result.stdout.lower(), result.stdout[-2000:]
