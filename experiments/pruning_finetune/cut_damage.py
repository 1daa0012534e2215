"""Diagnostic for the movement-pruning jobs: what one cut costs, by the score that chooses it.

Runs the study's movement job (`python -m llmk_lab` with the overrides below, and any given on the command
line) up to the first step that would prune, then, on the last 12 training batches the job saw (the
model in eval mode: its own task loss, and the share of those examples given the most predicted class),
removes 0.5, 1, 2 and 5 % of every targeted matrix chosen by the movement score (lowest first), by the
score negated, at random and by |W|, restores the weights after each, prints one line per cut and stops
the job (nothing is trained further or exported).

    python experiments/pruning_finetune/cut_damage.py            # about a minute on 2 cores
"""
from __future__ import annotations

import sys

import torch

import llmk_lab.compression.movement as movement
from llmk_lab.cli import main
from llmk_lab.compression.magnitude import lowest_k_mask

# The study's budget and schedule (sweep.sh), movement pruning at 70 %, seed 0.
OVERRIDES = ["peft=full", "logger=csv", "data.limit_train=3000", "train.max_epochs=2", "train.pooling=mean",
             "train.lr=3e-4", "export.checkpoint=false", "export.adapter=false", "export.model=false",
             "compression=movement", "compression.start_step=38", "compression.end_step=263",
             "compression.frequency=10", "compression.sparsity=0.7", "seed=0",
             "hydra.run.dir=outputs/pruning_finetune_cut_damage"]
FRACTIONS = (0.005, 0.01, 0.02, 0.05)
BATCHES = 12
scheduled_start = movement.MovementScores.on_train_batch_start
recent: list[dict] = []


@torch.no_grad()
def measure(callback, pl_module) -> None:
    model = pl_module.model
    model.eval()
    saved = {name: layer.weight.detach().clone() for name, layer in callback.layers.items()}
    generator = torch.Generator().manual_seed(0)
    random = {name: torch.rand(layer.weight.shape, generator=generator) for name, layer in callback.layers.items()}
    scores = {"movement score": lambda name: callback.movement[name], "negated": lambda name: -callback.movement[name],
              "random": lambda name: random[name], "magnitude |W|": lambda name: saved[name].abs()}

    def loss() -> str:
        """Mean task loss over the batches, and the share of them given the most predicted class."""
        outputs = [model(**batch) for batch in recent]
        predicted = torch.cat([output.logits.argmax(-1) for output in outputs])
        one_class = float(torch.bincount(predicted).max()) / len(predicted)
        return f"{sum(float(output.loss) for output in outputs) / len(outputs):.3f} ({one_class:.0%} one class)"

    print(f"CUT step {pl_module.trainer.global_step}: loss on the last {len(recent)} training batches "
          f"(share given the most predicted class), no cut: {loss()}")
    for fraction in FRACTIONS:
        line = []
        for label, score in scores.items():
            for name, layer in callback.layers.items():
                layer.weight.mul_(lowest_k_mask(score(name).clone(), round(fraction * layer.weight.numel())))
            line.append(f"{label} {loss()}")
            for name, layer in callback.layers.items():
                layer.weight.copy_(saved[name])
        print(f"CUT {fraction:.1%} of each matrix: " + ", ".join(line))


def first_cut_then_stop(self, trainer, pl_module, batch, batch_idx):
    step = trainer.global_step
    recent.append({key: value.clone() for key, value in batch.items()})
    del recent[:-BATCHES]
    if step > self.settings.start_step and self.due(step):  # the first step that prunes anything
        measure(self, pl_module)
        raise SystemExit(0)
    return scheduled_start(self, trainer, pl_module, batch, batch_idx)


if __name__ == "__main__":
    movement.MovementScores.on_train_batch_start = first_cut_then_stop
    sys.argv = [sys.argv[0], *OVERRIDES, *sys.argv[1:]]
    sys.exit(main())
