#!/usr/bin/env bash
# Reproduce the task measurements of experiments/tasks/README.md (CPU; ~30-60 min on 2 shared cores).
#   bash experiments/tasks/run.sh            # all three
#   bash experiments/tasks/run.sh ppl        # one of: ppl ner mlm
set -euo pipefail
cd "$(dirname "$0")/../.."
out=outputs/experiments/tasks
what=${1:-all}

if [[ $what == all || $what == ppl ]]; then
  # Dense SmolLM2-135M perplexity, held-out Shakespeare, windows of 512 tokens (first 16 windows of each split).
  python -m llmk_lab +experiment=smollm2_perplexity logger=csv data.limit_eval=16 hydra.run.dir=$out/smollm2_ppl
fi
if [[ $what == all || $what == ner ]]; then
  # WNUT-16 NER, MiniLM-L6 full fine-tuning, one epoch over the 1,794 training tweets.
  python -m llmk_lab +experiment=ner_wnut16 logger=csv train.max_epochs=1 hydra.run.dir=$out/ner_wnut16
fi
if [[ $what == all || $what == mlm ]]; then
  # Domain adaptation: masked-LM on the movie-review training text, then LoRA classification from its output,
  # and the same classification from the original checkpoint for comparison.
  python -m llmk_lab +experiment=mlm_domain_pretrain logger=csv hydra.run.dir=$out/mlm_pretrain
  python -m llmk_lab +experiment=mlm_then_classify logger=csv model.name_or_path=$out/mlm_pretrain/merged \
    hydra.run.dir=$out/mlm_then_classify
  python -m llmk_lab +experiment=mlm_then_classify logger=csv model.name_or_path=asset:minilm-l6 \
    hydra.run.dir=$out/classify_from_original
fi
for f in $out/*/metrics.json; do
  python - "$f" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
keys = [k for k in m if k.startswith("test/") and ("perplexity" in k or k in ("test/acc", "test/f1", "test/macro_f1")
        or k.startswith("test/f1_"))]
print(sys.argv[1], {k: round(m[k], 4) for k in keys})
PY
done
