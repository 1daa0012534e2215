"""One-shot pruning of SmolLM2-135M: perplexity on held-out Shakespeare, the Wanda/SparseGPT protocol.

    python experiments/llm_pruning/prune_smollm2.py                       # 50 % unstructured
    python experiments/llm_pruning/prune_smollm2.py --prune-n 2 --prune-m 4 --methods magnitude,wanda,sparsegpt

Protocol (shared/PROTOCOLS.md), on the data we have offline:
- evaluation text: the test work(s) (default Macbeth, the causal-LM task's test split) joined with "\\n\\n",
  tokenised once, cut into non-overlapping windows of `--seqlen` tokens, remainder dropped (optionally only
  the first `--eval-windows` windows, for CPU time); perplexity = exp(total token NLL / predicted tokens);
- calibration: `--calibration-examples` windows of `--seqlen` tokens at random offsets (Python `random`, seed 0) of
  the other works joined with "\\n\\n" (the validation work, The Tempest, and the test work excluded);
- every linear layer of the 30 decoder blocks is pruned (embeddings and LM head dense), block by block with
  llmk_lab's calibration engine, each block calibrated on the outputs of the already pruned ones.
Results are appended to `--out` (JSON) after each method and printed as a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import llmk_lab
from llmk_lab import assets
from llmk_lab.compression import COMPRESSION
from llmk_lab.compression.masks import sparsity_report

VALIDATION_WORKS = ("tempest",)
TEST_WORKS = ("macbeth",)


def shakespeare_texts() -> dict[str, str]:
    root = assets.fetch("shakespeare")
    return {p.name.removesuffix("_gut.txt"): p.read_text(encoding="utf-8").strip()
            for p in sorted(root.glob("*_gut.txt"))}


def eval_windows(ids: list[int], seqlen: int, limit: int | None) -> torch.Tensor:
    windows = [ids[i * seqlen:(i + 1) * seqlen] for i in range(len(ids) // seqlen)]
    return torch.tensor(windows[:limit] if limit else windows, dtype=torch.long)


def calibration_windows(ids: list[int], n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(n)]
    return torch.tensor([ids[s:s + seqlen] for s in starts], dtype=torch.long)


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, batch_size: int) -> float:
    """exp(mean NLL over every predicted token of every window); each window scored on its own."""
    nll, tokens = 0.0, 0
    for start in range(0, len(windows), batch_size):
        ids = windows[start:start + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        targets = ids[:, 1:]
        nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                       reduction="sum"))
        tokens += targets.numel()
    return math.exp(nll / tokens)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="dense,magnitude,wanda,sparsegpt")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--prune-n", type=int, default=0)
    parser.add_argument("--prune-m", type=int, default=0)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--calibration-examples", type=int, default=32)
    parser.add_argument("--calibration-batch-size", type=int, default=8)
    parser.add_argument("--eval-windows", type=int, default=40, help="first N evaluation windows (0: all)")
    parser.add_argument("--eval-batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    llmk_lab.register_all()

    model_dir = assets.fetch("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = shakespeare_texts()
    calibration_text = "\n\n".join(t for w, t in texts.items() if w not in VALIDATION_WORKS + TEST_WORKS)
    eval_text = "\n\n".join(texts[w] for w in TEST_WORKS)
    evaluation = eval_windows(tokenizer(eval_text, verbose=False)["input_ids"], args.seqlen, args.eval_windows or None)
    calibration = calibration_windows(tokenizer(calibration_text, verbose=False)["input_ids"], args.calibration_examples,
                                      args.seqlen)
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}
               for ids in calibration.split(args.calibration_batch_size)]
    pattern = f"{args.prune_n}:{args.prune_m}" if args.prune_m else "unstructured"
    setup = {"model": "smollm2-135m (instruct, Q4_1-dequantised)", "eval_works": list(TEST_WORKS),
             "eval_windows": len(evaluation), "eval_tokens_predicted": int(evaluation[:, 1:].numel()),
             "seqlen": args.seqlen, "calibration_examples": args.calibration_examples, "calibration_seed": 0,
             "pattern": pattern, "sparsity": args.sparsity, "threads": args.threads}
    print(json.dumps(setup), flush=True)

    results = json.loads(args.out.read_text()) if args.out.exists() else []
    for name in args.methods.split(","):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        started = time.perf_counter()
        report = {}
        if name != "dense":
            node = {"method": name, "sparsity": args.sparsity, "prune_n": args.prune_n, "prune_m": args.prune_m}
            if name in ("wanda", "sparsegpt"):
                node["calibration_examples"] = args.calibration_examples
            method = COMPRESSION.build(node, "compression")
            layers = method.layers(model)
            if hasattr(method, "prune_with_batches"):
                method.prune_with_batches(model, layers, batches)
            else:
                method.prune(model, layers)
            report = {"requested_sparsity": method.report["requested_sparsity"],
                      "achieved_sparsity": sparsity_report(model, layers)["overall"], "pruned_layers": len(layers)}
        prune_s = time.perf_counter() - started
        started = time.perf_counter()
        ppl = perplexity(model, evaluation, args.eval_batch_size)
        row = {"method": name, "pattern": "dense" if name == "dense" else pattern, "perplexity": ppl,
               "prune_s": round(prune_s, 1), "eval_s": round(time.perf_counter() - started, 1), **report, **setup}
        print(json.dumps(row), flush=True)
        results.append(row)
        args.out.write_text(json.dumps(results, indent=1))

    print("\n| method | pattern | sparsity achieved | perplexity |\n|---|---|---|---|")
    for row in results:
        print(f"| {row['method']} | {row['pattern']} | {row.get('achieved_sparsity', 0):.4f} | {row['perplexity']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
