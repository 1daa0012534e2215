"""The studies in experiments/ are scripts of `python -m llmk_lab` sweeps: every run they would launch is planned.

A study takes an hour of CPU; a key renamed in the framework (or a typo in a script) must not be found by
the study stopping at its first job of that kind. Each `experiments/*/sweep.sh` runs here with `python`
replaced by a recorder, and every recorded run's overrides are composed and planned (`llmk_lab.run.plan`,
the same check a run does before it writes anything), one value of each sweep at a time.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

STUDIES = sorted((ROOT / "experiments").glob("*/sweep.sh"))

# Stands in for `python`: records `python -m llmk_lab ARGS` (NUL after each argument, a second NUL after each
# call), records the report's arguments (one line per call) and answers a study's stage that reads a
# learning rate chosen from finished jobs (`python - ... <<PY`) with the grid's lower end.
RECORDER = r"""#!/usr/bin/env bash
if [[ $1 == -m && $2 == llmk_lab ]]; then shift 2; printf '%s\0' "$@" >> "$CALLS"; printf '\0' >> "$CALLS"; exit 0; fi
if [[ $1 == -m && $2 == llmk_lab.report ]]; then shift 2; echo "$*" >> "$REPORTS"; exit 0; fi
if [[ $1 == - ]]; then cat > /dev/null; echo 1e-3; exit 0; fi
echo "unexpected python call: $*" >&2
exit 1
"""


def recorded_runs(script: Path, scratch: Path) -> tuple[list[list[str]], list[list[str]]]:
    """The arguments of every `python -m llmk_lab` call and of every `python -m llmk_lab.report` call."""
    bin_dir = scratch / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(RECORDER)
    (bin_dir / "python").chmod(0o755)
    calls = scratch / "calls"
    calls.touch()
    reports = scratch / "reports"
    reports.touch()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls),
           "REPORTS": str(reports), "SWEEP": str(scratch / "sweep")}
    subprocess.run(["bash", str(script)], cwd=ROOT, env=env, check=True, capture_output=True, timeout=120)
    return ([call.split("\0") for call in calls.read_text().split("\0\0") if call],
            [line.split() for line in reports.read_text().splitlines()])


def one_value_at_a_time(overrides: list[str]) -> list[list[str]]:
    """The first value of every sweep, then each other value of each sweep with the rest at their first."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    first = []
    choices = []
    for override in parsed:
        key = override.get_key_element()
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else \
            [override.get_value_element_as_str()]
        first.append(f"{key}={values[0]}")
        choices.append((key, values[1:]))
    variants = [first]
    for i, (key, others) in enumerate(choices):
        variants += [first[:i] + [f"{key}={value}"] + first[i + 1:] for value in others]
    return variants


def test_every_study_has_a_sweep_script_and_a_readme():
    studies = [d for d in (ROOT / "experiments").iterdir() if d.is_dir()]
    assert studies and all((d / "README.md").exists() for d in studies)
    assert len(STUDIES) >= 5


@pytest.mark.parametrize("script", STUDIES, ids=[s.parent.name for s in STUDIES])
def test_every_run_a_study_launches_is_planned(script, tmp_path):
    from llmk_lab.matrix import compose
    from llmk_lab.light_schemas import check_values_lightly
    from llmk_lab.plan import plan

    runs, reports = recorded_runs(script, tmp_path)
    assert runs, f"{script} launched no run"
    # A report's --series is one of the keys the study's runs set (else the report refuses it, after the study).
    keys = {a.split("=", 1)[0].lstrip("+") for args in runs for a in args[1:] if "=" in a}
    for args in reports:
        if "--series" in args:
            series = args[args.index("--series") + 1]
            assert series in keys, f"{script}: report --series {series} is not a key its runs set ({sorted(keys)})"
    for args in runs:
        assert args[0] == "-m", f"{script}: a study is a sweep (python -m llmk_lab -m ...): {args}"
        overrides = [a for a in args[1:] if not a.startswith("hydra.")]  # where the jobs land
        for variant in one_value_at_a_time(overrides):
            cfg = compose(variant)
            check_values_lightly(cfg)
            plan(cfg)
