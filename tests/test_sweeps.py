"""Sweeps: report tables and Pareto fronts, job naming and fingerprints, resume, and whole sweeps through the CLI."""
from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import TINY, compose_config, read_metrics, run_cli, run_config
from llmk_lab.report import aggregate, collect_jobs, infer_direction, pareto_front, write_report
from llmk_lab.jobs import resume_checkpoint_path
from llmk_lab.sweep import config_fingerprint, job_name, sweep_group, swept_keys


# --- synthetic sweep directories (quick) ------------------------------------------------------------------------

def fake_job(sweep_dir: Path, num: int, overrides: list[str], metrics: dict | None = None,
             error: str | None = None) -> Path:
    run_dir = sweep_dir / str(num)
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"optimized_metric": "val/acc", "logger": {"kind": "csv"}}),
                   run_dir / ".hydra" / "config.yaml")
    if metrics is not None:
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    if error is not None:
        (run_dir / "failed.json").write_text(json.dumps({"error": error, "type": "UserError"}))
    return run_dir


def grid_metrics(sparsity: float, r: int, seed: int) -> dict:
    # accuracy falls with sparsity, rises with rank; seeds add a known spread
    return {"val/acc": round(0.9 - 0.2 * sparsity + 0.01 * r + 0.01 * seed, 6), "test/acc": 0.5,
            "params/trainable": 1000 * r, "params/nonzero": int(10_000 * (1 - sparsity)),
            "sparsity/pruned_layers": sparsity, "latency/bs1/compressed_ms": 10 * (1 - sparsity) + r / 8,
            "train/seconds": 3.0 + seed, "data/tokenization_cache_hit": True, "run_dir": "x"}


@pytest.fixture
def synthetic_sweep(tmp_path: Path) -> Path:
    sweep_dir = tmp_path / "2025-01-02" / "03-04-05"
    num = 0
    for sparsity in (0.3, 0.6):
        for r in (4, 8):
            for seed in (0, 1, 2):
                fake_job(sweep_dir, num, ["model=tiny_bert", f"compression.sparsity={sparsity}", f"peft.r={r}",
                                          f"seed={seed}"], grid_metrics(sparsity, r, seed))
                num += 1
    fake_job(sweep_dir, num, ["model=tiny_bert", "compression.sparsity=1.5", "peft.r=4", "seed=0"],
             error="compression.sparsity=1.5 is not allowed: a number in [0, 1)")
    (sweep_dir / str(num + 1)).mkdir()  # a job that was still running when the sweep stopped
    (sweep_dir / str(num + 1) / "manifest.json").write_text(json.dumps(
        {"overrides": ["model=tiny_bert", "compression.sparsity=0.9", "peft.r=4", "seed=0"]}))
    return sweep_dir


def test_report_aggregates_seeds_lists_failures_and_plots(synthetic_sweep: Path):
    result = write_report(synthetic_sweep)
    assert result.optimized_metric == "val/acc" and result.direction == "maximize"
    # 4 configurations of 3 seeds; the failing one and the unfinished one are not rows
    assert [(r["compression.sparsity"], r["peft.r"], r["n"]) for r in result.rows] == \
        [("0.3", "4", 3), ("0.3", "8", 3), ("0.6", "4", 3), ("0.6", "8", 3)]
    row = result.rows[0]
    assert row["val/acc"] == pytest.approx(0.9 - 0.06 + 0.04 + 0.01)  # seeds 0, 1, 2 -> +0.00, +0.01, +0.02
    assert row["val/acc_std"] == pytest.approx(0.01)
    assert "train/seconds" not in result.metrics and "data/tokenization_cache_hit" not in result.metrics
    assert result.best["compression.sparsity"] == "0.3" and result.best["peft.r"] == "8"
    assert [j.name for j in result.failures] == ["12"] and [j.name for j in result.unfinished] == ["13"]

    markdown = result.markdown.read_text()
    assert "0.8900 ± 0.01" in markdown or "0.89 ± 0.01" in markdown
    assert "compression.sparsity=1.5 is not allowed" in markdown and "## Failed jobs" in markdown
    assert "Fixed overrides: `model=tiny_bert`" in markdown
    with result.csv.open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 4 and {"compression.sparsity", "peft.r", "n", "val/acc", "val/acc_std"} <= set(table[0])
    names = sorted(p.name for p in result.plots)
    assert names == ["val_acc_vs_latency.png", "val_acc_vs_nonzero_parameters.png", "val_acc_vs_sparsity.png",
                     "val_acc_vs_trainable_parameters.png"]
    assert all(p.stat().st_size > 10_000 and p.read_bytes()[:4] == b"\x89PNG" for p in result.plots)


