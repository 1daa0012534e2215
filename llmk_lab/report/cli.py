"""`python -m llmk_lab.report SWEEP_DIR`: (re)write a sweep's report and print it."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from llmk_lab.report import __doc__ as DOC
from llmk_lab.report import write_report


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmk_lab.report", description=DOC.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun directory (outputs/multirun/<date>/<time>)")
    parser.add_argument("--metric", help="metric to optimise (default: the sweep's optimized_metric)")
    parser.add_argument("--direction", choices=("maximize", "minimize"), help="default: the sweep's, or by name")
    # Off by default: the multirun already logged its report run when it ended, and rewriting the files
    # must not add W&B runs or W&B's console output.
    parser.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=False,
                        help="also log the table and plots to the sweep's W&B report run (updated, not duplicated)")
    parser.add_argument("--series", help="a swept key (e.g. compression, peft): the plots draw one line per value "
                                         "of it, its configurations in order of the plot's x")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = write_report(args.sweep_dir, args.metric, args.direction, wandb=args.wandb, series=args.series)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result.markdown.read_text())
    print(f"wrote {result.markdown}, {result.csv}" + "".join(f", {p}" for p in result.plots))
    return 0
