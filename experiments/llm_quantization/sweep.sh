#!/usr/bin/env bash
# Low-bit weight quantisation through the framework: RTN, GPTQ and AWQ at 8/4/3 bits on SmolLM2-135M
# (perplexity, the smollm2_pruning protocol) and on a fine-tuned MiniLM-L6 sentiment classifier (accuracy),
# SparseGPT's joint mode, and pruning chained with a low-bit method. One sweep directory, one report.
#   bash experiments/llm_quantization/sweep.sh                # SWEEP=<dir>, ONLY=<names> (below)
# Rerunning skips finished jobs (sweep.resume=true). Two shells on disjoint ONLY lists share a 2-core machine.
set -euo pipefail
SWEEP=${SWEEP:-outputs/llm_quantization}
source "$(dirname "$0")/../study.sh"

NAMES=(dense rtn gptq awq gptq_channel awq_channel aligned joint chain minilm_float minilm)
read -r -a ONLY_NAMES <<< "${ONLY:-${NAMES[*]}}"
for name in "${ONLY_NAMES[@]}"; do
    [[ " ${NAMES[*]} " == *" $name "* ]] || { echo "ONLY=$ONLY: no job set '$name' (allowed: ${NAMES[*]})" >&2; exit 2; }
done
wanted() { [[ " ${ONLY_NAMES[*]} " == *" $1 "* ]]; }

# SmolLM2-135M: the pruning study's protocol (16 calibration windows of 512 tokens, 16 evaluation windows of
# Macbeth and The Tempest, one torch thread per job), plus the size of the save and the latency of one
# 512-token window against the float model. Group 128 does not divide SmolLM2's 576-wide layers, so the
# grouped rows use 64 (and 32, the Q4_1 GGUF's own block size). model/ is exported (and its reload checked)
# for seed 0 of the 4-bit grouped jobs; the others skip it to save a pass over the test windows.
BUDGET=(+experiment=smollm2_pruning hardware.threads=1 measure.size=true "measure.latency_batch_sizes=[1]"
        measure.latency_repeats=5 compression.calibration_examples=16)
NO_EXPORT=(export.model=false export.checkpoint=false)
SEEDS=compression.calibration_seed=0,1,2

wanted dense && (BUDGET=("${BUDGET[@]:0:2}"); study_sweep dense compression=none)
wanted rtn && (BUDGET=("${BUDGET[@]:0:5}"); study_sweep rtn compression=rtn compression.bits=8,4,3 \
    compression.group_size=-1,64,32 "${NO_EXPORT[@]}")
wanted gptq && study_sweep gptq compression=gptq compression.bits=4,3 compression.group_size=64 $SEEDS
wanted awq && study_sweep awq compression=awq compression.bits=4,3 compression.group_size=64 $SEEDS
wanted gptq_channel && study_sweep gptq_channel compression=gptq compression.bits=4,3 compression.group_size=-1 \
    "${NO_EXPORT[@]}"
wanted awq_channel && study_sweep awq_channel compression=awq compression.bits=4,3 compression.group_size=-1 \
    "${NO_EXPORT[@]}"
# Groups of 32 input weights, the grid the shipped weights were dequantised from (Q4_1: 32 weights, 16 levels).
# (One command per method: a multirun's base config is composed without its sweeps, so the method is fixed.)
for method in gptq awq; do
    wanted aligned && study_sweep aligned_$method compression=$method compression.bits=4 compression.group_size=32 \
        "${NO_EXPORT[@]}"
done
# SparseGPT's joint mode: 50 % and 2:4 chosen in the same sweep that rounds the kept weights to 4 bits.
wanted joint && study_sweep joint compression=gptq compression.bits=4 compression.group_size=64 \
    compression.sparsity=0.5 "${NO_EXPORT[@]}"
wanted joint && study_sweep joint_2of4 compression=gptq compression.bits=4 compression.group_size=64 \
    compression.sparsity=0.5 compression.prune_n=2 compression.prune_m=4 "${NO_EXPORT[@]}"
# Any pruning method, then any low-bit one: Wanda 50 %, then AWQ 4-bit.
wanted chain && (BUDGET=("${BUDGET[@]:0:5}"); study_sweep chain compression=chain \
    'compression.steps=[{method:wanda,sparsity:0.5,calibration_examples:16},{method:awq,group_size:64,calibration_examples:16}]')

# MiniLM-L6 sentiment: each job fully fine-tunes the float model (the default run's data and budget, peft=full;
# the same seed gives the same float model in every job), then quantises it after fit; fidelity is measured
# against that fine-tuned float model. Calibration: the first 128 training sentences. Group 128 divides
# MiniLM's widths (384, 1536).
MINILM=(peft=full logger=csv hardware.threads=1 train.lr=1e-4 measure.fidelity=true export.adapter=false
        export.checkpoint=false)
wanted minilm_float && (BUDGET=("${MINILM[@]}"); study_sweep minilm_float compression=none export.model=false)
for method in rtn gptq awq; do
    wanted minilm && (BUDGET=("${MINILM[@]}"); study_sweep minilm_$method compression=$method compression.bits=4,3 \
        compression.group_size=128 export.model=false)
done
