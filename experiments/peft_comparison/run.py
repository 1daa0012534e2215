"""Every PEFT strategy on the movie-review data with MiniLM-L6, same budget.

    python experiments/peft_comparison/run.py            # all strategies, then the table
    python experiments/peft_comparison/run.py --table    # only rebuild the table from finished runs

Each strategy runs through the normal command line (`python -m llmk_lab ...`)
in its own process, one after the other: peak memory is the process's peak
RSS on CPU, which never goes down, so jobs sharing one process (a Hydra
multirun with the basic launcher) would report the largest peak so far.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
OUT = HERE / "outputs"

BUDGET = ["model=minilm", "data=movie_reviews", "compression=none", "logger=csv", "data.limit_train=320",
          "data.limit_eval=200", "train.max_epochs=1", "train.batch_size=16", "export.checkpoint=false",
          "export.adapter=false", "seed=42"]
# Learning rate per strategy: the usual order of magnitude for each method
# (fewer trained parameters -> larger steps); not tuned on this data.
STRATEGIES = {
    "linear_probe": ["train.lr=5e-3"],
    "lora": ["train.lr=1e-3"],
    # 20 optimiser steps: 4 at full rank, budget shrinking over 12, rank pattern fixed for the last 4.
    "adalora": ["train.lr=1e-3", "peft.tinit=4", "peft.tfinal=4", "peft.deltaT=2"],
    "ia3": ["train.lr=5e-3"],
    "prefix": ["train.lr=1e-2"],
    "prompt": ["train.lr=3e-2"],
    "adapter": ["train.lr=1e-3"],
    "top_layers": ["train.lr=2e-4"],
    "bitfit": ["train.lr=2e-3"],
    "full": ["train.lr=1e-4"],
}
COLUMNS = [("test/acc", "test acc", "{:.3f}"), ("val/acc", "val acc", "{:.3f}"),
           ("params/trainable", "trainable params", "{:,}"), ("params/trainable_fraction", "trainable %", "{:.3%}"),
           ("train/peak_memory_mb", "peak RSS MB", "{:.0f}"), ("train/examples_per_s", "train ex/s", "{:.1f}"),
           ("train/seconds", "train s", "{:.0f}")]


def run_strategy(name: str, extra: list[str]) -> None:
    run_dir = OUT / name
    args = [sys.executable, "-m", "llmk_lab", f"peft={name}", *BUDGET, *STRATEGIES[name], *extra,
            f"hydra.run.dir={run_dir}"]
    print("$", " ".join(args[1:]), flush=True)
    started = time.time()
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    print(f"  {name}: exit {result.returncode} after {time.time() - started:.0f} s", flush=True)
    if result.returncode != 0:
        print(result.stderr[-2000:], flush=True)


def table() -> str:
    lines = ["| strategy | lr | " + " | ".join(c[1] for c in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for name, extra in STRATEGIES.items():
        path = OUT / name / "metrics.json"
        if not path.exists():
            state = "failed" if (OUT / name / "failed.json").exists() else "not run"
            lines.append(f"| {name} | {extra[0].split('=')[1]} | " + " | ".join(state for _ in COLUMNS) + " |")
            continue
        metrics = json.loads(path.read_text())
        cells = [fmt.format(metrics[key]) for key, _, fmt in COLUMNS]
        lines.append(f"| {name} | {extra[0].split('=')[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="only print the table of finished runs")
    parser.add_argument("--only", nargs="*", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("overrides", nargs="*", help="extra llmk_lab overrides for every strategy, e.g. "
                        "data.limit_train=2000 train.max_epochs=2 (later values win)")
    args = parser.parse_args()
    if not args.table:
        for name in args.only:
            run_strategy(name, args.overrides)
    text = table()
    (HERE / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
