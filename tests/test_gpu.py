"""GPU paths: mixed precision training, DDP on two GPUs, FSDP, 2:4 semi-structured sparse kernels, int8 through torchao.

Marked `gpu` and skipped without CUDA (`pytest -m gpu` on a GPU machine). Correctness only: latency
figures come from `benchmarks/gpu_kernels.py`, not from timed tests.
"""
from __future__ import annotations

import math

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _has_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "32-true"])
def test_mixed_precision_training_on_one_gpu(tmp_path, tiny, precision):
    from tests.conftest import run_config

    if precision == "bf16-mixed" and not _has_bf16():
        pytest.skip("this GPU has no bf16")
    metrics = run_config([*tiny, "compression=none", "hardware=gpu", f"hardware.precision={precision}"],
                         tmp_path / precision)
    assert metrics["train/steps"] > 0 and metrics["train/world_size"] == 1
    assert math.isfinite(metrics["test/loss"]) and 0 <= metrics["test/acc"] <= 1


def test_16_mixed_scales_the_loss(tmp_path, tiny):
    """16-mixed trains through Lightning's grad scaler (fp16 gradients would underflow without it)."""
    from llmk_lab.plan import plan
    from llmk_lab.run import build_trainer
    from tests.conftest import compose_config

    settings = plan(compose_config([*tiny, "hardware=gpu", "hardware.precision=16-mixed"])).settings
    trainer = build_trainer(settings, [], [], tmp_path)
    assert type(trainer.precision_plugin).__name__ == "MixedPrecision"
    assert trainer.precision_plugin.scaler is not None


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ddp_on_two_gpus_matches_one_gpu_with_the_same_effective_batch(tmp_path):
    from tests.test_hardware import DDP_RUN, _cli_run

    for name in ("one", "two", "scratch"):
        (tmp_path / name).mkdir()
    gpu = ["hardware=gpu", "hardware.precision=32-true"]
    one = _cli_run([*DDP_RUN, *gpu, "compression=wanda", "compression.calibration_examples=8", "train.batch_size=16"],
                   tmp_path / "one", tmp_path / "scratch")
    two = _cli_run([*DDP_RUN, *gpu, "compression=wanda", "compression.calibration_examples=8", "train.batch_size=8",
                    "hardware=multi_gpu", "hardware.devices=2", "hardware.precision=32-true"],
                   tmp_path / "two", tmp_path / "scratch")
    assert two["train/world_size"] == 2 and two["train/effective_batch_size"] == one["train/effective_batch_size"]
    assert two["test/loss"] == pytest.approx(one["test/loss"], abs=1e-3)  # cuBLAS sums in its own order
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["run"]


def test_fsdp_on_gpus_matches_one_gpu_and_exports_the_whole_model(tmp_path):
    """hardware=fsdp on up to two GPUs (one GPU: FSDP without sharding, the same code path): the figures rank
    zero measures alone, its exports and the checkpoint every process saves are of the whole model, and the
    metrics those of one GPU with the same effective batch (tests/test_hardware.py runs the same on CPU)."""
    from tests.test_hardware import DDP_RUN, _cli_run

    n = min(torch.cuda.device_count(), 2)
    for name in ("one", "fsdp", "scratch"):
        (tmp_path / name).mkdir()
    job = [o for o in DDP_RUN if o != "export.checkpoint=false"] + ["compression=magnitude", "export.checkpoint=true"]
    one = _cli_run([*job, "hardware=gpu", "hardware.precision=32-true", "train.batch_size=16"], tmp_path / "one",
                   tmp_path / "scratch")
    fsdp = _cli_run([*job, "hardware=fsdp", f"hardware.devices={n}", "hardware.precision=32-true",
                     f"train.batch_size={16 // n}"], tmp_path / "fsdp", tmp_path / "scratch")
    assert fsdp["train/world_size"] == n and fsdp["train/effective_batch_size"] == one["train/effective_batch_size"]
    for key in ("params/total", "params/nonzero", "params/trainable", "sparsity/pruned_layers",
                "sparsity/after_merge", "export/model_agreement"):
        assert fsdp[key] == one[key], key
    assert fsdp["test/loss"] == pytest.approx(one["test/loss"], abs=1e-3)  # cuBLAS sums in its own order
    states = [torch.load(tmp_path / name / "run" / "checkpoints" / "last.ckpt", map_location="cpu",
                         weights_only=False)["state_dict"] for name in ("one", "fsdp")]
    assert {k: v.shape for k, v in states[0].items()} == {k: v.shape for k, v in states[1].items()}
    assert sorted(p.name for p in (tmp_path / "fsdp").iterdir()) == ["run"]


def _two_four(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive inputs (the 2:4 pattern the sparse kernels take)."""
    groups = weight.abs().reshape(weight.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(2, dim=2).indices, True)
    return weight * keep.reshape(weight.shape)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 0),
                    reason="2:4 sparse kernels need compute capability >= 8.0")
def test_semi_structured_2_4_kernels_compute_the_dense_result():
    from torch.sparse import to_sparse_semi_structured

    from benchmarks.gpu_kernels import time_cuda

    torch.manual_seed(0)
    layer = torch.nn.Linear(2048, 2048, bias=False).half().cuda().eval()
    with torch.no_grad():
        layer.weight.copy_(_two_four(layer.weight))
    x = torch.randn(512, 2048, dtype=torch.float16, device="cuda")
    with torch.no_grad():
        dense = layer(x)
        sparse_weight = to_sparse_semi_structured(layer.weight)
        sparse = torch.nn.functional.linear(x, sparse_weight)
    torch.testing.assert_close(sparse, dense, rtol=1e-2, atol=1e-2)
    ratio = time_cuda(lambda: torch.nn.functional.linear(x, sparse_weight)) / time_cuda(lambda: layer(x))
    assert math.isfinite(ratio) and ratio > 0  # the figure itself: benchmarks/gpu_kernels.py


def test_int8_weight_only_through_torchao_on_gpu():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 64))
    model = model.to(device="cuda", dtype=torch.bfloat16 if _has_bf16() else torch.float16).eval()
    x = torch.randn(32, 256, device="cuda", dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        reference = model(x).float()
        quantize_(model, Int8WeightOnlyConfig())
        quantized = model(x).float()
    assert type(model[0].weight).__name__ != "Parameter" or type(model[0].weight.data) is not torch.Tensor
    cosine = torch.nn.functional.cosine_similarity(reference.flatten(), quantized.flatten(), dim=0)
    assert cosine > 0.99, float(cosine)


def test_weight_only_int8_compression_runs_after_gpu_training(tmp_path, tiny):
    from tests.conftest import run_config

    metrics = run_config([*tiny, "hardware=gpu", "compression=weight_only_int8"], tmp_path)
    assert math.isfinite(metrics["test/loss"])
    assert metrics["compression"][0]["method"] == "weight_only_int8"
