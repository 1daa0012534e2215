#!/usr/bin/env bash
# WNUT-16 NER with MiniLM-L6: full fine-tuning at two learning rates and LoRA at four, seed 0.
#   bash experiments/ner_wnut16/sweep.sh            # SWEEP=<dir> to choose the directory
# One sweep directory for both strategies (one report covers them); one command per strategy because
# each has its own learning-rate range. The rate is read off validation entity F1 (report.md lists
# both); test F1 is reported for every job. Rerunning skips finished jobs (sweep.resume=true).
set -euo pipefail
SWEEP=${SWEEP:-outputs/ner_wnut16}
# 1,794 training tweets x 5 epochs (565 optimiser steps of 16), 300 validation and 300 test tweets.
# One torch thread per job: the same float reduction order on any machine (same metrics at the same seed).
BUDGET=(+experiment=ner_wnut16 logger=csv train.max_epochs=5 seed=0 hardware.threads=1
        export.checkpoint=false export.adapter=false export.model=false)

source "$(dirname "$0")/../study.sh"

study_sweep full peft=full train.lr=1e-4,3e-4
# LoRA at 1e-3 and 3e-3 stayed at the all-O prior (entity F1 0, README); 1e-4 and 3e-4 were added after them,
# listed last so the finished jobs keep their numbers (lora_0, lora_1) and are skipped.
study_sweep lora peft=lora train.lr=1e-3,3e-3,1e-4,3e-4
python -m llmk_lab.report "$SWEEP"
