"""The sweep report from the command line: quiet, no W&B unless asked, one W&B report run per sweep,
a CSV whose columns say what they hold; and the report and sweep modules without an import circle."""
from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from llmk_lab.report import write_report
from llmk_lab.report.cli import main


def wandb_sweep(tmp_path: Path) -> Path:
    """Two jobs of one configuration whose runs logged to W&B (offline)."""
    sweep_dir = tmp_path / "2025-01-02" / "03-04-05"
    for num, seed in enumerate((0, 1)):
        run_dir = sweep_dir / str(num)
        (run_dir / ".hydra").mkdir(parents=True)
        OmegaConf.save(OmegaConf.create(["peft.r=4", f"seed={seed}"]), run_dir / ".hydra" / "overrides.yaml")
        OmegaConf.save(OmegaConf.create({"optimized_metric": "val/acc",
                                         "logger": {"kind": "wandb", "mode": "offline", "project": "p"}}),
                       run_dir / ".hydra" / "config.yaml")
        (run_dir / "metrics.json").write_text(json.dumps({"val/acc": 0.5 + 0.1 * seed, "params/trainable": 10}))
    return sweep_dir


def test_report_cli_adds_no_wandb_run_and_prints_no_wandb_lines(tmp_path, capfd):
    sweep_dir = wandb_sweep(tmp_path)
    for _ in range(2):
        assert main([str(sweep_dir)]) == 0
    out, err = capfd.readouterr()
    assert not [line for line in (out + err).splitlines() if line.lower().startswith("wandb")]
    assert not (sweep_dir / "wandb").exists()
    with (sweep_dir / "report.csv").open() as handle:
        (row,) = list(csv.DictReader(handle))
    # `n` counts the seeds; the job directories are named in `job_dirs` (not a count beside it).
    assert row["n"] == "2" and row["job_dirs"] == "0;1" and "jobs" not in row


def test_report_to_wandb_updates_one_run_per_sweep(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep_dir = wandb_sweep(tmp_path)
    for _ in range(2):
        write_report(sweep_dir, wandb=True)
    runs = sorted((sweep_dir / "wandb").glob("offline-run-*"))
    # offline-run-<YYYYMMDD_HHMMSS>-<run id>, and W&B appends -<n> when two runs start in the same second
    ids = {re.fullmatch(r"offline-run-\d{8}_\d{6}-(.+?)(?:-\d+)?", p.name).group(1) for p in runs}
    assert runs and len(ids) == 1 and ids.pop().endswith("-report")  # one run id: <group>-report
    out, err = capfd.readouterr()
    assert not [line for line in (out + err).splitlines() if line.lower().startswith("wandb")]


def test_no_import_circles_between_report_and_sweep_nor_assets_and_models():
    code = ("import sys; import llmk_lab.report; assert 'llmk_lab.sweep' not in sys.modules, 'report imports sweep'; "
            "import llmk_lab.assets; assert 'llmk_lab.models' not in sys.modules, 'assets imports models'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-1000:]


def test_a_job_that_failed_after_training_is_a_failure_not_a_result(tmp_path):
    from llmk_lab.report.collection import collect_jobs

    sweep_dir = wandb_sweep(tmp_path)
    # What run.py leaves when a stage after training raises: the figures so far, and the stage that failed.
    (sweep_dir / "1" / "metrics.json").write_text(json.dumps({"val/acc": 0.9, "failed_stage": "export",
                                                              "error": "OSError: disk full"}))
    jobs = {job.name: job for job in collect_jobs(sweep_dir)}
    assert jobs["0"].metrics and jobs["0"].failure is None
    assert jobs["1"].metrics is None and "export" in jobs["1"].failure["error"]


def test_report_csv_has_a_column_per_numeric_figure_of_each_compression_method(tmp_path):
    sweep_dir = tmp_path / "sweep"
    for num, sparsity in enumerate((0.5, 0.7)):
        run_dir = sweep_dir / str(num)
        (run_dir / ".hydra").mkdir(parents=True)
        OmegaConf.save(OmegaConf.create([f"compression.sparsity={sparsity}"]), run_dir / ".hydra" / "overrides.yaml")
        OmegaConf.save(OmegaConf.create({"optimized_metric": "val/acc"}), run_dir / ".hydra" / "config.yaml")
        (run_dir / "metrics.json").write_text(json.dumps({"val/acc": 0.8, "compression": [
            {"method": "movement", "removed_to_kept_magnitude_first_cut": sparsity, "pruned_layers": 36}]}))
    assert main([str(sweep_dir)]) == 0
    with (sweep_dir / "report.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [float(row["compression/movement/removed_to_kept_magnitude_first_cut"]) for row in rows] == [0.5, 0.7]
    assert "compression/movement/method" not in rows[0]  # only numbers
