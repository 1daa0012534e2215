#!/usr/bin/env bash
# Compression recipes against the dense fine-tuned baseline, MiniLM-L6 on movie-review sentiment:
# accuracy, size on disk and CPU latency of each recipe's final model, all from the runs' own measurements.
#   bash experiments/compression_recipes/sweep.sh            # SWEEP=<dir> to choose the directory
# One command per recipe into one sweep directory (one report covers them), seed 0. Rerunning skips
# finished jobs (sweep.resume=true).
set -euo pipefail
SWEEP=${SWEEP:-outputs/compression_recipes}
# The PEFT comparison's budget (3,000 sentences x 2 epochs = 376 optimiser steps, mean pooling), one torch
# thread (also the thread count the latency is measured at), at the learning rates chosen there on validation.
FULL_LR=${FULL_LR:-3e-4}
LORA_LR=${LORA_LR:-1e-3}
BUDGET=(logger=csv data.limit_train=3000 train.max_epochs=2 train.pooling=mean hardware.threads=1 seed=0
        export.checkpoint=false export.adapter=false export.model=false)

source "$(dirname "$0")/../study.sh"

# The baseline: every weight fine-tuned, nothing compressed.
study_sweep dense peft=full compression=none "train.lr=$FULL_LR"
# Structured: half the attention heads and half the feed-forward neurons of every block removed before
# training (gradient importance on calibration batches), then every remaining weight fine-tuned (recovery).
study_sweep structured peft=full compression=structured compression.head_ratio=0.5 compression.neuron_ratio=0.5 \
    "train.lr=$FULL_LR"
# Distillation to half the layers: a dense teacher fine-tuned first in the same run (2 epochs), then a
# 3-block student (blocks 0, 2, 4 kept: DistilBERT's every-other-layer initialisation) trained on
# 0.5 x task loss + 0.5 x T^2 x KL(teacher || student) at temperature 2.
study_sweep distilled_3_layers peft=full compression=chain "train.lr=$FULL_LR" \
    "compression.steps=[{method: distillation, teacher_epochs: 2, teacher_lr: $FULL_LR}, {method: structured, head_ratio: 0, neuron_ratio: 0, drop_layers: [1, 3, 5]}]"
# Post-training dynamic int8 of the fine-tuned model's linear layers.
study_sweep int8 peft=full compression=dynamic_int8 "train.lr=$FULL_LR"
# Chains: prune, recover with LoRA (merged into the weights after training), quantise to int8.
study_sweep magnitude50_lora_int8 peft=lora "train.lr=$LORA_LR" compression=chain \
    "compression.steps=[{method: magnitude, sparsity: 0.5}, {method: dynamic_int8}]"
study_sweep structured_lora_int8 peft=lora "train.lr=$LORA_LR" compression=chain \
    "compression.steps=[{method: structured, head_ratio: 0.5, neuron_ratio: 0.5}, {method: dynamic_int8}]"
python -m llmk_lab.report "$SWEEP"
