"""environment.yml (for conda users) mirrors pyproject.toml, the source of truth."""

from __future__ import annotations

import re

import pytest
import yaml
from packaging.requirements import Requirement

from lib import ROOT

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli if installed, else the copy pip vendors
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        from pip._vendor import tomli as tomllib


def normalise(spec: str) -> str:
    """One spelling per requirement: canonical name, sorted specifiers, markers kept."""
    req = Requirement(spec)
    name = re.sub(r"[-_.]+", "-", req.name).lower()
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    specs = ",".join(sorted(str(s) for s in req.specifier))
    marker = f"; {req.marker}" if req.marker else ""
    return f"{name}{extras}{specs}{marker}"


def pyproject_requirements(pyproject: dict) -> set[str]:
    """Base dependencies plus every optional extra."""
    project = pyproject["project"]
    reqs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        reqs.extend(extra)
    return {normalise(r) for r in reqs}


def conda_pip_requirements(env: dict) -> set[str]:
    """The pip section of a conda environment file."""
    pip_lists = [d["pip"] for d in env.get("dependencies", []) if isinstance(d, dict) and "pip" in d]
    if len(pip_lists) != 1:
        raise ValueError(f"environment.yml must have exactly one pip section, found {len(pip_lists)}")
    return {normalise(r) for r in pip_lists[0]}


@pytest.fixture(scope="module")
def pyproject():
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="module")
def env():
    with open(ROOT / "environment.yml", encoding="utf-8") as f:
        return yaml.safe_load(f)


def test_pip_section_equals_pyproject(pyproject, env):
    want = pyproject_requirements(pyproject)
    have = conda_pip_requirements(env)
    assert have == want, (
        f"environment.yml drifted from pyproject.toml:\n"
        f"  only in pyproject: {sorted(want - have)}\n  only in environment.yml: {sorted(have - want)}"
    )


def test_conda_basics(pyproject, env):
    assert env["name"] == "uvm-paged-attention"
    assert env["channels"] == ["conda-forge"]
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    assert "pip" in conda
    python = [d for d in conda if d.replace(" ", "").startswith("python")]
    assert python, "environment.yml must pin python"
    # Same lower bound as pyproject's requires-python.
    assert python[0].replace(" ", "").removeprefix("python") == pyproject["project"]["requires-python"]


def test_comparison_catches_drift(pyproject):
    want = pyproject_requirements(pyproject)
    drifted = set(want)
    drifted.discard(normalise("pytest>=8.0"))
    drifted.add(normalise("pytest>=7.0"))
    assert drifted != want
    # Spelling differences are not drift.
    assert normalise("Jupyter_Book == 1.0.4.post1") == normalise("jupyter-book==1.0.4.post1")
    assert normalise("a>=1,<2") == normalise("a<2,>=1")
    with pytest.raises(ValueError, match="exactly one pip section"):
        conda_pip_requirements({"dependencies": ["python>=3.10"]})
