#!/usr/bin/env bash
# Pruning during fine-tuning on movie-review sentiment with MiniLM-L6: one-shot magnitude, gradual
# magnitude (cubic) and movement pruning at 50/70/90 % sparsity, full fine-tuning, 3 seeds, and the dense
# fine-tuned model beside them.
#   bash experiments/pruning_finetune/sweep.sh            # SWEEP=<dir> to choose the directory, ONLY=<names> below
# One command per method into one sweep directory (one report covers them); the schedule knobs exist only
# for the gradual methods. Seeds vary slowest, so the first jobs are seed 0 of every cell. Rerunning skips
# finished jobs (sweep.resume=true).
set -euo pipefail
SWEEP=${SWEEP:-outputs/pruning_finetune}
# The PEFT comparison's budget (3,000 sentences x 2 epochs = 376 optimiser steps, mean pooling, one torch
# thread per job) with every weight training, at full fine-tuning's learning rate chosen there on validation.
FULL_LR=${FULL_LR:-3e-4}
BUDGET=(peft=full logger=csv data.limit_train=3000 train.max_epochs=2 train.pooling=mean hardware.threads=1
        "train.lr=$FULL_LR" export.checkpoint=false export.adapter=false export.model=false)
# Gradual schedules (Zhu & Gupta's cubic ramp; movement pruning uses the same one): dense for the first
# 10 % of steps, the sparsity rises every 10 steps to its target at 70 % of training, and the last 30 % fine-tune
# at the final mask.
SCHEDULE=(compression.start_step=38 compression.end_step=263 compression.frequency=10)
# SEEDS=0 bash sweep.sh: seed 0 of every cell only.
SEEDS=${SEEDS:-0,1,2}

source "$(dirname "$0")/../study.sh"

# ONLY="gradual movement" bash sweep.sh: those methods only (two shells on disjoint lists share a machine's
# cores; the report covers whatever the directory holds).
METHODS=(dense magnitude gradual movement movement_long movement_paper movement_late movement_low)
read -r -a ONLY_METHODS <<< "${ONLY:-${METHODS[*]}}"
for name in "${ONLY_METHODS[@]}"; do
    [[ " ${METHODS[*]} " == *" $name "* ]] || { echo "ONLY=$ONLY: no method '$name' (allowed: ${METHODS[*]})" >&2; exit 2; }
done
wanted() { [[ " ${ONLY_METHODS[*]} " == *" $1 "* ]]; }

wanted dense && study_sweep dense compression=none "seed=$SEEDS"
# One-shot: the loaded model pruned once before training, the mask then kept fixed while every weight trains.
wanted magnitude && study_sweep magnitude compression=magnitude "seed=$SEEDS" compression.sparsity=0.5,0.7,0.9
wanted gradual && study_sweep gradual compression=gradual_magnitude "${SCHEDULE[@]}" "seed=$SEEDS" compression.sparsity=0.5,0.7,0.9
wanted movement && study_sweep movement compression=movement "${SCHEDULE[@]}" "seed=$SEEDS" compression.sparsity=0.5,0.7,0.9
# Movement pruning at 5x the budget (10 epochs, 1,880 steps; the same schedule in proportion: dense for the
# first 10 %, the target at 70 %), one sparsity and seed: does it leave the majority class with more steps?
wanted movement_long && study_sweep movement_long compression=movement train.max_epochs=10 compression.start_step=188 \
    compression.end_step=1316 compression.frequency=10 seed=0 compression.sparsity=0.7
# Movement pruning closer to the paper's recipe, one sparsity and seed: the top-k recomputed every step
# (frequency 1, as the reference does) at the paper's learning rate and at ours (the budget's train.lr
# replaced by the two, so that the key is given once).
wanted movement_paper && (BUDGET=("${BUDGET[@]/#train.lr=*/train.lr=3e-5,$FULL_LR}")
    study_sweep movement_paper compression=movement compression.start_step=38 compression.end_step=263 \
        compression.frequency=1 seed=0 compression.sparsity=0.7)
# Movement pruning after a dense half of training (cuts from step 188 to 338): the weights moving towards
# zero have had five times as long to get there before the first cut.
wanted movement_late && study_sweep movement_late compression=movement compression.start_step=188 \
    compression.end_step=338 compression.frequency=10 seed=0 compression.sparsity=0.7
# Movement pruning to 10 and 30 %, seed 0: smaller cuts on the same schedule (the first removes 1.3 and 3.8 %).
wanted movement_low && study_sweep movement_low compression=movement "${SCHEDULE[@]}" seed=0 compression.sparsity=0.1,0.3
python -m llmk_lab.report "$SWEEP" --series compression  # one accuracy-vs-sparsity line per method
