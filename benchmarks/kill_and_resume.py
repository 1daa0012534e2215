"""The default run, stopped three ways and resumed, against the same run uninterrupted:
`python benchmarks/kill_and_resume.py [WORKDIR]` prints the comparison (a markdown table; README, "Runs that
survive interruptions", records it).

Each stopped run is `python -m llmk_lab` (the embedded default, a resume checkpoint every 10 steps) killed
with SIGKILL at a random training step, inside the evaluation stage and inside the export stage, then the
same command with `sweep.resume=true`; its metrics.json is compared, figure by figure, with the
uninterrupted run's (timings, throughput and paths inside the run directory aside: they are not results).
"""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ARGS = ["sweep.checkpoint_every_n_steps=10"]
NOT_RESULTS = ("time/", "wall_time_s", "run_dir", "train/examples_per_s", "train/seconds", "train/peak_memory_mb",
               "latency/", "throughput/", "data/tokenize_seconds", "data/tokenization_cache_hit", "exports",
               "compression")


def start(run_dir: Path, *extra: str) -> subprocess.Popen:
    log = open(run_dir.parent / f"{run_dir.name}.log", "a")
    return subprocess.Popen([sys.executable, "-m", "llmk_lab", *ARGS, f"hydra.run.dir={run_dir}", *extra],
                            cwd=run_dir.parent, stdout=log, stderr=subprocess.STDOUT)


def figures(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # Paths inside the run's own directory (the exported model's folder) differ by the directory's name.
    return {k: v for k, v in metrics.items()
            if not k.startswith(NOT_RESULTS) and not (isinstance(v, str) and str(run_dir) in v)}


def stage_of(run_dir: Path):
    try:
        return json.loads((run_dir / "metrics.json").read_text()).get("failed_stage")
    except (OSError, ValueError):
        return None


def main() -> None:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/fault_tolerance").resolve()
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    reference_dir = work / "uninterrupted"
    assert start(reference_dir).wait() == 0
    reference = figures(reference_dir)
    rows = []
    for when in ("train", "evaluate", "export"):
        run_dir = work / f"killed_in_{when}"
        process = start(run_dir)
        checkpoint = run_dir / "checkpoints" / "resume.ckpt"
        if when == "train":
            while not checkpoint.exists():
                time.sleep(0.05)
            time.sleep(rng.uniform(0, 60))  # a random moment of the ~90 s of training
        else:
            while stage_of(run_dir) != when:
                time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
        stopped = stage_of(run_dir) or "train"
        resumed = start(run_dir, "sweep.resume=true").wait()
        log = (work / f"{run_dir.name}.log").read_text()
        line = next((ln for ln in log.splitlines() if "resuming from" in ln), "")
        result = figures(run_dir)
        differing = sorted(k for k in set(reference) | set(result) if reference.get(k) != result.get(k))
        rows.append((when, stopped, "yes" if line else "no", resumed, len(reference), differing))
    lines = ["| killed in | stage recorded at the kill | resumed from its checkpoint | exit | figures compared |"
             " differing |", "|---|---|---|---|---|---|"]
    for when, stopped, from_checkpoint, code, n, differing in rows:
        lines.append(f"| {when} | {stopped} | {from_checkpoint} | {code} | {n} | {', '.join(differing) or 'none'} |")
    print(f"`python benchmarks/kill_and_resume.py` (test/acc of the uninterrupted run: {reference.get('test/acc')})\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
