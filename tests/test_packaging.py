"""The install is reproducible: constraints.txt pins what pyproject.toml bounds.

`make install` installs within constraints.txt so that a fresh machine gets the
environment the published figures came from; a bound changed in pyproject.toml without
a new pin would make that install fail, or pin a version the package no longer accepts.
"""

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        requirement = Requirement(line)
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"not an exact pin: {line!r}"
        pins[canonicalize_name(requirement.name)] = specifier.version
    return pins


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        lines += extra
    return [Requirement(line) for line in lines]


def test_every_declared_dependency_is_pinned_within_its_bounds():
    pins = _pins()
    for requirement in _declared():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} has no pin in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {requirement.name}=={pins[name]}, "
            f"outside pyproject.toml's {requirement.specifier}"
        )


def test_make_install_and_the_source_distribution_use_the_pins():
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()
    assert "include constraints.txt" in (ROOT / "MANIFEST.in").read_text()
