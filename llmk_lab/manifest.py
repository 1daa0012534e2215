"""The manifest: everything needed to rerun a run and to know what it ran on.

Environment variables are never recorded (they hold credentials such as W&B keys).
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from llmk_lab.hardware import decisions
from llmk_lab.paths import write_text_atomically

PACKAGES = ("llmk_lab", "torch", "transformers", "peft", "pytorch-lightning", "hydra-core", "omegaconf",
            "torchmetrics", "wandb", "safetensors", "tokenizers", "torchao", "datasets", "seqeval")


def git_state(directory: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        commit = ""
    if len(commit) != 40:  # not a repository, or one without commits
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware() -> dict[str, Any]:
    import torch  # here, not at the top: the command line imports this module before any run starts

    info = {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda_available": torch.cuda.is_available()}
    info.update(decisions)
    if torch.cuda.is_available():
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda_version"] = torch.version.cuda
    return info


def build_manifest(seed: int, overrides: list[str], assets_used: dict[str, Any], data_source: dict[str, Any]) -> dict:
    return {
        "command": ["python -m llmk_lab" if sys.argv[0].endswith("__main__.py") else Path(sys.argv[0]).name,
                    *sys.argv[1:]],
        "overrides": overrides,
        "seed": seed,
        "git": git_state(Path(__file__).resolve().parent),
        "python": sys.version.split()[0],
        "packages": package_versions(),
        "hardware": hardware(),
        "assets": assets_used,
        "data": data_source,
    }


def write_json(path: Path, payload: dict) -> None:
    """Atomically: a reader (the sweep report, a resumed job) sees the old file or the new one, never half."""
    write_text_atomically(path, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
