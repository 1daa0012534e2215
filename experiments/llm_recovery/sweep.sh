#!/usr/bin/env bash
# Compressed SmolLM2-135M judged and recovered: one-shot pruning (Wanda, SparseGPT; uniform and OWL), ShortGPT
# layer dropping, each evaluated before and after LoRA recovery on the next-token loss (masks kept), with
# perplexity and the offline lm-eval tasks. One sweep directory, one report.
#   bash experiments/llm_recovery/sweep.sh             # SWEEP=<dir>, ONLY=<names> (below), SEEDS=0,1,2
# Rerunning skips finished jobs (sweep.resume=true). Two shells on disjoint ONLY lists share a 2-core machine.
set -euo pipefail
SWEEP=${SWEEP:-outputs/llm_recovery}
SEEDS=${SEEDS:-0}
source "$(dirname "$0")/../study.sh"

NAMES=(owl dense qlora recovery drop)
read -r -a ONLY_NAMES <<< "${ONLY:-${NAMES[*]}}"
for name in "${ONLY_NAMES[@]}"; do
    [[ " ${NAMES[*]} " == *" $name "* ]] || { echo "ONLY=$ONLY: no job set '$name' (allowed: ${NAMES[*]})" >&2; exit 2; }
done
wanted() { [[ " ${ONLY_NAMES[*]} " == *" $1 "* ]]; }

# +experiment=smollm2_recovery with 16 calibration windows (CAL), 16 evaluation windows of Macbeth / The Tempest, LoRA r=8
# on every block linear for 40 steps of 4 x 512 tokens (the experiment says 100; 40 keeps a job near 15 minutes here), lm-eval on 200 documents of each local task.
# One torch thread per job. `seed` varies the recovery (LoRA's initialisation and the order of the windows).
BUDGET=(+experiment=smollm2_recovery hardware.threads=1 train.max_steps=40 export.model=false export.adapter=false)
CAL=compression.calibration_examples=16

# OWL at 70 %: the pruned models only (no training), uniform against OWL, for both methods.
for method in wanda sparsegpt; do
    wanted owl && study_sweep owl_$method compression=$method compression.sparsity=0.7 $CAL \
        compression.allocation=uniform,owl train.max_steps=0 peft=full
done
# The dense model, without and with LoRA on the same text (what recovery could gain without any pruning).
wanted dense && study_sweep dense compression=none train.max_steps=0 peft=full
wanted dense && study_sweep dense_lora compression=none seed=$SEEDS
# QLoRA: the same LoRA over the base stored in NF4 (double quantisation), dense and after Wanda 50 %. Each command
# is its own process, so `train/peak_memory_mb` (the process's peak resident memory) compares with dense_lora's.
wanted qlora && study_sweep qlora_dense compression=none model.quantize_base=nf4 seed=$SEEDS
wanted qlora && study_sweep qlora_wanda compression=wanda compression.sparsity=0.5 $CAL model.quantize_base=nf4 seed=$SEEDS
# Recovery: before (before_fit/*) and after LoRA, in one job each.
for method in wanda sparsegpt; do
    wanted recovery && study_sweep recovery_$method compression=$method compression.sparsity=0.5 $CAL seed=$SEEDS
    wanted recovery && study_sweep recovery_${method}_2of4 compression=$method compression.sparsity=0.5 $CAL \
        compression.prune_n=2 compression.prune_m=4 seed=$SEEDS
done
wanted recovery && study_sweep recovery_wanda_70_owl compression=wanda compression.sparsity=0.7 $CAL \
    compression.allocation=owl seed=$SEEDS
# ShortGPT: the quarter of the 30 blocks (8) of lowest block influence removed, then LoRA on the 22 left.
wanted drop && study_sweep drop compression=layer_drop compression.fraction=0.25 $CAL \
    seed=$SEEDS
