"""A parallel sweep against the same jobs one after another: is `+launcher=parallel` worth it on this machine?

The same sweep (by default two jobs, `seed=0,1`) runs as `python -m llmk_lab -m ...` twice per repeat:
once with the default launcher (jobs in sequence, each with every core: `hardware.threads=auto`) and once
with `+launcher=parallel hydra.launcher.n_jobs=<jobs>` (jobs at once, each with cores / jobs threads). The
two kinds alternate, and which goes first alternates too, because timings on small machines drift between
identical runs. Each time is the whole command: start-up, every job, the sweep report. Every job must end
with its metrics.json; the threads each job's manifest recorded are printed, so the split is visible.

    python benchmarks/parallel_sweep.py --repeats 3
    python benchmarks/parallel_sweep.py --repeats 1 --sweep seed=0,1 -- data.limit_train=160 data.limit_eval=64 \\
        logger=none export.model=false measure.enabled=false

The figure to read is `parallel / sequential` of the median wall times (below 1: the parallel sweep is
faster). Child CPU seconds are printed too; on a machine shared with other work only an idle machine's wall
time says what a user waits.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Small jobs: a few hundred examples of the default run, nothing measured or exported beyond the metrics.
DEFAULT_OVERRIDES = ["data.limit_train=160", "data.limit_eval=64", "logger=none", "export.model=false",
                     "measure.enabled=false"]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_sweep(kind: str, overrides: list[str], sweep: str, jobs: int, workdir: Path) -> dict:
    """One sweep from the command line; its wall seconds, child CPU seconds and each job's threads."""
    sweep_dir = workdir / kind
    command = [sys.executable, "-m", "llmk_lab", "-m", *overrides, sweep, f"hydra.sweep.dir={sweep_dir}"]
    if kind == "parallel":
        command += ["+launcher=parallel", f"hydra.launcher.n_jobs={jobs}"]
    cpu, wall = _children_cpu(), time.perf_counter()
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - wall, _children_cpu() - cpu
    (workdir / f"{kind}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"{kind} sweep failed (exit {done.returncode}); its output: {workdir / f'{kind}.log'}\n"
                         + (done.stdout + done.stderr)[-2000:])
    job_dirs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    missing = [p.name for p in job_dirs if not (p / "metrics.json").exists()]
    if len(job_dirs) != jobs or missing:
        raise SystemExit(f"{kind} sweep: expected {jobs} jobs with metrics.json, found {len(job_dirs)} "
                         f"(without metrics.json: {missing}); see {sweep_dir}")
    threads = [json.loads((p / "manifest.json").read_text()).get("hardware", {}).get("threads") for p in job_dirs]
    return {"wall_s": wall, "child_cpu_s": cpu, "threads": threads}


def compare(overrides: list[str], sweep: str, repeats: int, say=print) -> dict:
    jobs = len(sweep.split("=", 1)[1].split(","))
    runs: dict[str, list[dict]] = {"sequential": [], "parallel": []}
    for repeat in range(repeats):
        order = ("sequential", "parallel") if repeat % 2 == 0 else ("parallel", "sequential")
        for kind in order:
            with tempfile.TemporaryDirectory(prefix=f"llmk_lab-{kind}-") as workdir:
                result = run_sweep(kind, overrides, sweep, jobs, Path(workdir))
            runs[kind].append(result)
            say(f"  repeat {repeat + 1} {kind:10} {result['wall_s']:7.1f} s wall, {result['child_cpu_s']:7.1f} s "
                f"child CPU, threads per job {result['threads']}")
    figures: dict = {"jobs": jobs, "sweep": sweep, "overrides": overrides, "repeats": repeats}
    for kind, results in runs.items():
        figures[f"{kind}_wall_s"] = statistics.median(r["wall_s"] for r in results)
        figures[f"{kind}_wall_runs"] = [r["wall_s"] for r in results]
        figures[f"{kind}_child_cpu_s"] = statistics.median(r["child_cpu_s"] for r in results)
        figures[f"{kind}_threads"] = results[0]["threads"]
    figures["ratio_wall"] = figures["parallel_wall_s"] / figures["sequential_wall_s"]
    say(f"  sequential median {figures['sequential_wall_s']:.1f} s, parallel median {figures['parallel_wall_s']:.1f} s "
        f"(total wall time of {jobs} jobs); parallel / sequential = {figures['ratio_wall']:.3f}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="pairs of sweeps (default 3)")
    parser.add_argument("--sweep", default="seed=0,1", help="the swept override; its values are the jobs")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("overrides", nargs="*", help=f"config overrides of every job (default: {DEFAULT_OVERRIDES})")
    args = parser.parse_args()
    if "=" not in args.sweep or "," not in args.sweep:
        parser.error(f"--sweep={args.sweep!r}: give KEY=V1,V2[,...] (one job per value)")
    figures = compare(args.overrides or DEFAULT_OVERRIDES, args.sweep, args.repeats)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
