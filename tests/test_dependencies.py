"""pyproject.toml declares ranges; constraints.txt pins the tested point inside them, and CI installs it."""
import importlib.metadata
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
RUNTIME = [Requirement(r) for r in PROJECT["dependencies"]]
TEST = [Requirement(r) for r in PROJECT["optional-dependencies"]["test"]]
# 0.x packages whose minor releases remove APIs zjax uses: each needs an upper bound.
JAX_ECOSYSTEM = {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex"}


def pins() -> dict[str, Version]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line).groups()
            out[canonicalize_name(name)] = Version(version)
    return out


def test_runtime_dependencies_are_ranges_not_pins():
    for req in RUNTIME:
        assert not any(spec.operator in ("==", "===") for spec in req.specifier), req
        assert any(spec.operator == ">=" for spec in req.specifier), f"{req} has no lower bound"
    bounded = {req.name for req in RUNTIME if any(spec.operator == "<" for spec in req.specifier)}
    assert JAX_ECOSYSTEM <= bounded


def test_constraints_pin_every_dependency_inside_its_range():
    pinned = pins()
    for req in RUNTIME + TEST:
        version = pinned.get(canonicalize_name(req.name))
        assert version is not None, f"constraints.txt does not pin {req.name}"
        assert req.specifier.contains(version), f"{req.name}=={version} is outside {req}"


def test_lower_bounds_are_the_tested_versions():
    pinned = pins()
    for req in RUNTIME:
        if req.name in JAX_ECOSYSTEM:
            (lower,) = [Version(s.version) for s in req.specifier if s.operator == ">="]
            assert lower == pinned[canonicalize_name(req.name)], req


def test_make_install_uses_the_constraints_and_this_venv_has_them():
    recipe = (ROOT / "Makefile").read_text().split("$(VENV)/.installed:")[1].split("\n\n")[0]
    assert "-c constraints.txt" in recipe and "constraints.txt" in recipe.splitlines()[0]
    pinned = pins()
    for req in RUNTIME + TEST:
        installed = Version(importlib.metadata.version(req.name))
        assert installed == pinned[canonicalize_name(req.name)], f"{req.name} {installed} is not the tested version"
