"""GPU kernel latency: 2:4 semi-structured sparse and int8 weight-only (torchao) linear layers against dense.

    python benchmarks/gpu_kernels.py                      # default shapes
    python benchmarks/gpu_kernels.py --tokens 512 4096 --features 2048 4096 --repeats 50

Prints one row per (kind, tokens, in x out): median milliseconds of the dense fp16/bf16 layer, of the
compressed one, and their ratio (compressed / dense; < 1 is faster), timed with CUDA events after warm-up,
dense and compressed alternating. Needs a CUDA GPU (2:4 kernels: compute capability >= 8.0).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def time_cuda(fn: Callable[[], object], repeats: int = 20, warmup: int = 5) -> float:
    """Median milliseconds of `fn` on the current CUDA stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def interleaved(dense: Callable[[], object], compressed: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Medians of several alternating rounds, so clock and thermal drift hit both alike."""
    rounds = [(time_cuda(dense, repeats), time_cuda(compressed, repeats)) for _ in range(3)]
    return statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds)


def two_four(weight: torch.Tensor) -> torch.Tensor:
    groups = weight.abs().reshape(weight.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(2, dim=2).indices, True)
    return weight * keep.reshape(weight.shape)


@torch.no_grad()
def bench_semi_structured(tokens: int, features: int, repeats: int, dtype) -> tuple[float, float]:
    from torch.sparse import to_sparse_semi_structured

    layer = torch.nn.Linear(features, features, bias=False).to("cuda", dtype).eval()
    layer.weight.copy_(two_four(layer.weight))
    sparse_weight = to_sparse_semi_structured(layer.weight)
    x = torch.randn(tokens, features, device="cuda", dtype=dtype)
    return interleaved(lambda: layer(x), lambda: torch.nn.functional.linear(x, sparse_weight), repeats)


@torch.no_grad()
def bench_int8_weight_only(tokens: int, features: int, repeats: int, dtype) -> tuple[float, float]:
    import copy

    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    dense = torch.nn.Sequential(torch.nn.Linear(features, features, bias=False)).to("cuda", dtype).eval()
    quantized = copy.deepcopy(dense)
    quantize_(quantized, Int8WeightOnlyConfig())
    x = torch.randn(tokens, features, device="cuda", dtype=dtype)
    return interleaved(lambda: dense(x), lambda: quantized(x), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 128, 2048])
    parser.add_argument("--features", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    name, capability = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
    print(f"{name}, compute capability {capability[0]}.{capability[1]}, torch {torch.__version__}")
    benches = {"int8_weight_only (torchao, bf16)": (bench_int8_weight_only, torch.bfloat16)}
    if capability >= (8, 0):
        benches = {"2:4 semi-structured (fp16)": (bench_semi_structured, torch.float16), **benches}
    print(f"{'kind':34} {'tokens':>7} {'shape':>11} {'dense ms':>9} {'comp. ms':>9} {'ratio':>6}")
    for kind, (bench, dtype) in benches.items():
        for features in args.features:
            for tokens in args.tokens:
                try:
                    dense_ms, compressed_ms = bench(tokens, features, args.repeats, dtype)
                except (RuntimeError, NotImplementedError) as err:  # a kernel this GPU / build lacks
                    print(f"{kind:34} {tokens:>7} {features:>5}x{features:<5} skipped: {str(err).splitlines()[0]}")
                    continue
                print(f"{kind:34} {tokens:>7} {features:>5}x{features:<5} {dense_ms:9.4f} {compressed_ms:9.4f} "
                      f"{compressed_ms / dense_ms:6.3f}")


if __name__ == "__main__":
    main()
