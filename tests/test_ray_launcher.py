"""A sweep on a real local Ray cluster (`ray start --head`, started by the test) writes the same report as the
same sweep run job after job in one process."""
from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import run_cli

# Four jobs (2 ranks x 2 seeds) of a tiny run; one torch thread in both sweeps, since the Ray launcher gives
# each job the threads of its CPU share (hardware.threads follows hydra.launcher.num_cpus).
SWEEP = ["-m", "model=tiny_bert", "logger=none", "data.limit_train=32", "data.limit_eval=16", "train.batch_size=16",
         "export.model=false", "measure.latency_batch_sizes=[]", "seed=0,1", "peft.r=4,8"]
# Timing columns differ between any two runs; everything else is a result and must be equal.
TIMING = ("time/", "wall_time", "train/examples_per_s", "train/seconds", "train/peak_memory", "latency/",
          "data/tokenize_seconds", "job_dirs")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_cluster(tmp_path_factory):
    ray = shutil.which("ray")
    if ray is None:
        pytest.skip("Ray is not installed (pip install ray)")
    temp_dir = Path(f"/tmp/ray_test_{os.getpid()}")  # Ray's sockets live here: a short path (107-byte limit)
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    started = subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                              "--disable-usage-stats", f"--temp-dir={temp_dir}"], capture_output=True, text=True,
                             env=env, timeout=180)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, env=env, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


def report_rows(sweep_dir: Path) -> list[dict]:
    with (sweep_dir / "report.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    return [{k: v for k, v in row.items() if not k.startswith(TIMING)} for row in rows]


@pytest.mark.slow
def test_a_sweep_on_a_local_ray_cluster_reports_as_the_sequential_sweep(tmp_path: Path, ray_cluster: str):
    on_ray = run_cli([*SWEEP, "+launcher=ray", f"hydra.launcher.address={ray_cluster}",
                      "hydra.sweep.dir=on_ray"], tmp_path, env={"RAY_USAGE_STATS_ENABLED": "0"}, timeout=600)
    assert on_ray.returncode == 0, on_ray.stderr[-3000:]
    said = on_ray.stdout + on_ray.stderr
    assert "Connecting to existing Ray cluster" in said and f"Ray ({ray_cluster}) is launching 4 jobs" in said
    sequential = run_cli([*SWEEP, "hardware.threads=1", "hydra.sweep.dir=sequential"], tmp_path, timeout=600)
    assert sequential.returncode == 0, sequential.stderr[-3000:]
    assert len(list((tmp_path / "on_ray").rglob("metrics.json"))) == 4  # each job wrote its own directory
    rows = report_rows(tmp_path / "on_ray")
    assert len(rows) == 2 and all(row["n"] == "2" for row in rows)  # two ranks, each over its two seeds
    assert rows == report_rows(tmp_path / "sequential")
