"""Every measured figure in README.md and docs/ comes from a results file.

Each entry of FIGURES renders doc text from a file under benchmarks/results/;
the test fails when the page no longer contains that text (the doc and its
results file disagree), when the page does not name the file, or when the file
does not record its machine, versions, command, commit and date. The scan then
finds figure-like tokens (percentages, ratios such as 4.0x, times) in the pages
and fails on any that no figure covers and NOT_MEASURED does not explain.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
METADATA = ("machine", "versions", "command", "commit", "date")

pytestmark = pytest.mark.any_backend


@dataclass(frozen=True)
class Figure:
    page: str
    results: str
    render: Callable[[dict], list[str]]  # the results file -> the doc's lines


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def _wall(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def _default_runs(data):
    return [
        f"| {r['backend']} | {_wall(r['wall_seconds'])} | {_pct(r['test_accuracy'])} |"
        for r in data["rows"]
    ]


def _accuracy_rows(data):
    return [
        f"| {r['model']} | {r['backend']} | {_pct(r['val_accuracy'])} "
        f"| {_pct(r['test_accuracy'])} |"
        for r in data["rows"]
    ]


def _layer_rows(data):
    rows = {}
    for r in data["rows"]:
        if r["n"] == 784:
            rows[r["backend"], r["implementation"]] = r
    return rows


def _layer_table(data):
    lines = []
    for (backend, impl), r in _layer_rows(data).items():
        label = "cpu (auto)" if impl == "cpu" else impl
        lines.append(
            f"| {backend} | {label} | {r['synapse_ms']:.2f} | {r['dense_ms']:.2f} "
            f"| {r['ratio']:.1f}x |"
        )
    return lines


def _layer_sentence(data):
    rows = _layer_rows(data)
    ratio = {b: rows[b, "cpu"]["ratio"] for b in ("torch", "tensorflow", "jax")}
    return [
        f"{ratio['torch']:.1f} (torch), {ratio['tensorflow']:.1f} (tensorflow) and "
        f"{ratio['jax']:.1f} (jax) times"
    ]


def _series_errors(data):
    by_beta: dict[float, dict[int, dict]] = {}
    for e in data["errors"]:
        by_beta.setdefault(e["beta_max"], {})[e["order"]] = e
    return [
        f"| {beta} | "
        + " | ".join(
            f"{orders[k]['max_abs_error']:.1e} ({orders[k]['max_bound']:.1e})"
            for k in (1, 2, 3, 4, 6)
        )
        + " |"
        for beta, orders in by_beta.items()
    ]


def _reference(data, about=()):
    return [
        ("about " if row["model"] in about else "") + _pct(row["test_accuracy"])
        for row in data["rows"]
    ]


def _example(data):
    return [_pct(data["rows"][0]["test_accuracy"])]


def _cell(value) -> str:
    return value if isinstance(value, str) else f"{value:.1e}"


def derivative_tables(data):
    """The per-backend error tables of docs/layer.md, "Derivatives and transforms"."""
    lines = []
    for result in data["results"]:
        names = list(result["columns"])
        lines.append(f"**{result['backend']}**")
        lines.append("| transform | " + " | ".join(f"`{n}`" for n in names) + " |")
        lines.append("|---" * (len(names) + 1) + "|")
        for transform in result["columns"][names[0]]:
            cells = [_cell(result["columns"][n][transform]) for n in names]
            lines.append(f"| {transform} | " + " | ".join(cells) + " |")
    return lines


def largest_derivative_error(data):
    """docs/layer.md's summary: the largest error of any transform (not a refusal)."""
    errors = [
        value
        for result in data["results"]
        for column in result["columns"].values()
        for value in column.values()
        if not isinstance(value, str)
    ]
    return [f"at most {max(errors):.1e}"]


def penalty_table(data):
    """docs/performance.md's gradient-penalty cost table: the measured tree's
    rows of derivatives.json (--compare adds other trees' rows)."""
    rows = {}
    for r in data["rows"]:
        if not r.get("tree", "(this tree)").endswith("(this tree)"):
            continue
        if r["what"] == "gradient penalty":
            rows.setdefault(r["backend"], {}).update(
                ms=r["synapse_ms"], dense=r["dense_ms"], ratio=r["ratio"]
            )
        elif r["what"].startswith("penalty peak MB"):
            rows.setdefault(r["backend"], {}).update(
                mb=r["synapse_mb"], dmb=r["dense_mb"]
            )
    return [
        f"| {b} | {v['ms']:.1f} ms | {v['dense']:.1f} ms | {v['ratio']:.1f}x "
        f"| {v['mb']:.0f} MB | {v['dmb']:.0f} MB |"
        for b, v in rows.items()
    ]


def cloud_bounds(data):
    """docs/cloud-tpu.md's table of the time from each fault to the DELETE."""
    return [
        f"| {r['fault']} | {r['from']} | {r['deleted_by']} | {r['seconds']:.1f} |"
        for r in data["rows"]
    ]


def _level_label(row) -> str:
    if row["config"] == "ops":
        return "`ops`"
    origin = row["build"]["origin"]
    return f"`{row['config']}` ({origin})"


def levels_table(data):
    """docs/performance.md's per-level table: the layer against Dense (levels.json)."""
    return [
        f"| {r['backend']} | {_level_label(r)} | {r['first']['synapse_ms']:.1f} "
        f"| {r['first']['dense_ms']:.1f} | {r['first']['ratio']:.1f}x "
        f"| {r['penalty']['ratio']:.1f}x |"
        for r in data["rows"]
    ]


