"""LoRA (Hu et al. 2021) through the peft library, with rsLoRA and DoRA as options.

Trainable parameters: for every target linear d_in -> d_out, r * (d_in + d_out)
(DoRA adds d_out magnitudes), plus the task head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from llmk_lab.masks import MASK, masked_update_forward, route_masked_updates
from llmk_lab.errors import UserError, check
from llmk_lab.architectures import architecture
from llmk_lab.peft import PEFT, PEFT_FOLDER, PeftStrategy, check_rank, resolve_targets
from llmk_lab.quantized_base import has_4bit_base


@dataclass
class LoraConfig:
    method: str = "lora"
    # Rank of the update B A.
    r: int = 8
    # Scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA).
    alpha: float = 16.0
    # 0 (peft's default): on a pruned model the masked update is then one matmul, and LoRA trains there
    # at 0.81 of the unpruned speed against 0.56 with dropout 0.1 (benchmarks/compressed_training.py,
    # README "Measured"); the default run kept its accuracy (test 0.815 with 0, 0.820 with 0.1).
    dropout: float = 0.0
    # Regex over module names or a list of name suffixes (null: every linear
    # layer inside the transformer blocks, attention and feed-forward, and BERT's pooler).
    target_modules: Optional[Any] = None
    # Rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023).
    use_rslora: bool = False
    # Weight-decomposed LoRA (Liu et al. 2024).
    use_dora: bool = False
    # Which biases train: none | all | lora_only.
    bias: str = "none"

    def __post_init__(self):
        check(self.r >= 1, "r", self.r, "an integer >= 1")
        check(self.alpha > 0, "alpha", self.alpha, "a positive number")
        check(0 <= self.dropout < 1, "dropout", self.dropout, "a number in [0, 1)")
        check(self.bias in ("none", "all", "lora_only"), "bias", self.bias, "one of ['none', 'all', 'lora_only']")


# LoRA's update is s B A: over pruned weights the layer computes (W + s B A) * M, and merges to it.
_masked_lora_forward = masked_update_forward(
    lambda layer, name: (layer.lora_B[name].weight, layer.lora_A[name].weight, layer.scaling[name]))


def mask_lora_updates(model) -> int:
    """Route LoRA layers over pruned weights through the masked forward and the masked merge; returns how many.
    `LoRA.apply` does it. Plain peft does not, which is why a pruned LoRA run ships no adapter/ (model/ has
    the masked update merged)."""
    from peft.tuners.lora import Linear as LoraLinear

    layer_types: tuple[type, ...] = (LoraLinear,)
    if has_4bit_base(model):  # QLoRA: peft's LoRA layer over a bitsandbytes 4-bit base
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

        layer_types += (LoraLinear4bit,)
    return route_masked_updates(model, layer_types, _masked_lora_forward)


def wrap(model, config, key: str = "peft.target_modules"):
    """get_peft_model, with its complaints about targets turned into one line."""
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        message = str(err)
        if "not found in the base model" in message or "Target module" in message:
            raise UserError(f"{key}={config.target_modules!r}: {message.splitlines()[0]}") from None
        raise


class PeftLibraryStrategy(PeftStrategy):
    """A strategy whose model is a peft `PeftModel`: saved with `save_pretrained`, merged by peft."""
    finds_layers_by_role = True  # LoRA, AdaLoRA and IA3 adapt the block linears (prefix/prompt say otherwise)
    adapter_format = PEFT_FOLDER
    wraps_model = True
    # Whether its update over a pruned layer is masked (`masked_update_forward`), which plain peft does not do.
    masks_its_update = False

    def save_adapter(self, model, directory):
        model.save_pretrained(directory, safe_serialization=True)
        return True

    def adapter_refusal(self, model):
        if self.masks_its_update and any(hasattr(m, "lora_A") and hasattr(getattr(m, "base_layer", None), MASK)
                                         for m in model.modules()):
            return ("its update over the pruned weights is masked, (W + s*B*A) * M, and plain peft computes "
                    "W * M + s*B*A, another model; model/ holds the run's model (the masked update merged)")
        return None

    def merged(self, model):
        if not self.mergeable:
            return super().merged(model)
        return model.merge_and_unload()


@PEFT.register("lora", config=LoraConfig)
class LoRA(PeftLibraryStrategy):
    masks_its_update = True
    trains_over_4bit_base = True

    @property
    def target_modules(self) -> Optional[Any]:
        return self.settings.target_modules

    def apply(self, model, ctx):
        s = self.settings
        targets = resolve_targets(model, s.target_modules, default=architecture(model).low_rank_update_targets(model))
        check_rank(model, targets, s.r, "peft.r")
        config = PeftLoraConfig(
            task_type=ctx.task.peft_task_type, r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout,
            target_modules=targets,
            use_rslora=s.use_rslora,
            use_dora=s.use_dora, bias=s.bias,
        )
        model = wrap(model, config)
        mask_lora_updates(model)  # over pruned weights: the update keeps their zeros, in training and merged
        return model
