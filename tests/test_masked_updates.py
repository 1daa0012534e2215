"""Low-rank updates over pruned weights: the fused masked forward is the dense masked formula (values and
gradients), for LoRA, DoRA and AdaLoRA, with and without dropout; the merged model keeps the zeros and the
trained model's predictions."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmk_lab.masks import MASK, MaskKeeper, set_mask
from llmk_lab.peft.lora import mask_lora_updates
from tests.conftest import run_config

D_IN, D_OUT, TOKENS = 12, 10, 7


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D_IN, D_OUT)
        self.head = nn.Linear(D_OUT, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x)))


def _pruned_lora(dropout: float, use_dora: bool = False):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = Tiny()
    set_mask(model.lin, torch.rand(D_OUT, D_IN) > 0.4)
    model = get_peft_model(model, LoraConfig(r=3, lora_alpha=6, lora_dropout=dropout, target_modules=["lin"],
                                             use_dora=use_dora))
    layer = model.base_model.model.lin
    with torch.no_grad():  # B = 0 at init would hide any error in the update's path
        layer.lora_B["default"].weight.normal_()
    assert mask_lora_updates(model) == 1
    return model, layer


def _reference(layer, x, dropout_x, dora: bool):
    """The dense formula, by autograd on full matrices: x W^T + b + dropout(x) ((W + s B A) * M - W)^T,
    DoRA: the rows of (W + s B A) * M scaled by m / ||.|| (norm detached), as peft computes DoRA."""
    base, mask = layer.base_layer, getattr(layer.base_layer, MASK)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    effective = (base.weight + layer.scaling["default"] * b @ a) * mask
    if dora:
        magnitude = layer.lora_magnitude_vector["default"].weight
        effective = effective * (magnitude / torch.linalg.norm(effective, dim=1).detach())[:, None]
    return F.linear(x, base.weight, base.bias) + F.linear(dropout_x, effective - base.weight)


def _grads(output, params):
    return torch.autograd.grad(output.pow(2).sum(), params)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["fused", "dropout"])
def test_masked_forward_and_gradients_equal_the_dense_masked_formula(dropout, dora):
    model, layer = _pruned_lora(dropout, dora)
    layer.train()
    x = torch.randn(2, TOKENS, D_IN)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    if dora:
        params.append(layer.lora_magnitude_vector["default"].weight)
    torch.manual_seed(1)
    ours = layer(x)
    torch.manual_seed(1)  # the same dropout draw for the reference
    dropped = layer.lora_dropout["default"](x)
    if dropout:
        assert not torch.equal(dropped, x)
    reference = _reference(layer, x, dropped, dora)
    assert torch.allclose(ours, reference, atol=1e-5)
    for g_ours, g_ref in zip(_grads(ours, params), _grads(reference, params)):
        assert torch.allclose(g_ours, g_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merged_layer_keeps_zeros_and_outputs_without_remasking(dora):
    model, layer = _pruned_lora(0.0, dora)
    mask = getattr(layer.base_layer, MASK).clone()
    x = torch.randn(5, D_IN)
    model.eval()
    with torch.no_grad():
        trained = model(x)
        merged = model.merge_and_unload()
    assert not merged.lin.weight[~mask].any()
    with torch.no_grad():
        assert torch.allclose(merged(x), trained, atol=1e-5)


def test_adalora_masked_forward_equals_its_dense_formula():
    from peft import AdaLoraConfig, get_peft_model

    from llmk_lab.peft.adalora import mask_svd_updates

    torch.manual_seed(0)
    model = Tiny()
    set_mask(model.lin, torch.rand(D_OUT, D_IN) > 0.4)
    model = get_peft_model(model, AdaLoraConfig(init_r=3, target_r=2, lora_alpha=6, lora_dropout=0.0,
                                                target_modules=["lin"], total_step=10))
    layer = model.base_model.model.lin
    with torch.no_grad():
        layer.lora_E["default"].normal_()
    assert mask_svd_updates(model) == 1
    x = torch.randn(4, D_IN)
    a, b, e = layer.lora_A["default"], layer.lora_B["default"], layer.lora_E["default"]
    base, mask = layer.base_layer, getattr(layer.base_layer, MASK)
    update = (b @ (a * e)) * layer.scaling["default"] / (layer.ranknum["default"] + 1e-5)
    reference = F.linear(x, (base.weight + update) * mask, base.bias)
    ours = layer(x)
    assert torch.allclose(ours, reference, atol=1e-5)
    for g_ours, g_ref in zip(_grads(ours, [a, b, e]), _grads(reference, [a, b, e])):
        assert torch.allclose(g_ours, g_ref, atol=1e-4, rtol=1e-4)


def test_adalora_allocator_state_restored_from_a_checkpoint_follows_the_model_to_its_device():
    """Lightning restores a checkpoint before it moves the model to its device: the rank allocator's
    restored scores must end up beside their parameters at fit start (meta stands in for a GPU)."""
    from types import SimpleNamespace

    from peft import AdaLoraConfig, get_peft_model

    from llmk_lab.peft.adalora import RankAllocation

    model = get_peft_model(Tiny(), AdaLoraConfig(init_r=3, target_r=2, target_modules=["lin"], total_step=10))
    names = [name for name, p in model.base_model.model.named_parameters() if "lora_" in name]
    scores = {name: torch.ones(1) for name in names}
    callback = RankAllocation(model, None, {})
    callback.load_state_dict({"last_step": 3, "budgets": [6, 5, 4], "ipt": dict(scores),
                              "exp_avg_ipt": dict(scores), "exp_avg_unc": dict(scores)})
    model.to("meta")
    callback.on_fit_start(SimpleNamespace(fast_dev_run=True), None)
    allocator = model.base_model.rankallocator
    restored = [*allocator.ipt.values(), *allocator.exp_avg_ipt.values(), *allocator.exp_avg_unc.values()]
    assert len(restored) == 3 * len(names) and all(t.device.type == "meta" for t in restored)
    assert callback.budgets == [6, 5, 4] and callback.last_step == 3


def test_mask_keeper_leaves_frozen_weights_alone_and_masks_trained_ones():
    model = Tiny()
    set_mask(model.lin, torch.rand(D_OUT, D_IN) > 0.5)
    keeper = MaskKeeper(model)
    model.lin.weight.requires_grad_(False)
    keeper.on_train_start(None, None)
    assert keeper.modules == []  # nothing can move a frozen weight: no per-step work
    model.lin.weight.requires_grad_(True)
    keeper.on_train_start(None, None)
    with torch.no_grad():
        model.lin.weight.add_(1.0)  # an optimiser step that moved pruned weights
    keeper.on_train_batch_end(None, None, None, None, 0)
    assert not model.lin.weight[~getattr(model.lin, MASK)].any()


@pytest.mark.parametrize("extra", [["peft=lora"], ["peft=lora", "peft.use_dora=true"], ["peft=lora", "peft.dropout=0.1"]],
                         ids=["lora", "dora", "lora_dropout"])
def test_pruned_run_merges_to_an_equally_sparse_model_that_predicts_the_same(tmp_path, tiny, extra):
    metrics = run_config(tiny + ["data.limit_train=32", "train.batch_size=8", "compression=magnitude",
                                 "compression.sparsity=0.6", "export.merged=true", *extra], tmp_path)
    assert metrics["sparsity/pruned_layers"] == pytest.approx(0.6, abs=0.005)
    assert metrics["sparsity/after_merge"] == pytest.approx(0.6, abs=0.005)
    assert metrics["export/merged_max_logit_diff"] < 1e-4
