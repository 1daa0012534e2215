#!/usr/bin/env bash
# One-shot pruning of SmolLM2-135M through the framework: every method and sparsity pattern as jobs of one
# sweep directory, so one report (report.md, report.csv, plots/) covers them all.
#   nice -n 19 bash experiments/llm_pruning/sweep.sh            # SWEEP=<dir> to choose the directory
# Several commands rather than one grid because Hydra sweeps are cartesian products: the N:M pairs
# (2:4, 4:8) and the unstructured sparsities are not a product, and only the calibrated methods have
# `calibration_examples`; a multirun's base config is composed without its sweeps, so each method is its own
# command. Ordered by cost within each question: the 50 % comparison first, then N:M. Rerunning skips finished jobs
# (sweep.resume=true), so an interrupted study continues where it stopped.
set -euo pipefail
SWEEP=${SWEEP:-outputs/llm_pruning}
calibration=(compression.calibration_examples=16)
# Every job runs on one torch thread: the same float reduction order on any machine, so the same config
# gives the same perplexities, and two studies can share a 2-core machine.
BUDGET=(+experiment=smollm2_pruning hardware.threads=1)
source "$(dirname "$0")/../study.sh"
n_m() { echo "compression.sparsity=0.5 compression.prune_n=$1 compression.prune_m=$2"; }

study_sweep dense compression=none
study_sweep magnitude compression=magnitude compression.sparsity=0.5
study_sweep wanda compression=wanda "${calibration[@]}" compression.sparsity=0.5
study_sweep sparsegpt compression=sparsegpt "${calibration[@]}" compression.sparsity=0.5
study_sweep magnitude_2of4 compression=magnitude $(n_m 2 4)
# SparseGPT 50 % again with 8 calibration windows per forward pass (the preset's default is the
# evaluation batch, 4): does the batching alone move SparseGPT's result? (README, "Reproduced")
study_sweep sparsegpt_calbatch8 compression=sparsegpt "${calibration[@]}" compression.sparsity=0.5 \
    compression.calibration_batch_size=8
study_sweep magnitude_4of8 compression=magnitude $(n_m 4 8)
study_sweep wanda_2of4 compression=wanda "${calibration[@]}" $(n_m 2 4)
study_sweep wanda_4of8 compression=wanda "${calibration[@]}" $(n_m 4 8)
study_sweep sparsegpt_2of4 compression=sparsegpt "${calibration[@]}" $(n_m 2 4)
study_sweep sparsegpt_4of8 compression=sparsegpt "${calibration[@]}" $(n_m 4 8)
study_sweep magnitude_3070 compression=magnitude compression.sparsity=0.3,0.7
study_sweep wanda_3070 compression=wanda "${calibration[@]}" compression.sparsity=0.3,0.7
study_sweep sparsegpt_3070 compression=sparsegpt "${calibration[@]}" compression.sparsity=0.3,0.7
