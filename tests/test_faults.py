"""Runs under what clusters do to them: `kill -9` and the schedulers' signals resume exactly, a damaged resume
checkpoint restarts the job, a full disk is one line that keeps what was written, one run per run directory,
and a cache entry two jobs need at once is made once."""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import run_cli
from llmk_lab.data import RawData
from llmk_lab.data.module import ResumableRandomSampler, tokenize_cached
from llmk_lab.jobs import checkpoint_damage, resume_checkpoint_path
from llmk_lab.paths import file_lock, write_text_atomically

# A tiny job of 18 optimiser steps (3 epochs of 6 batches), a resume checkpoint at every step, one thread:
# long enough to be stopped inside each stage, short enough to run six times.
JOB = ["model=tiny_bert", "logger=none", "data.limit_train=96", "data.limit_eval=32", "train.batch_size=16",
       "train.max_epochs=3", "train.lr=1e-3", "sweep.checkpoint_every_n_steps=1", "hardware.threads=1",
       "export.checkpoint=false"]
# Every figure that must equal the uninterrupted run's (timings and throughput are not results).
RESULT_PREFIXES = ("val/", "test/", "params/", "sparsity/", "before_fit/", "size/")
RESULT_KEYS = ("train/steps", "train/examples")


def results(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "failed_stage" not in metrics, metrics.get("error")
    return {k: v for k, v in metrics.items() if k.startswith(RESULT_PREFIXES) or k in RESULT_KEYS}


def start(run_dir: Path, cwd: Path, extra: tuple = ()) -> subprocess.Popen:
    log = open(cwd / f"{run_dir.name}.log", "a")
    return subprocess.Popen([sys.executable, "-m", "llmk_lab", *JOB, f"hydra.run.dir={run_dir}", *extra], cwd=cwd,
                            stdout=log, stderr=subprocess.STDOUT, text=True)


def wait_until(condition, process: subprocess.Popen, timeout: float = 300.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.01)
    raise TimeoutError("the run never reached the moment to stop it")


def in_stage(run_dir: Path, names: tuple[str, ...]):
    def check() -> bool:
        try:
            return json.loads((run_dir / "metrics.json").read_text()).get("failed_stage") in names
        except (OSError, ValueError):
            return False
    return check


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    cwd = tmp_path_factory.mktemp("uninterrupted")
    assert start(cwd / "run", cwd).wait() == 0, (cwd / "run.log").read_text()[-3000:]
    return results(cwd / "run")


# (how it is stopped, when): inside training at a random moment after the first checkpoint, inside evaluation,
# inside export; SIGTERM and SIGUSR1 (preemption, SLURM's warning) while training; and a kill whose checkpoint
# is then truncated, as a job killed while copying it would leave it.
STOPS = [("KILL", "train"), ("KILL", "evaluate"), ("KILL", "export"), ("TERM", "train"), ("USR1", "train"),
         ("truncate", "train")]


@pytest.mark.slow
@pytest.mark.parametrize(("how", "when"), STOPS, ids=[f"{h}-{w}" for h, w in STOPS])
def test_stopped_job_resumes_to_the_uninterrupted_metrics(tmp_path: Path, uninterrupted: dict, how: str, when: str):
    run_dir = tmp_path / "run"
    process = start(run_dir, tmp_path)
    checkpoint = resume_checkpoint_path(run_dir)
    if when == "train":
        assert wait_until(checkpoint.exists, process)
        time.sleep(random.uniform(0.0, 0.3))  # a random step of the 18
    else:
        assert wait_until(in_stage(run_dir, (when,)), process)
    process.send_signal(signal.SIGKILL if how in ("KILL", "truncate") else getattr(signal, f"SIG{how}"))
    code = process.wait(timeout=120)
    stopped_in_training = not (run_dir / "metrics.json").exists()
    if how in ("TERM", "USR1") and stopped_in_training:
        # Lightning finishes the step, the resume checkpoint is written, and the job exits as interrupted.
        assert code == 143
        assert checkpoint.exists()
        assert "stopped by a signal" in (tmp_path / "run.log").read_text()
    if how == "truncate":
        assert checkpoint.exists()
        data = checkpoint.read_bytes()
        checkpoint.write_bytes(data[: len(data) // 2])
    resumed = start(run_dir, tmp_path, ("sweep.resume=true",))
    assert resumed.wait(timeout=300) == 0, (tmp_path / "run.log").read_text()[-3000:]
    log = (tmp_path / "run.log").read_text()
    if how == "truncate":
        assert "truncated or not a checkpoint" in log and "starting the job from scratch" in log
    elif stopped_in_training or when != "train":
        assert "resuming from" in log  # it continued; it did not start over
    assert results(run_dir) == uninterrupted
    assert not checkpoint.exists()  # a completed job keeps no resume checkpoint


def test_sampler_draws_torchs_order_and_resumes_mid_epoch_and_at_an_epoch_end():
    data = list(range(10))

    def batches(loader, epochs):
        return [[b.tolist() for b in loader] for _ in range(epochs)]

    def loader(state=None):
        generator = torch.Generator().manual_seed(3)
        sampler = ResumableRandomSampler(data, generator)
        if state is not None:
            sampler.load_state_dict(state)
        return sampler, DataLoader(data, batch_size=3, sampler=sampler, generator=generator)

    reference = batches(DataLoader(data, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(3)), 3)
    sampler, first = loader()
    assert batches(first, 3) == reference  # the default run's data order is unchanged

    sampler, first = loader()
    batches(first, 1)
    two_batches_in = iter(first)
    next(two_batches_in), next(two_batches_in)
    _, resumed = loader(sampler.state_dict(examples_done=6, epoch_finished=False))
    assert batches(resumed, 2) == [reference[1][2:], reference[2]]

    sampler, first = loader()
    batches(first, 1)
    _, resumed = loader(sampler.state_dict(examples_done=10, epoch_finished=True))
    assert batches(resumed, 2) == reference[1:]


def test_checkpoint_damage_reads_every_member(tmp_path: Path):
    path = tmp_path / "resume.ckpt"
    torch.save({"state_dict": {"w": torch.arange(4096.0)}, "epoch": 1}, path)
    assert checkpoint_damage(path) is None
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]))
    assert "truncated" in checkpoint_damage(path)
    middle = len(data) // 2  # inside the tensor's bytes: the archive still opens, its CRC does not match
    data[middle] ^= 0xFF
    path.write_bytes(bytes(data))
    assert "checksum" in checkpoint_damage(path)


