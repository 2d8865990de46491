"""What a release relies on agrees with itself: one version, the Python versions
the package claims are the ones CI installs it on, CI runs every tox
environment, and the release workflow publishes what `tox -e package` checked.
(actionlint checks the workflows' syntax: `tox -e actionlint`.)"""

from __future__ import annotations

import configparser
import re
import tomllib
from pathlib import Path

import pytest

import keras_synann

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"

pytestmark = pytest.mark.any_backend


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _workflow(name: str) -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((WORKFLOWS / name).read_text())


def _tox_envlist() -> list[str]:
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(ROOT / "tox.ini")
    return [env.strip() for env in tox["tox"]["envlist"].split(",")]


def test_the_version_lives_in_one_place():
    project = _pyproject()
    assert "version" not in project["project"]
    assert project["project"]["dynamic"] == ["version"]
    dynamic = project["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "keras_synann.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+(?:(?:a|b|rc)\d+)?", keras_synann.__version__)
    mentions = [
        path.relative_to(ROOT)
        for path in (ROOT / "keras_synann").rglob("*.py")
        if f'"{keras_synann.__version__}"' in path.read_text()
    ]
    assert mentions == [Path("keras_synann/__init__.py")], mentions


def test_changelog_keeps_an_unreleased_section():
    text = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## (.*)$", text, re.M)
    assert headings and headings[0] == "[Unreleased]", headings
    for heading in headings[1:]:
        assert re.fullmatch(r"\[\d+\.\d+\.\d+\S*\] - \d{4}-\d{2}-\d{2}", heading)
    kinds = set(re.findall(r"^### (.*)$", text, re.M))
    allowed = {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}
    assert kinds <= allowed, kinds - allowed


def test_classifiers_name_the_pythons_ci_installs_the_wheel_on():
    project = _pyproject()["project"]
    floor = re.fullmatch(r">=3\.(\d+)", project["requires-python"])
    assert floor, project["requires-python"]
    claimed = sorted(
        c.rsplit(" :: ", 1)[1]
        for c in project["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    )
    assert claimed[0] == f"3.{floor[1]}", claimed
    jobs = _workflow("ci.yml")["jobs"]
    tested = sorted(jobs["package"]["strategy"]["matrix"]["python"])
    assert tested == claimed


def test_ci_runs_every_tox_environment():
    jobs = _workflow("ci.yml")["jobs"]
    in_ci = set()
    for job in jobs.values():
        matrix = job.get("strategy", {}).get("matrix", {})
        in_ci.update(matrix.get("env", []))
        for step in job["steps"]:
            in_ci.update(re.findall(r"tox -e ([\w-]+)", step.get("run", "")))
    missing = set(_tox_envlist()) | {"actionlint"}
    assert missing <= in_ci, missing - in_ci


def test_release_publishes_what_tox_checked_with_trusted_publishing():
    workflow = _workflow("release.yml")
    # PyYAML reads the key `on` as True.
    trigger = workflow.get("on", workflow.get(True))
    assert trigger == {"push": {"tags": ["v*"]}}
    build, publish = workflow["jobs"]["build"], workflow["jobs"]["publish"]
    runs = [step.get("run", "") for step in build["steps"]]
    assert "tox -e package -- dist" in runs
    # Each platform's wheel is built and checked on that platform.
    platforms = {e["name"] for e in build["strategy"]["matrix"]["include"]}
    assert {"linux-x86_64", "linux-aarch64", "macos-arm64", "macos-x86_64"} <= platforms
    assert any("__version__" in run and "GITHUB_REF_NAME" in run for run in runs)
    assert publish["needs"] == "build"
    assert publish["permissions"] == {"id-token": "write"}
    uses = [step.get("uses", "") for step in publish["steps"]]
    assert any(u.startswith("pypa/gh-action-pypi-publish@") for u in uses)
    # Trusted publishing: no token is handed to the action.
    assert "password" not in (WORKFLOWS / "release.yml").read_text()
