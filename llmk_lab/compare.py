"""Compare two finished runs on the same inputs: typically a compressed run (B) against its dense parent (A).

    python -m llmk_lab.compare RUN_A RUN_B [--json compare.json] [--repeats 10] [--batch-size 32]

Both runs' `model/` exports are run on RUN_A's stored test inputs (`reference/test.safetensors`; when
the runs' tokenizers differ, RUN_A's inputs are decoded to text and tokenised again for RUN_B), and:

- agreement: share of identical predictions (classification: labels; NER: the tags of the words'
  first sub-tokens; causal and masked LM: windows whose mean NLL agrees to 1e-4), and mean KL(A || B) of the
  predicted distributions (classification, NER);
- metric difference: B - A for every `test/*` metric both runs' `metrics.json` have;
- size ratio: bytes of B's model weights over A's (dense saves: a pruned model's zeros still take
  their space here; metrics.json's `size/*` has the sparse save), and non-zero parameters B / A;
- latency ratio: median seconds per batch of B over A, timed alternately on the same batch on this
  machine (below 1: B is faster).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

from llmk_lab.console import figure_text, quiet_libraries
from llmk_lab.errors import UserError
from llmk_lab.export import finished_model_dir, load_exported, load_reference, model_outputs, read_info
from llmk_lab.measure import interleaved_latency, parameter_counts
from llmk_lab.tasks import INPUT_KEYS, task_class


def _load(folder: Path, info: dict):
    from transformers import AutoTokenizer

    return load_exported(folder, info), AutoTokenizer.from_pretrained(folder)


def _inputs_for(tokenizer_a, tokenizer_b, inputs: dict, info_b: dict) -> dict:
    """RUN_A's inputs as RUN_B sees them: the same ids when the vocabularies agree, else the same text."""
    if tokenizer_a.get_vocab() == tokenizer_b.get_vocab():
        return inputs
    if "labels" in inputs and inputs["labels"].ndim > 1:
        raise UserError("the runs tokenise differently; comparing NER runs needs the same tokenizer")
    texts = tokenizer_a.batch_decode(inputs["input_ids"], skip_special_tokens=True)
    encoded = tokenizer_b(texts, truncation=True, max_length=info_b["max_length"], padding=True, return_tensors="pt")
    return {k: v for k, v in encoded.items() if k in INPUT_KEYS}


def _nonzero(model) -> tuple[int, int]:
    counts = parameter_counts(model)
    return counts["nonzero"], counts["total"]


def _weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))


def compare(run_a: Path, run_b: Path, repeats: int = 10, batch_size: int = 32) -> dict[str, Any]:
    folder_a, folder_b = finished_model_dir(run_a), finished_model_dir(run_b)
    info_a, info_b = read_info(folder_a), read_info(folder_b)
    if info_a["task"] != info_b["task"]:
        raise UserError(f"the runs have different tasks ({info_a['task']} vs {info_b['task']}): nothing to compare")
    if info_a.get("labels") != info_b.get("labels"):
        raise UserError(f"the runs have different labels ({info_a.get('labels')} vs {info_b.get('labels')})")
    task = info_a["task"]
    inputs_a, _ = load_reference(folder_a.parent)
    model_a, tokenizer_a = _load(folder_a, info_a)
    model_b, tokenizer_b = _load(folder_b, info_b)
    inputs_b = _inputs_for(tokenizer_a, tokenizer_b, inputs_a, info_b)
    out_a = model_outputs(model_a, task, inputs_a)
    out_b = model_outputs(model_b, task, inputs_b)
    result: dict[str, Any] = {"run_a": str(run_a), "run_b": str(run_b), "task": task,
                              "examples": int(len(inputs_a["input_ids"]))}
    if out_a.shape != out_b.shape:
        raise UserError(f"the runs predict different things: outputs {tuple(out_a.shape)} vs {tuple(out_b.shape)}")
    result.update(task_class(task).comparison(out_a, out_b, inputs_a.get("labels")))
    metrics_a = json.loads((folder_a.parent / "metrics.json").read_text())
    metrics_b = json.loads((folder_b.parent / "metrics.json").read_text())
    result["metrics"] = {k: {"a": metrics_a[k], "b": metrics_b[k], "b_minus_a": metrics_b[k] - metrics_a[k]}
                         for k in sorted(metrics_a) if k.startswith("test/") and k in metrics_b
                         and isinstance(metrics_a[k], (int, float)) and isinstance(metrics_b[k], (int, float))}
    bytes_a, bytes_b = _weight_bytes(folder_a), _weight_bytes(folder_b)
    (nz_a, total_a), (nz_b, total_b) = _nonzero(model_a), _nonzero(model_b)
    result.update({"size/bytes_a": bytes_a, "size/bytes_b": bytes_b, "size/ratio": bytes_b / bytes_a,
                   "params/nonzero_a": nz_a, "params/nonzero_b": nz_b, "params/nonzero_ratio": nz_b / nz_a,
                   "params/total_a": total_a, "params/total_b": total_b})
    batch_rows = 1 if task_class(task).scores == "text" else batch_size
    batches = {"a": {k: v[:batch_rows] for k, v in inputs_a.items() if k in INPUT_KEYS},
               "b": {k: v[:batch_rows] for k, v in inputs_b.items() if k in INPUT_KEYS}}
    seconds = interleaved_latency({"a": model_a, "b": model_b}, batches, repeats)
    import torch

    result.update({"latency/batch_size": int(len(batches["a"]["input_ids"])), "latency/threads": torch.get_num_threads(),
                   "latency/ms_a": 1000 * seconds["a"], "latency/ms_b": 1000 * seconds["b"],
                   "latency/ratio": seconds["b"] / seconds["a"]})
    return result


def table(result: dict[str, Any]) -> str:
    rows = [("A", result["run_a"]), ("B", result["run_b"]), ("task", result["task"]),
            ("inputs (A's test split)", result["examples"]), ("agreement", result["agreement"])]
    for key in ("mean_kl", "perplexity_ratio"):
        if key in result:
            rows.append((f"{key} (A || B)" if key == "mean_kl" else key, result[key]))
    for key, values in result["metrics"].items():
        rows.append((f"{key}  A / B / B-A", f"{figure_text(values['a'])} / {figure_text(values['b'])} / {values['b_minus_a']:+.4f}"))
    rows += [("size ratio B/A (weight files)", result["size/ratio"]),
             ("non-zero parameters B/A", result["params/nonzero_ratio"]),
             (f"latency ratio B/A (batch {result['latency/batch_size']}, {result['latency/threads']} threads)",
              result["latency/ratio"]),
             ("latency ms A / B", f"{result['latency/ms_a']:.2f} / {result['latency/ms_b']:.2f}")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {figure_text(v)}" for k, v in rows)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmk_lab.compare",
                                     description="Compare two finished runs on the same inputs (A: the reference, "
                                                 "e.g. the dense parent; B: e.g. the compressed run).")
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--json", help="also write the figures as JSON to this file ('-': print only JSON)")
    parser.add_argument("--repeats", type=int, default=10, help="timed passes per model")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of the latency measurement")
    args = parser.parse_args(argv)
    quiet_libraries()  # no per-load progress bars or load reports
    try:
        if args.repeats < 1 or args.batch_size < 1:
            raise UserError("--repeats and --batch-size must be positive integers")
        result = compare(args.run_a, args.run_b, args.repeats, args.batch_size)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2) + "\n"
    if args.json == "-":
        sys.stdout.write(text)
        return 0
    print(table(result))
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
