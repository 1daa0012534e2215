"""Print pip constraints pinning each direct dependency of pyproject.toml (dev extra included) to the lower
bound of its range: the oldest versions the ranges claim to work with, which `.ci/lowest` then tests.

torch is left out: the CPU build is installed first, as in the README.
"""
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
requirements = project["dependencies"] + project["optional-dependencies"]["dev"]
for line in requirements:
    requirement = Requirement(line)
    lower = [s.version for s in requirement.specifier if s.operator in (">=", "==")]
    if requirement.name == "torch":
        continue
    if not lower:
        sys.exit(f"{line!r} has no lower bound: give it the oldest version tested (>=X)")
    print(f"{requirement.name}=={lower[0]}")