def levels_builds(data):
    """docs/performance.md's build times per level (levels.json)."""
    seconds = data["builds_s"]
    return [
        f"| `{level}` | {seconds[f'{level} loops']:.1f} s "
        f"| {seconds[f'{level} xla_ffi']:.1f} s |"
        for level in [*data["levels"], "native"]
    ]


def levels_busy(data):
    """docs/performance.md's slowdowns with one core taken (levels_busy.json
    against the quiet levels.json): busy ms over quiet ms, Synapse and Dense."""
    quiet = {(r["backend"], r["config"]): r for r in _load("levels.json")["rows"]}

    def slowdown(row, step, layer):
        before = quiet[row["backend"], row["config"]][step][f"{layer}_ms"]
        return f"{row[step][f'{layer}_ms'] / before:.2f}x"

    return [
        f"| {r['backend']} | {_level_label(r)} | {slowdown(r, 'first', 'synapse')} "
        f"| {slowdown(r, 'first', 'dense')} | {slowdown(r, 'penalty', 'synapse')} "
        f"| {slowdown(r, 'penalty', 'dense')} |"
        for r in data["rows"]
    ]


def levels_mnist(data):
    """docs/performance.md's MNIST epochs, auto against ops (levels.json)."""
    return [
        f"| {r['backend']} | {r['auto_s']:.1f} s | {r['ops_s']:.1f} s "
        f"| {r['auto_over_ops']:.2f} |"
        for r in data["mnist"]
    ]


FIGURES = [
    Figure("docs/cloud-tpu.md", "cloud_bounds.json", cloud_bounds),
    Figure("docs/example.md", "example_mnist_synapse.json", _example),
    Figure("examples/mnist_synapse.py", "example_mnist_synapse.json", _example),
    Figure("docs/training.md", "mnist_default_runs_epyc.json", _default_runs),
    Figure("docs/training.md", "mnist.json", _accuracy_rows),
    Figure("docs/training.md", "mnist-tf-torch.json", _accuracy_rows),
    Figure(
        "docs/training.md",
        "reference.json",
        lambda d: _reference(d, about={"PyTorch LeNet-style"}),
    ),
    Figure("README.md", "reference.json", lambda d: ["about " + _pct(0.9904)]),
    Figure("docs/performance.md", "layer_sweep.json", _layer_table),
    Figure("docs/performance.md", "levels.json", levels_table),
    Figure("docs/performance.md", "levels.json", levels_builds),
    Figure("docs/performance.md", "levels.json", levels_mnist),
    Figure("docs/performance.md", "levels_mnist_avx2.json", levels_mnist),
    Figure("docs/performance.md", "levels_busy.json", levels_busy),
    Figure("README.md", "layer_sweep.json", _layer_sentence),
    Figure("docs/layer.md", "series_jax.json", _series_errors),
    Figure("docs/development.md", "derivative_errors.json", derivative_tables),
    Figure("docs/layer.md", "derivative_errors.json", largest_derivative_error),
    Figure("docs/performance.md", "derivatives.json", penalty_table),
]

#: Figure-like tokens that are settings or definitions, not measurements.
NOT_MEASURED = {
    ("docs/training.md", "1%"): "the cosine schedule's floor, a setting",
    ("docs/training.md", "40%"): "the step schedule's milestones, a setting",
    ("docs/training.md", "80%"): "the step schedule's milestones, a setting",
    ("docs/training.md", "600 s"): "the stall watchdog's first-step bound, a setting",
    ("docs/training.md", "60 s"): "the stall watchdog's floor, a setting",
    ("docs/training.md", "30 s"): "Compute Engine's documented preemption notice",
    ("docs/cloud-tpu.md", "4 min"): "a sum of the tool's time limits, settings",
}

_TOKEN = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:%|x\b| min(?: \d+ s)?\b| ms\b| s\b)")


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _prose(page: Path) -> str:
    """The page without its fenced code blocks (tolerances in examples)."""
    text = page.read_text()
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def _squash(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize(
    "figure", FIGURES, ids=[f"{f.page}<-{f.results}" for f in FIGURES]
)
def test_the_doc_shows_what_its_results_file_holds(figure):
    data = _load(figure.results)
    missing = [key for key in METADATA if not data.get(key)]
    assert not missing, f"{figure.results} does not record {missing}"
    text = _squash((ROOT / figure.page).read_text())
    assert figure.results in text, f"{figure.page} does not name {figure.results}"
    for line in figure.render(data):
        assert _squash(line) in text, f"{figure.page}: {line!r} ({figure.results})"


def test_every_figure_in_the_docs_has_a_results_file():
    covered: dict[str, list[str]] = {}
    for figure in FIGURES:
        covered.setdefault(figure.page, []).extend(figure.render(_load(figure.results)))
    unexplained = []
    for page in PAGES:
        name = str(page.relative_to(ROOT))
        for number, line in enumerate(_prose(page).splitlines(), start=1):
            for token in _TOKEN.findall(line):
                if (name, token) in NOT_MEASURED:
                    continue
                if any(token in text for text in covered.get(name, [])):
                    continue
                unexplained.append(f"{name}:{number}: {token!r} in {line.strip()!r}")
    assert not unexplained, "figures without a results file:\n" + "\n".join(unexplained)
