"""Cost figures: parameters, sparsity, memory, bytes on disk, latency, fidelity to the dense model."""
from __future__ import annotations

import copy
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from llmk_lab.compression import FINE_TUNED
from llmk_lab.compression.low_bit import PackedLinear
from llmk_lab.compression.weight_sharing import untie_shared_weights
from llmk_lab.masks import is_packed_int8_linear, stored_values
from llmk_lab.quantized_base import float_merge, has_4bit_base


def packed_weights(model: nn.Module):
    """(name, tensor) of the weights quantised modules keep packed, outside `parameters()`: torch.ao's int8
    Linear, and the low-bit `PackedLinear` (as the values its codes stand for, so zeros count as zeros)."""
    for name, module in model.named_modules():
        if isinstance(module, PackedLinear):
            yield f"{name}.weight", module.dequantized_weight()
        elif is_packed_int8_linear(module):
            yield f"{name}.weight", module.weight()
            bias = module.bias() if callable(getattr(module, "bias", None)) else None
            if bias is not None:
                yield f"{name}.bias", bias


def parameter_counts(model: nn.Module) -> dict[str, int | float]:
    """Total, trainable and non-zero weights, quantised ones included (torchao subclasses count their int8
    values; torch.ao's packed int8 Linear weights and biases count although `parameters()` skips them)."""
    total = trainable = nonzero = 0
    seen = set()
    for param in model.parameters():
        if id(param) in seen:  # tied weights count once
            continue
        seen.add(id(param))
        values = stored_values(param)
        total += values.numel()  # a 4-bit weight's packed codes are fewer than its weights
        nonzero += int(torch.count_nonzero(values))
        if param.requires_grad:
            trainable += param.numel()
    for _, tensor in packed_weights(model):
        total += tensor.numel()
        nonzero += int(torch.count_nonzero(stored_values(tensor)))
    return {"total": total, "trainable": trainable, "trainable_fraction": trainable / total if total else 0.0,
            "nonzero": nonzero}