def test_a_second_run_in_a_busy_run_directory_is_refused_and_touches_nothing(tmp_path: Path):
    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text('{"test/acc": 0.5}\n')
    with file_lock(run_dir / ".lock") as holder:
        result = run_cli(["model=tiny_bert", "logger=none", f"hydra.run.dir={run_dir}"], tmp_path, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"run directory {run_dir} is in use by another run (process {holder})" in lines[0]
    assert (run_dir / "metrics.json").read_text() == '{"test/acc": 0.5}\n'


def test_two_jobs_needing_one_tokenisation_entry_make_it_once(tmp_path: Path, monkeypatch):
    """The second job waits on the entry's lock and reads what the first wrote (flock excludes separately
    opened files even within one process, so two threads stand for two processes)."""
    monkeypatch.setenv("LLMK_LAB_CACHE", str(tmp_path))
    calls = []

    class SlowTask:
        registered_name = "slow"

        def tokenize_split(self, tokenizer, examples, data_cfg, split):
            calls.append(split)
            time.sleep(0.2)  # long enough for the other job to arrive while the entry is being made
            return [{"input_ids": torch.tensor([len(e["text"])])} for e in examples]

    tokenizer = SimpleNamespace(backend_tokenizer=None, get_vocab=lambda: {"a": 0})
    raw = RawData(splits={s: [{"text": "ab"}, {"text": "abc"}] for s in ("train", "validation", "test")}, task="t")
    data_cfg = SimpleNamespace(max_length=8, options={}, split_seed=0)
    outcomes = []

    def job():
        outcomes.append(tokenize_cached(raw, SlowTask(), tokenizer, data_cfg))

    threads = [threading.Thread(target=job) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 3  # each split tokenised once, by one of the two
    assert sorted(hit for _, hit in outcomes) == [False, True]
    first, second = (splits for splits, _ in outcomes)
    assert {k: [e["input_ids"].tolist() for e in v] for k, v in first.items()} == \
        {k: [e["input_ids"].tolist() for e in v] for k, v in second.items()}


def test_an_atomic_write_that_fails_leaves_the_old_file(tmp_path: Path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_text_atomically(path, "old\n")

    def full_disk(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("unexpected pos 43072 vs 42966")  # how torch.save reports a full file system

    from llmk_lab import paths

    monkeypatch.setattr(paths.shutil, "disk_usage", lambda _: SimpleNamespace(free=0))
    with pytest.raises(OSError) as raised:
        paths.write_atomically(path, full_disk)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(path)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left behind


@pytest.fixture
def small_filesystem(tmp_path: Path):
    """A 6 MB file system: the run's configs, manifest, checkpoints and metrics fit; its export does not."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {made.stderr.strip() or made.returncode}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def test_a_full_disk_is_one_line_and_keeps_what_was_written(tmp_path: Path, small_filesystem: Path):
    run_dir = small_filesystem / "run"
    result = run_cli(["model=tiny_bert", "logger=none", "data.limit_train=32", "data.limit_eval=16",
                      "hardware.threads=1", f"hydra.run.dir={run_dir}"], tmp_path, timeout=300)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no space left on the device writing ") and str(run_dir) in last
    assert "Traceback" not in result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())  # whole: written before the failing stage
    assert metrics["failed_stage"] == "export" and "test/acc" in metrics
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_two_sweeps_started_together_over_a_fresh_cache_match_one_sweep_alone(tmp_path: Path):
    """Both need the same tokenisation entry at the same moment: it is made once (one cache miss in all
    four jobs), neither reads it half-written, and their figures equal a sweep's that ran alone."""
    user_cache = Path(os.environ["LLMK_LAB_CACHE"])
    fresh = tmp_path / "cache"
    (fresh / "assets").mkdir(parents=True)
    for entry in (user_cache / "assets").iterdir():  # the extracted assets, not the tokenised entries
        (fresh / "assets" / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    sweep = ["-m", "model=tiny_bert", "logger=none", "data.limit_train=32", "data.limit_eval=16",
             "train.batch_size=16", "export.model=false", "hardware.threads=1", "seed=0,1"]
    env = {**os.environ, "LLMK_LAB_CACHE": str(fresh), "WANDB_MODE": "offline"}
    together = [subprocess.Popen([sys.executable, "-m", "llmk_lab", *sweep, f"hydra.sweep.dir={name}"], cwd=tmp_path,
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                for name in ("a", "b")]
    for process in together:
        assert process.wait(timeout=600) == 0, process.stderr.read()[-3000:]
    alone = run_cli([*sweep, "hydra.sweep.dir=alone"], tmp_path, env={"LLMK_LAB_CACHE": str(fresh)})
    assert alone.returncode == 0, alone.stderr[-3000:]

    def jobs(name: str) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted((tmp_path / name).glob("*/metrics.json"))]

    a, b = jobs("a"), jobs("b")
    assert len(a) == len(b) == 2
    assert sum(not job["data/tokenization_cache_hit"] for job in a + b) == 1
    entries = list((fresh / "tokenized").iterdir())
    assert [p.suffix for p in entries if p.suffix != ".lock"] == [".pt"]  # one entry, no temporary file left
    strip = [{k: v for k, v in job.items() if k.startswith(RESULT_PREFIXES) or k in RESULT_KEYS} for job in a]
    for other in (b, jobs("alone")):
        assert [{k: v for k, v in job.items() if k.startswith(RESULT_PREFIXES) or k in RESULT_KEYS}
                for job in other] == strip
