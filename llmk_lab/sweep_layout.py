"""What a sweep directory holds and how its jobs are named: shared by the multirun callback (`sweep`)
and the report (`report`), which depend on this module and never on each other's internals.

A sweep directory holds one run directory per job (`<sweep dir>/<job number>/`)
and `sweep.json`, written when the multirun starts: which keys the sweep
varies, the metric it optimises and in which direction.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

SWEEP_FILE = "sweep.json"
# Keys that say how to run a job, not what it computes: they neither name a
# configuration nor change its fingerprint.
CONTROL_KEYS = ("sweep",)
# Words in a metric's name that mean lower is better.
LOWER_IS_BETTER = ("loss", "ppl", "perplexity", "error", "latency", "ms", "bytes", "kl")
_DATE_DIR = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def override_key(override: str) -> str:
    """`+peft.r=8` -> `peft.r`; `~compression` -> `compression`."""
    return override.split("=", 1)[0].lstrip("+~")


def is_control_key(key: str) -> bool:
    return key.split(".", 1)[0] in CONTROL_KEYS or key.startswith("hydra.")


def sweep_group(sweep_dir: str | Path) -> str:
    """W&B group of a sweep: its directory name, with the date for Hydra's `<date>/<time>` layout."""
    path = Path(sweep_dir)
    if _DATE_DIR.match(path.parent.name):
        return f"{path.parent.name}_{path.name}"
    return path.name


def read_sweep_info(sweep_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(sweep_dir) / SWEEP_FILE).read_text())
    except (OSError, ValueError):
        return {}


def infer_direction(metric: str) -> str:
    """`minimize` for losses, perplexities, errors, latencies and sizes; `maximize` otherwise."""
    name = metric.rsplit("/", 1)[-1].lower()
    return "minimize" if any(word in name for word in LOWER_IS_BETTER) else "maximize"
