"""Framework overhead: llmk_lab's Lightning module vs a plain PyTorch loop doing the same work.

Both train the default model (MiniLM-L6 + LoRA, default data, batch size,
optimiser, schedule, gradient clipping, fp32) for the same number of steps on
the same batches, starting from the same weights. Runs are interleaved
(plain, llmk_lab, plain, llmk_lab, ...) after a warm-up, because timings on
small machines drift by 15-20 % between identical runs; the ratio of medians
is the figure to read.

    python benchmarks/overhead.py --steps 40 --repeats 3 [--threads 1] [OVERRIDES...]

The llmk_lab side trains with the callbacks a run uses (progress bar, throughput, mask keeping).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings
from itertools import islice
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader
from hydra import compose, initialize_config_dir

import llmk_lab.light_schemas
from llmk_lab.cli import config_dir
from llmk_lab.context import RunContext
from llmk_lab.data import load_data
from llmk_lab.data.module import TaskDataModule
from llmk_lab.models import load_model, load_tokenizer
from llmk_lab.module import TaskModule
from llmk_lab.plan import plan
from llmk_lab.run import build_trainer
from llmk_lab.tasks import get_task

warnings.filterwarnings("ignore")


class Clock:
    """Wall-clock and process CPU seconds of a block. On a machine shared with other work, wall time
    measures the other work too; CPU seconds (with one thread, so no thread spins while waiting) measure
    only this process's work, which is what the ratios are about."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def plain_loop(model, batches, module_for_optim) -> Clock:
    """The loop a researcher would write by hand: same optimiser groups and schedule as llmk_lab."""
    optim_cfg = module_for_optim.configure_optimizers()
    optimizer, scheduler = optim_cfg["optimizer"], optim_cfg["lr_scheduler"]["scheduler"]
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    with Clock() as clock:
        for batch in batches:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    return clock


class _LoopTimer(pl.Callback):
    """Time inside `fit` from the first to the last training step: the loop without trainer set-up."""

    def on_train_start(self, trainer, pl_module):
        self.clock = Clock().__enter__()

    def on_train_end(self, trainer, pl_module):
        self.clock.__exit__()


class _FixedSteps:
    """Gives `configure_optimizers` the step count a trainer would."""

    def __init__(self, steps):
        self.estimated_stepping_batches = steps


def compose_settings(overrides: list[str]):
    llmk_lab.light_schemas.register_all()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return plan(compose(config_name="config", overrides=["logger=none", "export.checkpoint=false",
                                                             *overrides]))


def prepared(overrides: list[str], steps: int):
    """The run's data, model (compressed before fit and adapted, as `run` does) and `steps` training batches."""
    p = compose_settings(overrides)
    s = p.settings
    pl.seed_everything(s.seed, verbose=False)
    raw = load_data(s.data)
    task = get_task(raw.task, raw.labels)
    tokenizer = load_tokenizer(s.model)
    datamodule = TaskDataModule(raw, task, tokenizer, s.data, s.train, s.seed)
    base, _ = load_model(s.model, task, tokenizer)
    ctx = RunContext(settings=s, run_dir=Path(tempfile.mkdtemp()), task=task, tokenizer=tokenizer, model=base,
                     datamodule=datamodule)
    for method in p.methods:
        method.before_fit(ctx)
    ctx.model = p.strategy.apply(ctx.model, ctx)
    batches = list(islice(iter(datamodule.train_dataloader()), steps))
    return p, ctx, batches


def run_callbacks(p, ctx) -> list:
    """The callbacks a run trains with (throughput, progress bar, mask keeping, the method's and the
    strategy's), so the framework is measured as users run it."""
    from llmk_lab import console
    from llmk_lab.masks import MaskKeeper, masked_linears
    from llmk_lab.module import ThroughputMonitor

    callbacks = [ThroughputMonitor(), console.progress_bar(), *p.strategy.callbacks(ctx)]
    if masked_linears(ctx.model):
        callbacks.append(MaskKeeper(ctx.model))
    for method in p.methods:
        callbacks.extend(method.callbacks(ctx))
    return callbacks


def framework_vs_plain(overrides: list[str], steps: int, repeats: int, say=print) -> dict:
    """Interleaved plain / llmk_lab repeats on the same batches from the same weights; medians and ratios."""
    p, ctx, batches = prepared(overrides, steps)
    s, task, adapted = p.settings, ctx.task, ctx.model
    initial = copy.deepcopy(adapted.state_dict())
    examples = sum(len(b["input_ids"]) for b in batches)

    def run_plain() -> Clock:
        adapted.load_state_dict(initial)
        module = TaskModule(adapted, task, s.train)
        module.trainer = _FixedSteps(steps)  # type: ignore[assignment]
        return plain_loop(adapted, batches, module)

    def run_lightning() -> Clock:
        adapted.load_state_dict(initial)
        module = TaskModule(adapted, task, s.train)
        module.no_decay_names = p.strategy.no_decay_parameter_names(adapted)
        module.train()
        timer = _LoopTimer()
        trainer = build_trainer(s, loggers=[], callbacks=[timer, *run_callbacks(p, ctx)], run_dir=ctx.run_dir)
        # batch_size=None: the loader hands over the prepared batches as they are.
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
        return timer.clock

    run_plain()  # warm-up (allocator, kernels)
    clocks: dict[str, list[Clock]] = {"plain": [], "llmk_lab": []}
    for r in range(repeats):
        for name in (("plain", "llmk_lab") if r % 2 == 0 else ("llmk_lab", "plain")):
            clocks[name].append(run_plain() if name == "plain" else run_lightning())
    return {"examples": examples, "steps": steps, **clock_figures(clocks, faster="plain", slower="llmk_lab")}


def clock_figures(clocks: dict[str, list[Clock]], faster: str, slower: str) -> dict:
    """Median wall and CPU seconds of each side, every repeat, and the ratio faster / slower of the medians."""
    figures: dict = {}
    for name, runs in clocks.items():
        for kind in ("wall", "cpu"):
            figures[f"{name}_{kind}_s"] = statistics.median(getattr(c, kind) for c in runs)
            figures[f"{name}_{kind}_runs"] = [getattr(c, kind) for c in runs]
    for kind in ("wall", "cpu"):
        figures[f"ratio_{kind}"] = figures[f"{faster}_{kind}_s"] / figures[f"{slower}_{kind}_s"]
    return figures


def report(figures: dict, say=print) -> None:
    n = figures["examples"]
    for name in ("plain", "llmk_lab"):
        say(f"  {name:9} examples/s median {n / figures[f'{name}_wall_s']:7.2f} wall, "
            f"{n / figures[f'{name}_cpu_s']:7.2f} per CPU second "
            f"(wall runs: {', '.join(f'{n / t:.2f}' for t in figures[f'{name}_wall_runs'])})")
    say(f"  framework / plain loop throughput: {figures['ratio_wall']:.3f} wall, {figures['ratio_cpu']:.3f} CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("overrides", nargs="*", help="config overrides (default: compression=none)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    figures = framework_vs_plain(args.overrides or ["compression=none"], args.steps, args.repeats)
    print(f"steps={args.steps} examples/run={figures['examples']} repeats={args.repeats} "
          f"threads={torch.get_num_threads()} overrides={args.overrides or ['compression=none']}")
    report(figures)


if __name__ == "__main__":
    main()
