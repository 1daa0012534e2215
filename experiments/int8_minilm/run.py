"""MiniLM sentiment model, LoRA fine-tuned and merged, then dynamic int8: accuracy and CPU speed vs fp32.

    python experiments/int8_minilm/run.py            # both backends, ~6 minutes on 2 CPU cores
    python experiments/int8_minilm/run.py torch_ao   # one backend

Each run fine-tunes MiniLM-L6 with LoRA on 1,000 movie-review sentences, merges the adapter, keeps the merged
fp32 model as the reference, quantises the linear layers to int8, and evaluates the int8 model on the
1,000-sentence test split. The fp32 reference is evaluated on the same split, and both are timed at batch 32
in the same process, alternating, after warm-up (the run's measure stage), so the speed figure is a ratio.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "outputs" / "int8_minilm"
COMMON = ["peft=lora", "data.limit_train=1000", "train.max_epochs=3", "logger=csv", "export.checkpoint=false",
          "export.adapter=false", "measure.latency_batch_sizes=[1,32]", "measure.latency_repeats=20"]


def run(backend: str) -> dict:
    run_dir = OUT / backend
    args = [sys.executable, "-m", "llmk_lab", "compression=dynamic_int8", f"compression.backend={backend}",
            *COMMON, f"hydra.run.dir={run_dir}"]
    print(" ".join(args[1:]), flush=True)
    subprocess.run(args, cwd=ROOT, check=True, env={"WANDB_MODE": "offline", **__import__("os").environ})
    return json.loads((run_dir / "metrics.json").read_text())


def row(backend: str, m: dict) -> str:
    drop = 100 * (m["reference/test/acc"] - m["test/acc"])
    return (f"| {backend} | {100 * m['reference/test/acc']:.1f} | {100 * m['test/acc']:.1f} | {drop:+.1f} | "
            f"{m['fidelity/agreement']:.3f} | {m['fidelity/mean_kl']:.2e} | "
            f"{m['latency/bs32/dense_ms']:.0f} | {m['latency/bs32/compressed_ms']:.0f} | "
            f"{m['latency/bs32/speedup']:.2f}x | {m['latency/bs1/speedup']:.2f}x | "
            f"{m['size/dense_bytes'] / 2**20:.1f} | {m['size/compressed_bytes'] / 2**20:.1f} |")


if __name__ == "__main__":
    backends = sys.argv[1:] or ["torch_ao", "torchao"]
    results = {b: run(b) for b in backends}
    print("| backend | fp32 acc | int8 acc | drop (points) | agreement | mean KL | fp32 ms (bs 32) | int8 ms (bs 32) "
          "| speed-up bs 32 | speed-up bs 1 | fp32 MiB | int8 MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for backend, metrics in results.items():
        print(row(backend, metrics))
