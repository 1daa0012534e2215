"""GPTQ on SmolLM2-135M: the framework's sweep against the authors' reference implementation, layer by layer
on the same Hessians and threads, and the packed low-bit model's latency against the float model.

    git clone https://github.com/IST-DASLab/gptq /tmp/gptq      # the authors' code (gptq.py, quant.py)
    python benchmarks/gptq_speed.py --reference /tmp/gptq         # 4-bit, group 64, all 30 blocks, 1 thread
    python benchmarks/gptq_speed.py --bits 3 --group-size -1 --blocks 4
    python benchmarks/gptq_speed.py                               # without --reference: ours and latency only

Calibration goes through the framework (the `smollm2_pruning` preset's data, 16 windows of 512 tokens,
block-sequential engine). For every targeted layer both implementations quantise the same weight with the same
Hessian, in alternating order; the framework's result is then packed into the model, so the next block is
calibrated on quantised outputs as in a real run. Printed: seconds of each (sum over layers) and their ratio,
how many quantised weights agree exactly, and the latency of the packed model and the float one on the
same batches, timed interleaved (`llmk_lab.measure.interleaved_latency`).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, help="a checkout of the authors' repository (IST-DASLab/gptq)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=30, help="quantise only the first N decoder blocks")
    parser.add_argument("--calibration", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--latency-repeats", type=int, default=5)
    args = parser.parse_args()

    import torch

    sys.path.insert(0, str(ROOT))
    from llmk_lab.architectures import architecture, weight_matrix
    from llmk_lab.compression import target_linears
    from llmk_lab.compression.calibration import prune_block_sequentially
    from llmk_lab.compression.gptq import gptq_quantize
    from llmk_lab.compression.low_bit import Grid, pack_layer
    from llmk_lab.data import load_data
    from llmk_lab.data.module import TaskDataModule
    from llmk_lab.matrix import compose, hydra_session
    from llmk_lab.measure import interleaved_latency
    from llmk_lab.models import load_model, load_tokenizer
    from llmk_lab.plan import plan
    from llmk_lab.tasks import get_task

    torch.set_num_threads(args.threads)
    reference = None
    if args.reference is not None:
        sys.path.insert(0, str(args.reference))
        import gptq as reference_gptq  # the authors' module
        import quant as reference_quant

        torch.cuda.synchronize = lambda *a, **k: None  # the reference times itself with CUDA syncs
        reference = (reference_gptq.GPTQ, reference_quant.Quantizer)

    with hydra_session():
        settings = plan(compose(["+experiment=smollm2_pruning", "compression=gptq",
                                 f"compression.group_size={args.group_size}"])).settings
    raw = load_data(settings.data)
    task = get_task(raw.task, raw.labels)
    tokenizer = load_tokenizer(settings.model)
    datamodule = TaskDataModule(raw, task, tokenizer, settings.data, settings.train, settings.seed)
    model, _ = load_model(settings.model, task, tokenizer)
    model.eval()
    float_model = copy.deepcopy(model)
    arch = architecture(model)
    prefixes = tuple(arch.block_prefix(i) for i in range(args.blocks))
    layers = {n: m for n, m in target_linears(model, None, "layers").items() if n.startswith(prefixes)}
    grid = Grid(args.bits, True)
    seconds = {"llmk_lab": 0.0, "reference": 0.0}
    agree = total = 0
    largest_gap = 0.0
    order = [0]

    def quantize_layer(name, layer, stats):
        nonlocal agree, total, largest_gap
        H = stats.hessian()
        W = weight_matrix(layer).detach()
        runs = ["llmk_lab", "reference"] if reference is not None else ["llmk_lab"]
        order[0] += 1
        results = {}
        for who in runs if order[0] % 2 else runs[::-1]:  # alternate who goes first
            start = time.perf_counter()
            if who == "llmk_lab":
                results[who] = gptq_quantize(W, H, grid, args.group_size, 128, 0.01)
            else:
                twin = copy.deepcopy(layer)
                ref = reference[0](twin)
                ref.H = H.clone()
                ref.quantizer = reference[1]()
                ref.quantizer.configure(args.bits, perchannel=True, sym=True)
                with contextlib.redirect_stdout(io.StringIO()):  # it prints its time and error per layer
                    ref.fasterquant(blocksize=128, percdamp=0.01, groupsize=args.group_size)
                results[who] = twin.weight.detach()
            seconds[who] += time.perf_counter() - start
        ours, codes, scale, zero = results["llmk_lab"]
        if reference is not None:
            theirs = results["reference"]
            agree += int((ours == theirs).sum())
            largest_gap = max(largest_gap, float((ours - theirs).abs().max()))
        total += ours.numel()
        pack_layer(model, name, layer, codes, scale, zero, grid, args.group_size)

    batches = datamodule.calibration_batches(args.calibration, None)
    started = time.perf_counter()
    prune_block_sequentially(model, layers, batches, quantize_layer, gram=True)
    wall = time.perf_counter() - started
    print(f"SmolLM2-135M, {len(layers)} layers of {args.blocks} blocks, {args.bits}-bit, group {args.group_size}, "
          f"{args.calibration} calibration windows of {settings.data.max_length} tokens, {args.threads} thread(s)")
    print(f"  calibrated quantisation, whole engine: {wall:.1f} s")
    print(f"  GPTQ sweeps, llmk_lab:  {seconds['llmk_lab']:.1f} s")
    if reference is not None:
        print(f"  GPTQ sweeps, reference: {seconds['reference']:.1f} s   (llmk_lab / reference: "
              f"{seconds['llmk_lab'] / seconds['reference']:.2f}x the time)")
        print(f"  identical quantised weights: {agree / total:.4%} of {total:,}; largest difference {largest_gap:.3g}")
    for size in (1, 4):
        batch = {"input_ids": torch.cat([b["input_ids"] for b in batches])[:size]}
        times = interleaved_latency({"float": float_model, "packed": model}, {"float": batch, "packed": batch},
                                    args.latency_repeats)
        print(f"  latency, batch {size} x {batch['input_ids'].shape[1]} tokens: float {1000 * times['float']:.0f} ms, "
              f"packed {args.bits}-bit {1000 * times['packed']:.0f} ms ({times['float'] / times['packed']:.2f}x "
              "the float speed; dequantised on the fly)")


if __name__ == "__main__":
    main()
