"""The plan of a run: every value and every combination of options checked before anything heavy runs.

`plan(cfg)` validates the composed config against the schemas, builds the compression steps and the PEFT
strategy the config names, and refuses what cannot work together in one line, from what each method,
strategy and task declares (class attributes and properties on `CompressionMethod` and `PeftStrategy`):
nothing here names a particular method.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from llmk_lab.compression import CompressionMethod, build_methods
from llmk_lab.config import RunConfig
from llmk_lab.errors import UserError
from llmk_lab.lm_evaluation import check_tasks as check_lm_eval_tasks
from llmk_lab.peft import PEFT, PeftStrategy
from llmk_lab.quantized_base import check_device as check_quantized_base_device
from llmk_lab.quantized_base import quantize_base_refusal
from llmk_lab.registry import to_settings
from llmk_lab.training.pooling import refusal as pooling_refusal


@dataclass
class Plan:
    """The validated config and the objects it names, built before any heavy work."""
    settings: RunConfig
    methods: list[CompressionMethod]
    strategy: PeftStrategy


def plan(cfg: DictConfig) -> Plan:
    """Check every value and combination up front, so bad input fails before anything is written."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(RunConfig):
        node = plain.get(field.name)
        if field.default_factory is not dataclasses.MISSING:  # a nested schema: validate it under its key
            values[field.name] = to_settings(type(field.default_factory()), node or {}, field.name)
        else:
            values[field.name] = node
    settings = RunConfig(**values)
    compression_node, peft_node = settings.compression, settings.peft
    methods = build_methods(compression_node or {"method": "none"})
    strategy = PEFT.build(peft_node or {"method": "linear_probe"}, "peft")
    if settings.export.merged and not strategy.mergeable:
        raise UserError(f"export.merged=true is not possible with peft.method={strategy.registered_name!r}: "
                        "its update cannot be folded into the weights")
    refuse_combinations(settings, methods, strategy)
    if settings.eval.lm_eval.tasks:
        if not strategy.logits_align_with_input:
            raise UserError(f"eval.lm_eval.tasks is not possible with peft.method={strategy.registered_name!r}: "
                            "lm-eval reads one logit row per input token, and its virtual tokens come first; "
                            "use peft=prefix, lora or another strategy")
        check_lm_eval_tasks(settings.eval.lm_eval)
    reason = pooling_refusal(settings.train, settings.export)
    if reason:
        raise UserError(reason)
    return Plan(settings, methods, strategy)


def refuse_combinations(settings: RunConfig, methods: list[CompressionMethod], strategy: PeftStrategy) -> None:
    """Combinations of options that cannot work, from what each method and strategy declares, refused in
    one line naming both options and why (the composition matrix, `llmk_lab.matrix`, lists them)."""
    peft_name = strategy.registered_name
    for method in methods:
        name = method.registered_name
        if settings.export.merged and method.merged_export_refusal:
            raise UserError(f"export.merged=true is not possible with compression.method={name!r}: "
                            f"{method.merged_export_refusal}")
        if method.prunes_while_training and (strategy.trains_base_weights == "none" or (
                strategy.trains_base_weights == "some" and method.target_modules is None)):
            raise UserError(f"compression.method={name!r} prunes weights while they train, but peft.method="
                            f"{peft_name!r} keeps the targeted weights frozen; use peft=full (or peft=top_layers "
                            "with compression.target_modules inside the trained layers)")
        reason = method.refusal_with(strategy)
        if reason:
            raise UserError(f"compression.method={name!r} cannot be combined with peft.method={peft_name!r}: "
                            f"{reason}")
    reason = quantize_base_refusal(settings.model.quantize_base, strategy, methods)
    if reason:
        raise UserError(reason)
    if settings.model.quantize_base is not None:
        check_quantized_base_device(settings.hardware.accelerator)
        if settings.hardware.strategy == "fsdp":
            raise UserError(f"model.quantize_base={settings.model.quantize_base} is not possible with "
                            "hardware.strategy=fsdp: FSDP shards float parameters, not bitsandbytes' packed 4-bit "
                            "ones; use ddp or one device")
    reason = fsdp_refusal(settings, methods, strategy)  # what FSDP's sharded parameters rule out
    if reason:
        raise UserError(reason)


def fsdp_refusal(settings, methods, strategy) -> Optional[str]:
    """Why this run cannot use FSDP, in one line (None: it can). Through training and evaluation FSDP holds
    every parameter and its gradient as a shard on each process (rank zero gathers the whole model only at
    the end, `gather_full_parameters`), so what reads or changes whole trained weights before then does not
    work: pruning while training, re-masking pruned weights that train, compressing the trained model before
    it is evaluated, scores from whole gradients (AdaLoRA), loading the selected checkpoint back."""
    if settings.hardware.strategy != "fsdp":
        return None
    start, instead = "hardware.strategy='fsdp' cannot be combined with", "; use hardware.strategy=ddp"
    peft = strategy.registered_name
    for method in methods:
        name = method.registered_name
        if method.prunes_while_training:
            return f"{start} compression.method={name!r}: it prunes weights while they train{instead}"
        if method.compresses_after_fit:
            return f"{start} compression.method={name!r}: it compresses the trained model before evaluation{instead}"
        if method.requested_sparsity is not None and strategy.trains_base_weights != "none":
            return (f"{start} compression.method={name!r} and peft.method={peft!r}: the pruned weights train and "
                    f"are re-masked at every step{instead}, or a peft method that keeps them frozen (e.g. lora)")
    if strategy.reads_whole_gradients:
        return f"{start} peft.method={peft!r}: it scores its updates from their whole gradients{instead}"
    if settings.train.monitor:
        return (f"{start} train.monitor={settings.train.monitor!r}: the selected checkpoint is loaded back into "
                f"the whole model{instead}")
    return None
