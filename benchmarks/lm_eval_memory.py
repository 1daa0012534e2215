"""Peak memory of one causal-LM evaluation batch: the loss from the whole batch's logits against
llmk_lab's chunked scoring (`CausalLM.eval_outputs`), each in a fresh process.

    python benchmarks/lm_eval_memory.py                          # SmolLM2-135M, 8 windows of 512 tokens
    python benchmarks/lm_eval_memory.py --batch 16 --length 512 --model asset:smollm2-135m

Prints the peak resident memory (ru_maxrss) of each way and the perplexity both give (they must agree).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(way: str, model_ref: str, batch: int, length: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from llmk_lab.config import ModelConfig
    from llmk_lab.models import load_model, load_tokenizer
    from llmk_lab.tasks.causal_lm import CausalLM

    task = CausalLM()
    model_cfg = ModelConfig(name_or_path=model_ref)
    model, _ = load_model(model_cfg, task, load_tokenizer(model_cfg))
    model.eval()
    vocab = model.get_output_embeddings().out_features
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    metrics = task.metrics()
    with torch.no_grad():
        outputs = model(**data) if way == "full_logits" else task.eval_outputs(model, data)
        task.update_metrics(metrics, data, outputs)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"way": way, "peak_mb": peak / 1024, "model_loaded_mb": before / 1024,
            "perplexity": task.compute_metrics(metrics)["perplexity"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="asset:smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--way", choices=["full_logits", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.way:
        print(json.dumps(measure(args.way, args.model, args.batch, args.length)))
        return
    print(f"model={args.model} batch={args.batch} length={args.length}")
    for way in ("full_logits", "chunked"):
        out = subprocess.run([sys.executable, __file__, "--way", way, "--model", args.model, "--batch",
                              str(args.batch), "--length", str(args.length)], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr[-2000:])
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{way:12} peak {row['peak_mb']:8.0f} MB (model loaded: {row['model_loaded_mb']:6.0f} MB)  "
              f"perplexity {row['perplexity']:.4f}")


if __name__ == "__main__":
    main()
