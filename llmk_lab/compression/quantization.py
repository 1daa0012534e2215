"""Post-training int8 quantisation of linear layers, for CPU inference.

- `dynamic_int8`: int8 weights, activations quantised per batch at run time.
  `backend: torch_ao` is `torch.ao.quantization.quantize_dynamic` (fbgemm
  kernels); `backend: torchao` is torchao's
  `Int8DynamicActivationInt8WeightConfig`. torch_ao is the default because it
  is the one that is faster on CPU: on this project's 2-core CPU it ran MiniLM
  at 1.5-2.2x fp32 speed, torchao 0.18 at 0.63-0.80x (its kernels target GPUs;
  measured side by side in one process, 2026-11-23; see experiments/int8_minilm).
- `weight_only_int8`: torchao's `Int8WeightOnlyConfig` (int8 weights, float
  activations): a 4x smaller linear layer, no activation quantisation error.

Both act after fit: a PEFT adapter is first merged into the base weights in
place (pruning masks re-applied), then the targeted `nn.Linear` layers are
replaced; evaluation and measurement then run on the quantised model, on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from llmk_lab.compression import COMPRESSION, FINE_TUNED, CompressionMethod, target_linears
from llmk_lab.compression.low_bit import PackedLinear
from llmk_lab.compression.weight_sharing import untie_shared_weights
from llmk_lab.errors import UserError, check

BACKENDS = ("torch_ao", "torchao")


def is_quantized(model: nn.Module) -> bool:
    """True when some layer already holds quantised weights (torch.ao modules, torchao tensors, or the
    low-bit methods' packed layers)."""
    for module in model.modules():
        if "quantized" in type(module).__module__ or isinstance(module, PackedLinear):
            return True
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and (type(weight) not in (torch.Tensor, nn.Parameter)
                                                 or type(weight.data) is not torch.Tensor):
            return True
    return False


def quantizable_linears(model: nn.Module, target_modules: Optional[Any], key: str) -> dict[str, nn.Linear]:
    """Targeted linears; null targets every nn.Linear but LoRA's factors (merged away first), a head that
    a PEFT wrapper holds as a trained copy beside the original it stands in for (both kept float),
    and an output layer tied to the input embeddings (an int8 copy would store the embeddings twice)."""
    if target_modules is not None:
        return target_linears(model, target_modules, key)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = getattr(embeddings, "weight", None)
    found = {name: m for name, m in model.named_modules()
             if type(m) is nn.Linear and m.weight is not tied
             and not any(part in name for part in (".lora_", "modules_to_save", "original_module"))}
    if not found:
        raise UserError(f"{key}=null: the model has no linear layer to quantise")
    return found


def merge_adapter_in_place(model: nn.Module) -> None:
    """Fold a PEFT adapter into the base weights, keeping the wrapper, which the strategy's merge unwraps
    later (`measure.deployable`; masked LoRA layers merge their masked update, so pruned weights stay zero; weights shared across
    blocks are untied first, so each block's update lands in its own copy)."""
    if hasattr(model, "merge_adapter"):
        untie_shared_weights(model, adapted_only=True)
        model.merge_adapter()


@dataclass
class DynamicInt8Config:
    method: str = "dynamic_int8"
    # torch_ao (torch.ao.quantization.quantize_dynamic, faster on CPU) | torchao (Int8DynamicActivationInt8WeightConfig).
    backend: str = "torch_ao"
    # Weight scales for torch_ao: per_channel (one per output row) or per_tensor (one per matrix).
    # On the MiniLM sentiment model per-tensor lost 2.3 points of test accuracy (experiments/int8_minilm).
    granularity: str = "per_channel"
    # Regex over module names or a list of name suffixes (null: every linear layer, head included, as in
    # PyTorch's dynamic quantisation tutorial for BERT).
    target_modules: Optional[Any] = None

    def __post_init__(self):
        check(self.backend in BACKENDS, "backend", self.backend, f"one of {list(BACKENDS)}")
        check(self.granularity in ("per_channel", "per_tensor"), "granularity", self.granularity,
              "one of ['per_channel', 'per_tensor']")


@dataclass
class WeightOnlyInt8Config:
    method: str = "weight_only_int8"
    target_modules: Optional[Any] = None


class PostTrainingQuantization(CompressionMethod):
    dense_reference = FINE_TUNED
    compresses_after_fit = True
    quantizes_weights = True  # before_fit only checks; the weights change after training
    merged_export_refusal = ("merged/ is a float checkpoint and the run's model is int8; model/ (export.model=true, "
                             "the default) holds the int8 model: torchao's int8 in transformers' torchao format "
                             "(from_pretrained), torch.ao's dynamic int8 as its state dict beside config.json")
    adapter_export_refusal = ("it quantises the model after fit, the adapter merged in first: the run measured the "
                              "int8 model, and the adapter on the float base is the float model before that "
                              "(model/ holds the int8 model)")

    def before_fit(self, ctx) -> None:
        # Checked before training so a doomed run costs nothing.
        accelerator = ctx.settings.hardware.accelerator
        if accelerator != "cpu":
            raise UserError(f"compression.method={self.settings.method!r} builds a model for CPU inference; "
                            f"hardware.accelerator={accelerator!r} is not allowed with it: use hardware=cpu")
        previous = ctx.quantized_by
        if previous is not None or is_quantized(ctx.model):
            raise UserError(f"compression.method={self.settings.method!r}: the model is already quantised"
                            f"{f' by {previous!r}' if previous else ''}; quantise once (allowed: one "
                            "quantisation step per run, on a float model)")
        ctx.quantized_by = self.settings.method

    def quantize(self, model: nn.Module, names: list[str]) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def after_fit(self, ctx) -> None:
        model = ctx.model
        if is_quantized(model):
            raise UserError(f"compression.method={self.settings.method!r}: the model is already quantised; "
                            "quantise once")
        model.cpu().eval()
        merge_adapter_in_place(model)
        layers = quantizable_linears(model, self.settings.target_modules, "compression.target_modules")
        names = list(layers)
        # Zeros stay zeros (weights are quantised symmetrically), so pruning survives; recorded because the
        # pruning masks live on the float layers that quantisation replaces.
        zeros = sum(int((layer.weight == 0).sum()) for layer in layers.values())
        total = sum(layer.weight.numel() for layer in layers.values())
        self.quantize(model, names)
        self.report = {"quantized_layers": len(names), "layers": names, **self.describe(),
                       "zero_fraction_before": zeros / total}
        int8 = [m.weight() for m in model.modules() if type(m).__name__ == "Linear" and "quantized" in type(m).__module__]
        if int8:
            self.report["zero_fraction_int8"] = sum(int((w.int_repr() == 0).sum()) for w in int8) / \
                sum(w.numel() for w in int8)

    def describe(self) -> dict[str, Any]:
        return {}


@COMPRESSION.register("dynamic_int8", config=DynamicInt8Config)
class DynamicInt8(PostTrainingQuantization):
    def quantize(self, model, names):
        if self.settings.backend == "torch_ao":
            from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig

            qconfig = per_channel_dynamic_qconfig if self.settings.granularity == "per_channel" \
                else default_dynamic_qconfig
            # torch.ao swaps each Linear for a new module: forward hooks move over, child modules do not, so a
            # bottleneck adapter hanging off a quantised layer (peft=adapter) is put back on its replacement.
            children = {name: dict(model.get_submodule(name).named_children()) for name in names}
            torch.ao.quantization.quantize_dynamic(model, {name: qconfig for name in names}, dtype=torch.qint8,
                                                   inplace=True)
            for name, kept in children.items():
                replacement = model.get_submodule(name)
                for child_name, child in kept.items():
                    if not hasattr(replacement, child_name):
                        replacement.add_module(child_name, child)
        else:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

            wanted = set(names)
            quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda m, fqn: fqn in wanted)

    def describe(self):
        granularity = self.settings.granularity if self.settings.backend == "torch_ao" else "per_channel"
        return {"backend": self.settings.backend, "granularity": granularity,
                "scheme": "int8 weights, dynamic int8 activations"}


@COMPRESSION.register("weight_only_int8", config=WeightOnlyInt8Config)
class WeightOnlyInt8(PostTrainingQuantization):
    def quantize(self, model, names):
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        wanted = set(names)
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn in wanted)

    def describe(self):
        return {"backend": "torchao", "scheme": "int8 weights, float activations"}
