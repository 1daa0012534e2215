#!/usr/bin/env bash
# Every PEFT strategy on movie-review sentiment with MiniLM-L6, each at its best learning rate.
#   bash experiments/peft_comparison/sweep.sh            # SWEEP=<dir> to choose the directory, ONLY=<names> below
# Two stages, all jobs in one sweep directory (one report covers them):
#   1. grid: every strategy at three learning rates, seed 0 (jobs grid_<strategy>_<n>); IA3 and prefix tuning at a
#      fourth, above, once their best was the top of three;
#   2. seeds: seeds 1 and 2 at the learning rate whose seed-0 validation accuracy was best (seeds_<strategy>_<n>).
# The learning rate is chosen on validation accuracy only; test accuracy is reported for the chosen rate,
# mean +/- std over seeds 0, 1, 2. One command per strategy (each its own process), because peak memory
# is the process's peak resident set size, which never goes down inside one process. Rerunning skips
# finished jobs (sweep.resume=true), so an interrupted study continues where it stopped.
set -euo pipefail
SWEEP=${SWEEP:-outputs/peft_comparison}
# 3,000 training sentences, 2 epochs (376 optimiser steps of 16); 1,000 validation and 1,000 test sentences.
# Mean pooling of the last hidden states for every strategy: the checkpoint is a sentence-transformers model
# trained to be read that way (its BERT pooler was not trained for it; see README).
# One torch thread per job: the same float reduction order on any machine (same metrics at the same seed),
# and two studies can share a 2-core machine without oversubscribing it.
BUDGET=(compression=none logger=csv data.limit_train=3000 train.max_epochs=2 train.pooling=mean hardware.threads=1
        export.checkpoint=false export.adapter=false export.model=false)

declare -A GRID=(
  [linear_probe]=3e-3,1e-2,3e-2
  [bitfit]=1e-3,3e-3,1e-2
  [ia3]=3e-3,1e-2,3e-2,1e-1
  [prompt]=1e-2,3e-2,1e-1
  [prefix]=3e-3,1e-2,3e-2,1e-1
  [lora]=3e-4,1e-3,3e-3
  [adalora]=3e-4,1e-3,3e-3
  [adapter]=3e-4,1e-3,3e-3
  [top_layers]=1e-4,3e-4,1e-3
  [full]=3e-5,1e-4,3e-4
)
ORDER=(linear_probe bitfit ia3 prompt prefix lora adalora adapter top_layers full)
# ONLY="top_layers full" bash sweep.sh: those strategies only, both stages (two shells on disjoint lists
# share a machine's cores; the report covers whatever the directory holds).
read -r -a ORDER <<< "${ONLY:-${ORDER[*]}}"
for name in "${ORDER[@]}"; do
    [[ -v "GRID[$name]" ]] || { echo "ONLY=$ONLY: no strategy '$name' (allowed: ${!GRID[*]})" >&2; exit 2; }
done
# AdaLoRA's rank schedule for 376 steps: full rank for 40, budget cut every 10 steps, final ranks for the last 100.
declare -A KNOBS=([adalora]="peft.tinit=40 peft.tfinal=100 peft.deltaT=10")

source "$(dirname "$0")/../study.sh"
sweep() {  # sweep STAGE STRATEGY OVERRIDES...: jobs <stage>_<strategy>_<n>
    local stage=$1 name=$2
    shift 2
    # shellcheck disable=SC2086
    study_sweep "${stage}_${name}" "peft=$name" ${KNOBS[$name]:-} "$@"
}

best_lr() {  # the grid's learning rate with the best seed-0 validation accuracy (ties: the smaller rate)
    python - "$SWEEP" "$1" <<'PY'
import json, sys, yaml
from pathlib import Path
sweep, name = Path(sys.argv[1]), sys.argv[2]
scored = []
for job in sorted(sweep.glob(f"grid_{name}_*")):
    metrics = job / "metrics.json"
    if metrics.exists():
        lr = yaml.safe_load((job / "config.yaml").read_text())["train"]["lr"]
        scored.append((-json.loads(metrics.read_text())["val/acc"], float(lr)))
if not scored:
    sys.exit(f"no finished grid job for {name} in {sweep}")
print(min(scored)[1])
PY
}

for name in "${ORDER[@]}"; do
    sweep grid "$name" seed=0 "train.lr=${GRID[$name]}"
done
for name in "${ORDER[@]}"; do
    sweep seeds "$name" seed=1,2 "train.lr=$(best_lr "$name")"
done
python -m llmk_lab.report "$SWEEP"
# The table of the README: each strategy's three seeds at its chosen rate, as a sweep directory of links
# to those jobs (<SWEEP>_chosen), so the framework's report and Pareto plot cover exactly those rows.
python - "$SWEEP" "${ORDER[@]}" <<'PY'
import json, os, shutil, sys, yaml
from pathlib import Path
sweep = Path(sys.argv[1]).resolve()
chosen = sweep.with_name(sweep.name + "_chosen")
shutil.rmtree(chosen, ignore_errors=True)
chosen.mkdir()
shutil.copy(sweep / "sweep.json", chosen / "sweep.json")
for name in sys.argv[2:]:
    grid = [(-json.loads((job / "metrics.json").read_text())["val/acc"],
             float(yaml.safe_load((job / "config.yaml").read_text())["train"]["lr"]), job)
            for job in sorted(sweep.glob(f"grid_{name}_*")) if (job / "metrics.json").exists()]
    for job in [min(grid)[2], *sorted(sweep.glob(f"seeds_{name}_*"))]:
        os.symlink(job, chosen / job.name)
PY
python -m llmk_lab.report "${SWEEP%/}_chosen"
