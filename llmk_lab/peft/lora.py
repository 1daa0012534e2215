"""LoRA (Hu et al. 2021) through the peft library, with rsLoRA and DoRA as options."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from peft import LoraConfig, get_peft_model

from llmk_lab.errors import UserError, check
from llmk_lab.models import block_linear_pattern
from llmk_lab.peft import PEFT, PeftStrategy


@dataclass
class LoraSettings:
    method: str = "lora"
    # Rank of the update B A.
    r: int = 8
    # Scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA).
    alpha: float = 16.0
    dropout: float = 0.1
    # Regex over module names or a list of name suffixes (null: every linear
    # layer inside the transformer blocks: attention and feed-forward).
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


def peft_targets(model, target_modules):
    """peft's `target_modules`: our per-architecture default regex, or the user's value."""
    if target_modules is None:
        return block_linear_pattern(model)
    return target_modules if isinstance(target_modules, str) else list(target_modules)


def wrap(model, config, key: str = "peft.target_modules"):
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        if "not found in the base model" in str(err) or "Target modules" in str(err):
            raise UserError(f"{key}={config.target_modules!r} matches no module of the model") from None
        raise


@PEFT.register("lora", config=LoraSettings)
class LoRA(PeftStrategy):
    def apply(self, model, ctx):
        s = self.settings
        config = LoraConfig(
            task_type=ctx.task.peft_task_type, r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout,
            target_modules=peft_targets(model, s.target_modules), use_rslora=s.use_rslora,
            use_dora=s.use_dora, bias=s.bias,
        )
        return wrap(model, config)

    def save_adapter(self, model, directory):
        model.save_pretrained(directory, safe_serialization=True)
        return True

    def merged(self, model):
        return model.merge_and_unload()
