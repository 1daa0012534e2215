"""A sweep through the SLURM launcher (Hydra's submitit plugin, `+launcher=slurm`) on a real SLURM cluster
writes the same report as the same sweep run job after job in one process. Runs where `sinfo` answers with
a usable node (`tests/slurm/start_single_node.sh` makes one on a Debian machine); skipped elsewhere."""
from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import run_cli

SWEEP = ["-m", "model=tiny_bert", "logger=none", "data.limit_train=32", "data.limit_eval=16", "train.batch_size=16",
         "export.model=false", "measure.latency_batch_sizes=[]", "hardware.threads=1", "seed=0,1", "peft.r=4,8"]
# What each SLURM job asks for: one task with one CPU and 4 GB, no GPU (the defaults ask for a GPU node).
ON_SLURM = ["+launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.tasks_per_node=1",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=4", "hydra.launcher.timeout_min=20"]
TIMING = ("time/", "wall_time", "train/examples_per_s", "train/seconds", "train/peak_memory", "latency/",
          "data/tokenize_seconds", "job_dirs")


def slurm_partition() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return None
    answer = subprocess.run(["sinfo", "-h", "-o", "%P %T"], capture_output=True, text=True, timeout=30)
    for line in answer.stdout.splitlines():
        partition, state = line.split()[:2]
        if state.rstrip("*") in ("idle", "mixed", "allocated"):
            return partition.rstrip("*")
    return None


def report_rows(sweep_dir: Path) -> list[dict]:
    with (sweep_dir / "report.csv").open() as handle:
        return [{k: v for k, v in row.items() if not k.startswith(TIMING)} for row in csv.DictReader(handle)]


@pytest.mark.slow
def test_a_sweep_on_slurm_reports_as_the_sequential_sweep(tmp_path: Path):
    partition = slurm_partition()
    if partition is None:
        pytest.skip("no SLURM cluster answers here (sinfo); bash tests/slurm/start_single_node.sh starts one")
    on_slurm = run_cli([*SWEEP, *ON_SLURM, f"hydra.launcher.partition={partition}", "hydra.sweep.dir=on_slurm"],
                       tmp_path, timeout=900)
    assert on_slurm.returncode == 0, on_slurm.stderr[-3000:]
    # One SLURM array task (ARRAYID_TASK, with its own log folder) per sweep job.
    tasks = [p.name for p in (tmp_path / "on_slurm" / ".submitit").iterdir() if p.is_dir() and "_" in p.name]
    assert sorted(name.split("_")[1] for name in tasks) == ["0", "1", "2", "3"]
    sequential = run_cli([*SWEEP, "hydra.sweep.dir=sequential"], tmp_path, timeout=600)
    assert sequential.returncode == 0, sequential.stderr[-3000:]
    rows = report_rows(tmp_path / "on_slurm")
    assert len(rows) == 2 and all(row["n"] == "2" for row in rows)
    assert rows == report_rows(tmp_path / "sequential")
