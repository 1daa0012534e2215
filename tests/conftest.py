"""Shared helpers: compose the real config, run tiny models in-process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import llmk_lab
from llmk_lab.cli import config_dir

llmk_lab.register_all()
ROOT = Path(__file__).resolve().parent.parent

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
    full_env = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run([sys.executable, "-m", "llmk_lab", *args], cwd=cwd, capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny():
    return list(TINY)
