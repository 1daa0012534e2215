"""Cost figures: parameters, sparsity, memory, latency."""
from __future__ import annotations

import resource
import time
from typing import Iterable

import torch
from torch import nn


def parameter_counts(model: nn.Module) -> dict[str, int | float]:
    total = trainable = nonzero = 0
    seen = set()
    for param in model.parameters():
        if id(param) in seen:  # tied weights count once
            continue
        seen.add(id(param))
        total += param.numel()
        nonzero += int(torch.count_nonzero(param))
        if param.requires_grad:
            trainable += param.numel()
    return {"total": total, "trainable": trainable, "trainable_fraction": trainable / total if total else 0.0,
            "nonzero": nonzero}


def peak_memory_mb() -> float:
    """Peak GPU memory allocated if on GPU, else the process's peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@torch.inference_mode()
def latency(model: nn.Module, batches: Iterable[dict], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median seconds per batch over `repeats` passes of each batch (after warm-up)."""
    model.eval()
    batches = list(batches)
    for batch in batches[:warmup]:
        model(**batch)
    times = []
    for _ in range(repeats):
        for batch in batches:
            start = time.perf_counter()
            model(**batch)
            times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2]
    size = len(batches[0]["input_ids"])
    return {"ms_per_batch": 1000 * median, "examples_per_s": size / median}