def test_report_cli_writes_files(synthetic_sweep: Path, capsys):
    from llmk_lab.report.cli import main

    assert main([str(synthetic_sweep), "--metric", "test/acc", "--no-wandb"]) == 0
    assert "Optimised metric: `test/acc` (maximize)" in (synthetic_sweep / "report.md").read_text()
    assert main([str(synthetic_sweep / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_report_series_draws_one_line_per_value_in_x_order(synthetic_sweep: Path, capsys):
    """`--series peft.r`: each rank's configurations make one curve over sparsity, seed means with their std."""
    from llmk_lab.report.cli import main
    from llmk_lab.report.plots import series_lines

    rows = write_report(synthetic_sweep, series="peft.r").rows
    points = [(float(r["sparsity/pruned_layers"]), r) for r in reversed(rows)]  # any order in
    lines = series_lines(points, "val/acc", "peft.r")
    assert sorted(lines) == ["4", "8"]
    # r=8: sparsity 0.3 then 0.6, mean over seeds (+0.00, +0.01, +0.02) and their std
    assert lines["8"] == [pytest.approx((0.3, 0.9 - 0.06 + 0.08 + 0.01, 0.01)),
                          pytest.approx((0.6, 0.9 - 0.12 + 0.08 + 0.01, 0.01))]
    assert main([str(synthetic_sweep), "--series", "peft.rank"]) == 2
    err = capsys.readouterr().err
    assert "--series=peft.rank is not a swept key" in err and "(allowed: compression.sparsity, peft.r)" in err


def test_task_default_objective_reaches_sweep_json_and_the_report(tmp_path: Path):
    """`optimized_metric: null` (the default): the sweep cannot know the metric before a job ran, the jobs record
    their task's (here a causal LM's test/perplexity) and the report ranks by it, lower first."""
    from llmk_lab.sweep import SweepReport

    sweep_dir = tmp_path / "sweep"
    SweepReport().on_multirun_start(OmegaConf.create({"optimized_metric": None, "hydra": {
        "sweep": {"dir": str(sweep_dir)}, "sweeper": {"_target_": "basic", "params": None},
        "launcher": {"_target_": "basic"}, "overrides": {"task": ["compression.sparsity=0.3,0.6"]}}}))
    info = json.loads((sweep_dir / "sweep.json").read_text())
    assert info["optimized_metric"] is None and info["direction"] is None
    for num, (sparsity, ppl) in enumerate(((0.3, 40.0), (0.6, 90.0))):
        run_dir = fake_job(sweep_dir, num, [f"compression.sparsity={sparsity}"],
                           {"optimized_metric": "test/perplexity", "test/perplexity": ppl})
        OmegaConf.save(OmegaConf.create({"optimized_metric": None}), run_dir / ".hydra" / "config.yaml")
    result = write_report(sweep_dir, wandb=False)
    assert (result.optimized_metric, result.direction) == ("test/perplexity", "minimize")
    assert result.best["compression.sparsity"] == "0.3"


def test_pareto_front_respects_directions():
    points = [(0.3, 0.90), (0.5, 0.88), (0.7, 0.80), (0.5, 0.85), (0.3, 0.80)]
    # more sparsity is better, higher accuracy is better: (0.5, 0.85) and (0.3, 0.80) are dominated
    assert pareto_front(points, higher_x=True, higher_y=True) == [0, 1, 2]
    # fewer trainable parameters better: (100, .8) dominates (200, .8); (300, .9) is the most accurate
    assert pareto_front([(100, 0.8), (200, 0.8), (300, 0.9)], higher_x=False, higher_y=True) == [0, 2]
    assert pareto_front([(1, 2.0), (2, 1.0)], higher_x=False, higher_y=False) == [0, 1]
    assert infer_direction("val/loss") == "minimize" and infer_direction("lm/ppl") == "minimize"
    assert infer_direction("test/acc") == "maximize"


def test_seeds_of_one_configuration_group_together(tmp_path: Path):
    fake_job(tmp_path, 0, ["peft.r=4", "seed=0"], {"val/acc": 0.5})
    fake_job(tmp_path, 1, ["peft.r=4", "seed=1"], {"val/acc": 0.7})
    fake_job(tmp_path, 2, ["peft.r=4", "seed=2", "sweep.resume=true"], {"val/acc": float("nan")})
    rows = aggregate(collect_jobs(tmp_path), ["peft.r"], ["val/acc"])
    assert len(rows) == 1 and rows[0]["n"] == 3 and rows[0]["val/acc"] == pytest.approx(0.6)  # NaN left out


def test_job_names_groups_and_swept_keys(tmp_path: Path):
    assert sweep_group("outputs/multirun/2025-01-02/03-04-05") == "2025-01-02_03-04-05"
    assert sweep_group("/tmp/my_sweep") == "my_sweep"
    keys = swept_keys(["model=tiny_bert", "compression.sparsity=0.3,0.5", "+peft.r=choice(4,8)",
                       "sweep.resume=true", "hydra.sweep.dir=x"], {"train.lr": "tag(log, interval(1e-4, 1e-2))"})
    assert keys == ["compression.sparsity", "peft.r", "train.lr"]
    (tmp_path / "sweep.json").write_text(json.dumps({"swept_keys": ["compression.sparsity", "peft.r"]}))
    assert job_name(["model=tiny_bert", "compression.sparsity=0.3", "peft.r=4"], tmp_path) == \
        "compression.sparsity=0.3,peft.r=4"
    assert job_name(["model=tiny_bert", "sweep.resume=true"], None) == "model=tiny_bert"


def test_fingerprint_ignores_run_controls_only():
    base = config_fingerprint(compose_config(TINY))
    assert base == config_fingerprint(compose_config(TINY + ["sweep.resume=true", "sweep.force=true"]))
    assert base != config_fingerprint(compose_config(TINY + ["peft.r=4"]))
    assert base != config_fingerprint(compose_config(TINY + ["seed=1"]))


# One torch thread: on a shared 2-core machine this is several times faster than contending for both.
NO_MEASUREMENTS = ["measure.latency_batch_sizes=[]", "measure.size=false", "measure.fidelity=false",
                   "hardware.threads=1"]


def _crash_after_a_checkpoint(tmp_path: Path, monkeypatch, extra: tuple[str, ...] = ()) -> list[str]:
    """Run a tiny job (TINY + `extra`) that checkpoints every 2 steps and crashes at step 3 (leaving the
    step-2 checkpoint); returns its overrides, with training restored for the next attempt."""
    from llmk_lab.module import TaskModule

    overrides = TINY + ["sweep.checkpoint_every_n_steps=2", *NO_MEASUREMENTS, "export.adapter=false", *extra]
    original = TaskModule.training_step

    def crash_at_step_3(self, batch, batch_idx):
        if self.global_step == 3:
            raise RuntimeError("simulated crash")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(TaskModule, "training_step", crash_at_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_config(overrides, tmp_path)
    assert resume_checkpoint_path(tmp_path).exists()
    monkeypatch.setattr(TaskModule, "training_step", original)
    return overrides


def test_interrupted_job_resumes_from_its_checkpoint(tmp_path: Path, monkeypatch, capsys):
    """A crash at step 3 leaves the step-2 checkpoint; `sweep.resume=true` trains only the remaining steps,
    and the job's throughput counts the examples of both attempts (carried in the checkpoint)."""
    import re

    from llmk_lab.module import TaskModule

    overrides = _crash_after_a_checkpoint(tmp_path, monkeypatch)
    capsys.readouterr()
    trained_batches = []
    original = TaskModule.training_step
    monkeypatch.setattr(TaskModule, "training_step",
                        lambda self, batch, i: trained_batches.append(i) or original(self, batch, i))
    metrics = run_config(overrides + ["sweep.resume=true"], tmp_path)
    # 64 examples / batch 16 = 4 steps in all; only the 2 after the checkpoint ran again
    assert len(trained_batches) == 2 and metrics["train/steps"] == 4
    assert metrics["train/examples"] == 64 and metrics["train/examples_per_s"] > 0
    assert not resume_checkpoint_path(tmp_path).exists()  # completed: the resume checkpoint is gone
    # the resumed epoch is timed from the resume (it gets no epoch-start hook), not from the clock's origin
    seconds = re.search(r"Epoch 1/1 done in (\d+) s", capsys.readouterr().err)
    assert seconds and int(seconds.group(1)) < 120


def test_adalora_job_resumes_with_its_rank_allocator_state(tmp_path: Path, monkeypatch):
    """AdaLoRA's sensitivity averages and budget history travel in the resume checkpoint: a job interrupted
    in its rank-allocation phase continues allocating from them and reports the whole schedule."""
    import torch

    # 8 optimiser steps of 8: full budget for 1, allocation to step 6, final ranks for the last 2;
    # the crash at step 3 is in the allocation phase.
    overrides = _crash_after_a_checkpoint(tmp_path, monkeypatch, (
        "compression=none", "train.batch_size=8", "peft=adalora", "peft.init_r=6", "peft.target_r=2",
        "peft.tinit=1", "peft.tfinal=2", "peft.deltaT=1"))
    saved = torch.load(resume_checkpoint_path(tmp_path), weights_only=False)
    allocation = next(state for key, state in saved["callbacks"].items() if "RankAllocation" in key)
    assert len(allocation["budgets"]) == 2 and allocation["exp_avg_ipt"]  # the step-2 state
    from llmk_lab.peft.adalora import RankAllocation

    restored = {}
    original = RankAllocation.on_train_batch_end

    def first_step_after_resume(self, trainer, *args):
        restored.setdefault("budgets", list(self.budgets))
        restored.setdefault("scored", sorted(self.tuner.rankallocator.exp_avg_ipt))
        return original(self, trainer, *args)

    monkeypatch.setattr(RankAllocation, "on_train_batch_end", first_step_after_resume)
    metrics = run_config(overrides + ["sweep.resume=true"], tmp_path)
    assert restored["budgets"] == allocation["budgets"] and restored["scored"] == sorted(allocation["exp_avg_ipt"])
    assert metrics["train/steps"] == 8 and metrics["train/examples"] == 64
    assert metrics["peft/rank_budget_final"] == 26 and sum(metrics["peft_ranks_per_layer"].values()) == 26


def test_movement_pruning_job_resumes_with_its_masks_and_scores(tmp_path: Path, monkeypatch):
    """Movement pruning's masks, accumulated scores and schedule travel in the resume checkpoint: after a
    crash at step 3 the job continues from exactly the step-2 state, and still ends at its sparsity."""
    import torch

    from llmk_lab.compression.gradual import ScheduledPruning

    # 4 optimiser steps of 16, pruned at steps 0, 1, 2 on the way to 50 % at step 3.
    overrides = _crash_after_a_checkpoint(tmp_path, monkeypatch, (
        "peft=full", "compression=movement", "compression.sparsity=0.5", "compression.start_step=0",
        "compression.end_step=3", "compression.frequency=1"))
    saved = torch.load(resume_checkpoint_path(tmp_path), weights_only=False)
    state = next(state for key, state in saved["callbacks"].items() if "MovementScores" in key)
    assert [step for step, _ in state["history"]] == [0, 1] and state["masks"] and state["movement"]
    restored = {}
    original = ScheduledPruning.on_train_batch_start

    def first_step_after_resume(self, *args):
        restored.setdefault("state", {"history": list(self.history),
                                      "movement": {n: score.clone() for n, score in self.movement.items()},
                                      "masks": {n: layer.llmk_mask.clone() for n, layer in self.layers.items()}})
        return original(self, *args)

    monkeypatch.setattr(ScheduledPruning, "on_train_batch_start", first_step_after_resume)
    metrics = run_config(overrides + ["sweep.resume=true"], tmp_path)
    got = restored["state"]
    assert got["history"] == [tuple(entry) for entry in state["history"]]
    assert all(torch.equal(got["masks"][name], mask) for name, mask in state["masks"].items())
    assert all(torch.equal(got["movement"][name], score) for name, score in state["movement"].items())
    assert metrics["sparsity/pruned_layers"] == pytest.approx(0.5, abs=0.01)


def test_checkpoint_of_another_config_is_not_resumed(tmp_path: Path, monkeypatch):
    """A resume checkpoint written under a different config (here another learning rate) is discarded:
    the job starts over instead of continuing a different experiment's training."""
    overrides = _crash_after_a_checkpoint(tmp_path, monkeypatch)
    metrics = run_config(overrides + ["train.lr=2e-3", "sweep.resume=true"], tmp_path)
    assert metrics["train/steps"] == 4 and metrics["train/examples"] == 64  # all 4 steps, from the start


# --- whole sweeps through the CLI (slow) --------------------------------------------------------------------------

def wandb_runs(root: Path) -> list:
    """Run records (group, name, job type, config) of W&B's offline files under `root`."""
    from wandb.proto import wandb_internal_pb2

    found = []
    for path in sorted(root.glob("**/wandb/offline-run-*/run-*.wandb")):
        data, pos, chunk = path.read_bytes(), 7, b""  # leveldb-style log: 7-byte file header, 32 KiB blocks
        while pos + 7 <= len(data):
            room = 32768 - pos % 32768
            if room < 7:
                pos += room
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            chunk = data[pos + 7:pos + 7 + length] if kind in (1, 2) else chunk + data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(chunk)
                if record.WhichOneof("record_type") == "run":
                    found.append(record.run)
    return found


SWEEP_TINY = [*TINY, "data.limit_eval=16", "hardware.threads=1", "measure.fidelity=false",
              "measure.latency_batch_sizes=[1]", "measure.latency_repeats=2"]
TIMINGS = ("latency/", "throughput/")  # measured again when a job reruns: not reproducible figures


def without_timings(report_csv: Path) -> list[dict]:
    with report_csv.open() as handle:
        return [{k: v for k, v in row.items() if not k.startswith(TIMINGS)} for row in csv.DictReader(handle)]


@pytest.mark.slow
def test_grid_sweep_groups_reports_and_resumes(tmp_path: Path):
    sweep_dir = tmp_path / "grid"
    args = ["-m", *SWEEP_TINY, "logger=wandb", "compression.sparsity=0.3,0.6", "peft.r=2,4",
            f"hydra.sweep.dir={sweep_dir}"]
    done = run_cli(args, tmp_path, env={"WANDB_MODE": "offline"})
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = sorted(p for p in sweep_dir.iterdir() if p.name.isdigit())
    assert len(jobs) == 4 and all((j / "metrics.json").exists() for j in jobs)

    runs = wandb_runs(sweep_dir)
    train_runs = [r for r in runs if r.job_type == "train"]
    assert len(train_runs) == 4 and {r.run_group for r in runs} == {"grid"}
    assert sorted(r.display_name for r in train_runs) == [
        "compression.sparsity=0.3,peft.r=2", "compression.sparsity=0.3,peft.r=4",
        "compression.sparsity=0.6,peft.r=2", "compression.sparsity=0.6,peft.r=4"]
    assert [r.job_type for r in runs].count("report") == 1  # the table and plots

    with (sweep_dir / "report.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and len(list((sweep_dir / "plots").glob("*.png"))) >= 3
    report = without_timings(sweep_dir / "report.csv")
    assert any(k.startswith("latency/") for k in rows[0]) and (sweep_dir / "plots" / "test_acc_vs_latency.png").exists()

    # An interrupted sweep: job 2 never finished. Resuming reruns only that job.
    (jobs[2] / "metrics.json").unlink()
    kept = {j.name: (j / "metrics.json").stat().st_mtime_ns for j in jobs if j.name != "2"}
    resumed = run_cli([*args, "sweep.resume=true"], tmp_path, env={"WANDB_MODE": "offline"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count("it completed with the same config") + \
        resumed.stdout.count("it completed with the same config") == 3
    assert {j.name: (j / "metrics.json").stat().st_mtime_ns for j in jobs if j.name != "2"} == kept
    assert len({read_metrics(j)["config_hash"] for j in jobs}) == 4  # one fingerprint per configuration
    assert without_timings(sweep_dir / "report.csv") == report  # same as the uninterrupted sweep


@pytest.mark.slow
def test_failing_job_is_isolated_and_listed(tmp_path: Path):
    sweep_dir = tmp_path / "sweep"
    done = run_cli(["-m", *SWEEP_TINY, "compression.sparsity=0.3,0.5,0.7,1.5", f"hydra.sweep.dir={sweep_dir}"],
                   tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    with (sweep_dir / "report.csv").open() as handle:  # written by the end-of-multirun callback
        assert [row["compression.sparsity"] for row in csv.DictReader(handle)] == ["0.3", "0.5", "0.7"]
    report = (sweep_dir / "report.md").read_text()
    assert "## Failed jobs" in report and "| 3 | compression.sparsity=1.5 |" in report
    assert "compression.sparsity=1.5 is not allowed: a number in [0, 1)" in report
    assert not (sweep_dir / "3" / "metrics.json").exists()


@pytest.mark.slow
def test_submitit_launcher_runs_jobs_in_their_own_processes(tmp_path: Path):
    """submitit's local executor takes the SLURM launcher's code path: pickled jobs, one process each."""
    sweep_dir = tmp_path / "sweep"
    done = run_cli(["-m", "+launcher=submitit_local", *SWEEP_TINY, "compression.sparsity=0.5,1.5",
                    f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((sweep_dir / ".submitit").glob("*/*_log.out"))) == 2
    result = write_report(sweep_dir, wandb=False)
    assert [r["compression.sparsity"] for r in result.rows] == ["0.5"] and [j.name for j in result.failures] == ["1"]


@pytest.mark.slow
def test_optuna_preset_reports_the_best_configuration(tmp_path: Path):
    sweep_dir = tmp_path / "optuna"
    done = run_cli(["-m", "+hparams_search=optuna_tpe", *SWEEP_TINY, "hydra.sweeper.n_trials=3",
                    "hydra.sweeper.sampler.n_startup_trials=2", f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert set(best.best_params) == {"train.lr", "peft.r", "compression.sparsity"}
    report = (sweep_dir / "report.md").read_text()
    assert "Optimised metric: `val/acc` (maximize)" in report and "**Best configuration**" in report
    assert "Optuna's best trial" in report
    values = [read_metrics(sweep_dir / str(i))["val/acc"] for i in range(3)]
    assert best.best_value == pytest.approx(max(values))


def test_diverged_loss_fails_the_job(tmp_path: Path):
    with pytest.raises(FloatingPointError, match="train/loss is (nan|inf)"):
        run_config(TINY + [*NO_MEASUREMENTS, "train.lr=1e30", "train.grad_clip=null"], tmp_path)
    assert not (tmp_path / "metrics.json").exists()
