#!/usr/bin/env bash
# LoRA rank r in {1, 2, 4, 8, 16, 32} and AdaLoRA at the matched final rank budget, 3 seeds each,
# on movie-review sentiment with MiniLM-L6 (the PEFT comparison's budget and protocol).
#   bash experiments/lora_rank/sweep.sh            # SWEEP=<dir> to choose the directory
# Two commands into one sweep directory (one report covers both); seeds vary slowest, so the first
# jobs are seed 0 of every rank. Rerunning skips finished jobs (sweep.resume=true).
set -euo pipefail
SWEEP=${SWEEP:-outputs/lora_rank}
# The PEFT comparison's budget: 3,000 training sentences x 2 epochs (376 optimiser steps of 16), mean
# pooling, one torch thread per job (the same float reduction order on any machine).
BUDGET=(compression=none logger=csv data.limit_train=3000 train.max_epochs=2 train.pooling=mean hardware.threads=1
        export.checkpoint=false export.adapter=false export.model=false)
# Learning rates: the ones experiments/peft_comparison chose on validation accuracy for LoRA r=8 and
# AdaLoRA (target_r=8), kept for every rank as the LoRA paper does (alpha fixed, so the update's
# scale alpha/r shrinks as r grows; lr tuned once).
LORA_LR=${LORA_LR:-1e-3}
ADALORA_LR=${ADALORA_LR:-3e-3}

source "$(dirname "$0")/../study.sh"

study_sweep lora peft=lora "train.lr=$LORA_LR" seed=0,1,2 peft.r=1,2,4,8,16,32
# AdaLoRA at the final budget of LoRA r=8 and r=2: target_r average rank per adapted matrix, starting
# from 1.5x that (the AdaLoRA paper's ratio; the preset's 12 -> 8) and the PEFT comparison's schedule for
# 376 steps (full rank for 40 steps, budget cut every 10, final ranks fixed for the last 100).
for target in 8 2; do
    study_sweep "adalora_r${target}" peft=adalora "train.lr=$ADALORA_LR" seed=0,1,2 \
        "peft.target_r=$target" "peft.init_r=$(( target * 3 / 2 ))" peft.tinit=40 peft.tfinal=100 peft.deltaT=10
done
python -m llmk_lab.report "$SWEEP" --series peft  # LoRA over its ranks and AdaLoRA at its budgets, one line each
