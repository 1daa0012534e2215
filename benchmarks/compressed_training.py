"""Compressed runs against plain ones, side by side, as ratios anyone can re-check on their machine.

1. throughput: training examples/s of LoRA on the magnitude-pruned model (masked update, so the merged
   model keeps its zeros) over LoRA on the same model unpruned; same batches, same optimiser and
   schedule, a plain loop, so only the layers differ; next to it the one product per pruned layer and
   step that any exact masked update adds, timed alone, as a share of the unpruned run, and the share
   a ratio of 0.9 allows (1/0.9 - 1);
2. stages: seconds of the stages after training (evaluation, figures, exports) over training seconds
   and over the run's wall time, read from full runs' own stage timings (`time/fit_s`,
   `time/<stage>_s`, `time/post_training_s` in metrics.json);
3. overhead: llmk_lab's Lightning loop (with a run's callbacks) over a plain PyTorch loop doing the
   same work (benchmarks/overhead.py).

Every comparison runs its two sides interleaved (A B, B A, ...) after a warm-up and reports medians of
`--repeats` runs. Wall-clock seconds and process CPU seconds are both printed: on a machine shared with
other work, wall time also measures the other work, while CPU seconds with `--threads 1` measure only
this process's work (read those there; on an idle machine the two agree in ratio).

    python benchmarks/compressed_training.py                               # all three, default run
    python benchmarks/compressed_training.py --threads 1 --only throughput --overrides peft.dropout=0.1
    python benchmarks/compressed_training.py --only stages --quick         # small runs instead of the default
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("llmk_overhead", HERE / "overhead.py")
overhead = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(overhead)

# The small run: 30 optimiser steps and a small evaluation, for a quick look at the stages.
QUICK = ["data.limit_train=480", "data.limit_eval=64"]


def say(text: str = "") -> None:
    print(text, flush=True)


def throughput(overrides: list[str], steps: int, repeats: int) -> dict:
    """Plain-loop training time of LoRA on the unpruned and on the pruned model, interleaved."""
    from llmk_lab.module import TaskModule

    sides = {"lora": ["compression=none", *overrides], "pruned+lora": ["compression=magnitude", *overrides]}
    prepared = {}
    for name, side in sides.items():
        p, ctx, batches = overhead.prepared(side, steps)
        prepared[name] = (p, ctx, batches, copy.deepcopy(ctx.model.state_dict()))

    def once(name: str):
        p, ctx, batches, initial = prepared[name]
        ctx.model.load_state_dict(initial)
        module = TaskModule(ctx.model, ctx.task, p.settings.train)
        module.trainer = overhead._FixedSteps(steps)  # type: ignore[assignment]
        return overhead.plain_loop(ctx.model, batches, module)

    for name in sides:  # warm-up
        once(name)
    clocks: dict[str, list] = {name: [] for name in sides}
    order = list(sides)
    for r in range(repeats):
        for name in (order if r % 2 == 0 else order[::-1]):
            clocks[name].append(once(name))
    examples = sum(len(b["input_ids"]) for b in prepared["lora"][2])
    figures = {"examples": examples, **overhead.clock_figures(clocks, faster="lora", slower="pruned+lora")}
    _, ctx, batches, _ = prepared["pruned+lora"]
    floor = masked_gradient_floor(ctx.model, batches, repeats)
    for kind in ("wall", "cpu"):  # both as fractions of an unpruned run: what a ratio of 0.9 allows is 1/0.9 - 1
        unpruned = figures[f"lora_{kind}_s"]
        figures[f"floor_{kind}_s"] = floor[kind]
        figures[f"floor_share_{kind}"] = floor[kind] / unpruned
        figures[f"extra_share_{kind}"] = figures[f"pruned+lora_{kind}_s"] / unpruned - 1
    return figures


def masked_gradient_floor(model, batches: list[dict], repeats: int) -> dict[str, float]:
    """Seconds of the one product a masked update needs and plain LoRA does not: the gradient of the
    masked update is the full matrix (G^T X) * M before it reaches the factors, one d_out x d_in x tokens
    matmul per pruned layer and step (the forward with W_eff and the input gradient through it cost what
    plain LoRA's forward and input gradient cost). Timed alone with the pruned layers' shapes and the
    benchmark's batches (every padded position goes through the layers); median of `repeats`."""
    from llmk_lab.masks import masked_linears

    shapes = [tuple(m.weight.shape) for m in masked_linears(model).values()]
    tokens = [int(b["input_ids"].numel()) for b in batches]
    operands = {(n, d_out, d_in): (torch.randn(n, d_out), torch.randn(n, d_in))
                for n in set(tokens) for d_out, d_in in set(shapes)}
    clocks = []
    for _ in range(repeats + 1):  # the first warms up
        with overhead.Clock() as clock:
            for n in tokens:
                for d_out, d_in in shapes:
                    grad, inputs = operands[(n, d_out, d_in)]
                    grad.t().mm(inputs)
        clocks.append(clock)
    return {kind: statistics.median(getattr(c, kind) for c in clocks[1:]) for kind in ("wall", "cpu")}


def stages(overrides: list[str], repeats: int) -> dict:
    """Full runs in this process; the share of their time spent after training, from their own timings."""
    from hydra import compose, initialize_config_dir

    import llmk_lab.light_schemas
    from llmk_lab.cli import config_dir
    from llmk_lab.run import run

    llmk_lab.light_schemas.register_all()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["logger=none", *overrides])
    runs = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as scratch:
            metrics = run(cfg, Path(scratch))
        stage_seconds = {k.removeprefix("time/").removesuffix("_s"): v for k, v in metrics.items()
                         if k.startswith("time/") and k not in ("time/fit_s", "time/post_training_s")}
        runs.append({"fit_s": metrics["time/fit_s"], "post_s": metrics["time/post_training_s"],
                     "wall_s": metrics["wall_time_s"], "stages": stage_seconds,
                     "test_acc": metrics.get("test/acc")})
    median = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    return {"runs": runs, "fit_s": median("fit_s"), "post_s": median("post_s"), "wall_s": median("wall_s"),
            "post_over_fit": statistics.median(r["post_s"] / r["fit_s"] for r in runs),
            "post_over_wall": statistics.median(r["post_s"] / r["wall_s"] for r in runs),
            "stages": {name: statistics.median(r["stages"].get(name, 0.0) for r in runs)
                       for name in runs[0]["stages"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["throughput", "stages", "overhead"], action="append",
                        help="run only these comparisons (repeatable; default: all three)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per throughput/overhead run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help=f"stages on small runs ({' '.join(QUICK)})")
    parser.add_argument("--overrides", nargs="*", default=[], help="config overrides for every side")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = args.only or ["throughput", "stages", "overhead"]
    say(f"threads={torch.get_num_threads()} repeats={args.repeats} steps={args.steps} "
        f"overrides={args.overrides} python={sys.version.split()[0]} torch={torch.__version__}")
    results: dict = {}
    if "throughput" in chosen:
        t = results["throughput"] = throughput(args.overrides, args.steps, args.repeats)
        n = t["examples"]
        say("\n1. training throughput, LoRA on the magnitude-pruned model vs on the unpruned one (plain loop)")
        for name in ("lora", "pruned+lora"):
            say(f"  {name:12} examples/s median {n / t[f'{name}_wall_s']:7.2f} wall, "
                f"{n / t[f'{name}_cpu_s']:7.2f} per CPU second")
        say(f"  pruned+lora / lora throughput: {t['ratio_wall']:.3f} wall, {t['ratio_cpu']:.3f} CPU")
        say(f"  a ratio of 0.9 allows the pruned run {1 / 0.9 - 1:.1%} more time than the unpruned one; it takes "
            f"{t['extra_share_cpu']:.1%} more (CPU; wall {t['extra_share_wall']:.1%})")
        say(f"  the masked update's own product alone, (G^T X) * M (one d_out x d_in x tokens matmul per pruned layer "
            f"and step, timed on its own): {t['floor_share_cpu']:.1%} of the unpruned run (CPU; wall "
            f"{t['floor_share_wall']:.1%}); the fused layer wins part of it back by not running LoRA's separate "
            "low-rank products")
    if "stages" in chosen:
        s = results["stages"] = stages([*(QUICK if args.quick else []), *args.overrides], args.repeats)
        say(f"\n2. stages after training ({'quick runs' if args.quick else 'the default run'}, medians)")
        say(f"  training {s['fit_s']:.1f} s, after training {s['post_s']:.1f} s, whole run {s['wall_s']:.1f} s; "
            f"test/acc {[r['test_acc'] for r in s['runs']]}")
        say("  " + ", ".join(f"{name} {sec:.1f} s" for name, sec in s["stages"].items()))
        say(f"  after-training / training seconds: {s['post_over_fit']:.3f}; "
            f"after-training / whole run: {s['post_over_wall']:.3f}")
    if "overhead" in chosen:
        o = results["overhead"] = overhead.framework_vs_plain(["compression=none", *args.overrides], args.steps,
                                                              args.repeats)
        say("\n3. llmk_lab's training loop vs a plain PyTorch loop (LoRA, unpruned)")
        overhead.report(o, say)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
