"""Framework overhead: llmk_lab's Lightning module vs a plain PyTorch loop doing the same work.

Both train the default model (MiniLM-L6 + LoRA, default data, batch size,
optimiser, schedule, gradient clipping, fp32) for the same number of steps on
the same batches, starting from the same weights. Runs are interleaved
(plain, llmk_lab, plain, llmk_lab, ...) after a warm-up, because timings on
small machines drift by 15-20 % between identical runs; the ratio of medians
is the figure to read.

    python benchmarks/overhead.py --steps 40 --repeats 3
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

import llmk_lab
from llmk_lab.cli import config_dir
from llmk_lab.context import RunContext
from llmk_lab.data import load_data
from llmk_lab.data.module import TaskDataModule
from llmk_lab.models import load_model, load_tokenizer
from llmk_lab.module import TaskModule
from llmk_lab.run import build_trainer, plan
from llmk_lab.tasks import get_task

warnings.filterwarnings("ignore")


def plain_loop(model, batches, module_for_optim) -> float:
    """The loop a researcher would write by hand: same optimiser groups and schedule as llmk_lab."""
    optim_cfg = module_for_optim.configure_optimizers()
    optimizer, scheduler = optim_cfg["optimizer"], optim_cfg["lr_scheduler"]["scheduler"]
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    start = time.perf_counter()
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


class _LoopTimer(pl.Callback):
    """Time inside `fit` from the first to the last training step: the loop without trainer set-up."""

    def on_train_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


class _FixedSteps:
    """Gives `configure_optimizers` the step count a trainer would."""

    def __init__(self, steps):
        self.estimated_stepping_batches = steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    llmk_lab.register_all()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["logger=none", "compression=none", "export.checkpoint=false",
                                                       f"train.max_steps={args.steps}"])
    p = plan(cfg)
    s = p.settings
    pl.seed_everything(s.seed, verbose=False)
    raw = load_data(s.data)
    task = get_task(raw.task, raw.labels)
    tokenizer = load_tokenizer(s.model)
    datamodule = TaskDataModule(raw, task, tokenizer, s.data, s.train, s.seed)
    base, _ = load_model(s.model, task, tokenizer)
    ctx = RunContext(settings=s, run_dir=Path(tempfile.mkdtemp()), task=task, tokenizer=tokenizer, model=base,
                     datamodule=datamodule)
    adapted = p.strategy.apply(base, ctx)
    initial = copy.deepcopy(adapted.state_dict())
    batches = list(islice(iter(datamodule.train_dataloader()), args.steps))
    examples = sum(len(b["input_ids"]) for b in batches)

    def run_plain() -> float:
        adapted.load_state_dict(initial)
        module = TaskModule(adapted, task, s.train)
        module.trainer = _FixedSteps(args.steps)  # type: ignore[assignment]
        return plain_loop(adapted, batches, module)

    loop_seconds: list[float] = []

    def run_lightning() -> float:
        adapted.load_state_dict(initial)
        module = TaskModule(adapted, task, s.train)
        module.train()
        timer = _LoopTimer()
        trainer = build_trainer(s, loggers=[], callbacks=[timer], run_dir=ctx.run_dir)
        start = time.perf_counter()
        # batch_size=None: the loader hands over the prepared batches as they are.
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
        loop_seconds.append(timer.seconds)
        return time.perf_counter() - start

    run_plain()  # warm-up (allocator, kernels)
    times = {"plain": [], "llmk_lab": []}
    for _ in range(args.repeats):
        times["plain"].append(run_plain())
        times["llmk_lab"].append(run_lightning())
    rate = {k: examples / statistics.median(v) for k, v in times.items()}
    print(f"steps={args.steps} batch_size={s.train.batch_size} examples/run={examples} repeats={args.repeats} "
          f"threads={torch.get_num_threads()}")
    for name, values in times.items():
        print(f"{name:9} examples/s median {rate[name]:7.2f}  (runs: {', '.join(f'{examples / t:.2f}' for t in values)})")
    loop_rate = examples / statistics.median(loop_seconds)
    print(f"llmk_lab training loop only (trainer set-up excluded): examples/s median {loop_rate:7.2f}")
    print(f"ratio llmk_lab / plain: {rate['llmk_lab'] / rate['plain']:.3f} end to end, "
          f"{loop_rate / rate['plain']:.3f} for the training loop")


if __name__ == "__main__":
    main()
