"""Shared helpers: compose the real config, run tiny models in-process."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# One torch thread in the test process and the runs it starts (inherited by the CLI subprocesses; hardware.threads=auto
# keeps it as the environment's limit): the tiny models gain nothing from a second thread, which costs twice the CPU
# and, on a machine shared with other jobs, many times the wall time (threads waiting on each other at every op).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from hydra import compose, initialize_config_dir

import llmk_lab.light_schemas
from llmk_lab.cli import config_dir

llmk_lab.light_schemas.register_all()
ROOT = Path(__file__).resolve().parent.parent


def _private_cache() -> Path:
    """A temporary asset cache for the whole session: the user's extracted assets are linked in
    read-only use (a fetch finds them complete and returns), everything the tests write (tokenised
    datasets, checksum markers, fetches of missing assets) goes to the temporary folder."""
    from llmk_lab.assets import cache_root

    user = cache_root()
    private = Path(tempfile.mkdtemp(prefix="llmk_lab_test_cache_"))
    (private / "assets").mkdir()
    for entry in (user / "assets").glob("*") if (user / "assets").is_dir() else []:
        if entry.is_dir() and (entry / ".complete.json").exists():
            (private / "assets" / entry.name).symlink_to(entry, target_is_directory=True)
        elif entry.suffix == ".json":
            shutil.copy(entry, private / "assets" / entry.name)
    return private


# Set before any test runs (and inherited by the CLI subprocesses), so nothing writes ~/.cache/llmk_lab;
# once per session even if this module is imported under a second name.
if "LLMK_LAB_TEST_CACHE" not in os.environ:
    os.environ["LLMK_LAB_TEST_CACHE"] = os.environ["LLMK_LAB_CACHE"] = str(_private_cache())

# Tiny, fast defaults for in-process runs: a 2-layer 32-wide BERT, a few
# hundred examples, CSV logging only.
TINY = ["model=tiny_bert", "logger=csv", "data.limit_train=64", "data.limit_eval=32", "train.batch_size=16",
        "export.checkpoint=false"]


def compose_config(overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [])


def run_config(overrides: list[str], run_dir: Path) -> dict:
    from llmk_lab.run import run

    run_dir.mkdir(parents=True, exist_ok=True)
    return run(compose_config(overrides), run_dir)


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    if Path(cwd).resolve() == ROOT:
        raise ValueError("run the CLI in a temporary directory: Hydra's outputs/ would land in the checkout")
    full_env = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run([sys.executable, "-m", "llmk_lab", *args], cwd=cwd, capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _outside_the_checkout(tmp_path_factory, monkeypatch):
    """Every test runs in its own temporary working directory: relative outputs (Hydra's `outputs/`,
    experiment presets' `outputs/...` paths) never land in the checkout."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture
def tiny():
    return list(TINY)