def peak_memory_mb() -> float:
    """Peak GPU memory allocated if on GPU, else the process's peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# --- What every compression run reports next to its task metric -------------------------------------------

def deployable(model: nn.Module, strategy=None) -> nn.Module:
    """A copy of `model` as it would be deployed: adapter merged, eval mode, on CPU.

    Not re-masked after merging: the masked LoRA/AdaLoRA layers merge their masked update, so the zeros a
    merged model has are measured, not imposed. Weights shared across blocks are untied where a per-block
    update is merged into them (each block gets its own merged copy)."""
    copy_ = copy.deepcopy(model)
    if strategy is not None and strategy.mergeable:
        untie_shared_weights(copy_, adapted_only=True)
        # QLoRA: a float model, the NF4 base dequantised plus the update (peft would re-quantise the merge).
        copy_ = float_merge(copy_) if has_4bit_base(copy_) else strategy.merged(copy_)
    return copy_.cpu().eval()


def deployed(ctx, strategy=None) -> nn.Module:
    """The deployable copy of `ctx.model`, built on first use and shared by every later stage (one deep
    copy and one merge per run instead of one per figure). Callers read it; the exports may untie shared
    weights in it, which changes no figure."""
    if ctx.deployed is None or ctx.deployed[0] is not ctx.model:
        ctx.deployed = (ctx.model, deployable(ctx.model, strategy))
    return ctx.deployed[1]


def unique_state(model: nn.Module) -> dict[str, Any]:
    """State dict with tensors shared between names (tied or shared weights) stored once."""
    state, seen = {}, set()
    for name, value in model.state_dict().items():
        if isinstance(value, torch.Tensor) and type(value) is torch.Tensor:
            key = (value.data_ptr(), value.shape, value.dtype) if value.numel() else None
            if key is not None and key in seen:
                continue
            seen.add(key)
        state[name] = value
    return state


def bitmask_encode(tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """A sparse tensor as (packed bitmask of non-zeros, non-zero values, shape), or None when not smaller."""
    flat = tensor.detach().flatten().cpu()
    nonzero = flat != 0
    values = flat[nonzero].contiguous()
    bits = torch.from_numpy(np.packbits(nonzero.numpy()))
    if bits.numel() + values.numel() * values.element_size() >= flat.numel() * flat.element_size():
        return None
    return {"bitmask": bits, "values": values, "shape": torch.tensor(tensor.shape, dtype=torch.int64)}


def bitmask_decode(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    shape = tuple(parts["shape"].tolist())
    numel = int(np.prod(shape)) if shape else 1
    nonzero = torch.from_numpy(np.unpackbits(parts["bitmask"].numpy(), count=numel).astype(bool))
    flat = torch.zeros(numel, dtype=parts["values"].dtype)
    flat[nonzero] = parts["values"]
    return flat.view(shape)


def compressed_state(model: nn.Module) -> tuple[dict[str, Any], str]:
    """The model's weights in the smallest plain format: sparse float matrices as bitmask + values.

    Returns (state, format): `safetensors` when every entry is a plain tensor, else `torch.save`
    (quantised modules keep packed int8 weights that safetensors cannot hold).
    """
    state: dict[str, Any] = {}
    for name, value in unique_state(model).items():
        if isinstance(value, torch.Tensor) and type(value) is torch.Tensor and value.is_floating_point() \
                and value.ndim >= 2:
            encoded = bitmask_encode(value)
            if encoded is not None:
                state.update({f"{name}.{part}": t for part, t in encoded.items()})
                continue
        state[name] = value.contiguous() if isinstance(value, torch.Tensor) and type(value) is torch.Tensor else value
    plain = all(isinstance(v, torch.Tensor) and type(v) is torch.Tensor for v in state.values())
    return state, "safetensors" if plain else "torch.save"


def saved_bytes(state: dict[str, Any], fmt: str) -> int:
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "weights"
        if fmt == "safetensors":
            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        else:
            torch.save(state, path)
        return path.stat().st_size


def size_figures(compressed: nn.Module, dense: nn.Module) -> dict[str, Any]:
    dense_bytes = saved_bytes(unique_state(dense), "safetensors")
    state, fmt = compressed_state(compressed)
    small = saved_bytes(state, fmt)
    return {"size/dense_bytes": dense_bytes, "size/compressed_bytes": small, "size/compressed_format": fmt,
            "size/ratio": small / dense_bytes}


def _fixed_batch(datamodule, batch_size: int) -> dict[str, torch.Tensor]:
    """`batch_size` test examples as the evaluation loader batches them: consecutive in its order (by length),
    around the middle of it, so the batch is a typical one (the first 32 test sentences of the default data
    are padded to 54 tokens where these are to 27: half of that batch's work was padding); cycled if the
    split is smaller."""
    examples, order = datamodule.splits["test"], datamodule.eval_order("test")
    start = max(0, (len(order) - batch_size) // 2)
    return datamodule.collate([examples[order[(start + i) % len(order)]] for i in range(batch_size)])


@torch.inference_mode()
@torch.inference_mode()
def interleaved_latency(models: dict[str, nn.Module], batches: dict[str, dict], repeats: int,
                        warmup: int = 2) -> dict[str, float]:
    """Median seconds per batch of each model on its batch (`batches[name]`), timed in alternation and in
    alternating order, so machine noise hits all alike."""
    inputs = {name: {k: v for k, v in batch.items() if k != "labels"} for name, batch in batches.items()}
    for name, model in models.items():
        model.eval()
        for _ in range(warmup):
            model(**inputs[name])
    times: dict[str, list[float]] = {name: [] for name in models}
    order = list(models)
    for r in range(repeats):
        for name in (order if r % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            models[name](**inputs[name])
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def latency_figures(compressed: nn.Module, dense: nn.Module, datamodule, batch_sizes, repeats: int,
                    warmup: int = 2) -> dict:
    # The budget is part of the figure: a median of 5 passes is not one of 100.
    figures: dict[str, Any] = {"latency/threads": torch.get_num_threads(), "latency/repeats": repeats,
                               "latency/warmup": warmup, "latency/batch_sizes": list(batch_sizes)}
    for size in batch_sizes:
        batch = _fixed_batch(datamodule, size)
        seconds = interleaved_latency({"dense": dense, "compressed": compressed},
                                      {"dense": batch, "compressed": batch}, repeats, warmup)
        figures[f"latency/bs{size}/tokens"] = int(batch["input_ids"].numel())  # padded positions computed
        for name, s in seconds.items():
            figures[f"latency/bs{size}/{name}_ms"] = 1000 * s
            figures[f"throughput/bs{size}/{name}_examples_per_s"] = size / s
        figures[f"latency/bs{size}/speedup"] = seconds["dense"] / seconds["compressed"]
    return figures


@torch.inference_mode()
def fidelity_figures(compressed: nn.Module, dense: nn.Module, task, loader) -> dict[str, float]:
    """How close the compressed model's outputs stay to the dense model's on a split, as the task measures it
    (`Task.fidelity_sums`: agreement of predictions and mean KL(dense || compressed) for class scores), plus the
    dense model's task metrics."""
    sums: dict[str, float] = {}
    total = 0
    reference_metrics = task.metrics()
    for batch in loader:
        dense_out, small_out = dense(**batch), compressed(**batch)
        task.update_metrics(reference_metrics, batch, dense_out)
        batch_sums, count = task.fidelity_sums(task.logits(dense_out).float(), task.logits(small_out).float(),
                                               batch.get("labels"))
        for name, value in batch_sums.items():
            sums[name] = sums.get(name, 0.0) + value
        total += count
    figures = {f"fidelity/{name}": value / total if total else float("nan") for name, value in sums.items()}
    figures.update({f"reference/test/{k}": v for k, v in task.compute_metrics(reference_metrics).items()})
    return figures


def needs_reference(settings) -> bool:
    """Whether any enabled figure compares with the uncompressed model (else none is kept)."""
    return settings.enabled and bool(settings.size or settings.latency_batch_sizes or settings.fidelity)


def compression_figures(ctx, strategy, settings) -> dict[str, Any]:
    """Size, CPU latency / throughput and fidelity of the compressed model next to its dense reference."""
    compressed, dense = deployed(ctx, strategy), ctx.dense_model.cpu().eval()
    figures: dict[str, Any] = {}
    if settings.size:
        figures.update(size_figures(compressed, dense))
    if settings.latency_batch_sizes:
        figures.update(latency_figures(compressed, dense, ctx.datamodule, settings.latency_batch_sizes,
                                       settings.latency_repeats, settings.latency_warmup))
    if settings.fidelity:
        figures.update(fidelity_figures(compressed, dense, ctx.task, ctx.datamodule.test_dataloader()))
    return figures


def keep_fitted_reference(ctx, methods, strategy) -> None:
    """When every configured method asks for the fine-tuned model as its reference (it compresses only
    after training), that model, taken before `after_fit`, is the uncompressed reference: a fairer one
    than the model as loaded, whose task head never trained."""
    if ctx.dense_model is not None and methods and all(m.dense_reference == FINE_TUNED for m in methods):
        ctx.dense_model = deployable(ctx.model, strategy)
        ctx.reports["measure/reference"] = FINE_TUNED
