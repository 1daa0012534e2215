"""PEFT strategies: which parameters train, and how the result is saved and merged.

Strategies the peft library covers are thin wrappers over it; the rest are
one file each here. Adding one is one Python file and one YAML in `conf/peft/`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from torch import nn

from llmk_lab.architectures import (LINEAR_TYPES, architecture, head_modules, head_parameter_names,  # noqa: F401
                                    in_features, matching_modules, name_matcher, out_features)
from llmk_lab.errors import UserError
from llmk_lab.registry import Registry, import_submodules


class PeftStrategy:
    # Whether the trained update can be folded into plain weights.
    mergeable: bool = True
    # Which of the model's own (pretrained) weights train: "all", "some" (chosen by a setting), or "none".
    # Methods that prune while weights train need "all" (or targets among "some"); plan() checks.
    trains_base_weights: str = "none"
    # Whether the strategy finds its layers by their roles in a transformer block (q/k/v/o, feed-forward):
    # compression that replaces those layers by something else (low_rank's factor pairs) leaves it none.
    finds_layers_by_role: bool = False
    # Whether training reads every trained parameter's whole gradient (AdaLoRA's sensitivity scores): FSDP gives
    # each process only its shard of them, so plan() refuses hardware.strategy=fsdp with it.
    reads_whole_gradients: bool = False
    # Whether the trained model holds adapter modules wrapped around (or hung on) the base layers: compression
    # that replaces those layers after fit by another kind (packed low-bit weights) cannot keep them.
    wraps_model: bool = False
    # Whether the model's logits are one per input position (what lm-evaluation-harness slices its
    # continuations from); prompt tuning puts its virtual tokens' positions in front, so plan() refuses lm-eval.
    logits_align_with_input: bool = True
    # Whether the strategy trains over a frozen 4-bit base (`model.quantize_base`, QLoRA): LoRA's update does.
    trains_over_4bit_base: bool = False
    # How the folder `save_adapter` writes loads without llmk_lab onto the base the run started from:
    # PEFT_FOLDER (peft's `PeftModel.from_pretrained`), TRAINED_TENSORS (the trained parameters of the model's
    # own modules: `load_state_dict` into the base), or None (it does not; `adapter_refusal` says why).
    adapter_format: Optional[str] = None

    # Whether the strategy's own tensors are shaped by the model's attention-head count (prefix tuning's virtual
    # keys and values): removing heads (structured pruning) would leave them the wrong shape.
    shapes_keys_by_head_count: bool = False

    def __init__(self, settings: Any):
        self.settings = settings

    @property
    def target_modules(self) -> Optional[Any]:
        """The layers the user pointed the strategy at (`peft.target_modules`), or None: its default (for
        strategies without the setting, always)."""
        return None

    def apply(self, model: nn.Module, ctx) -> nn.Module:
        """Freeze / wrap `model`; return the model to train."""
        raise NotImplementedError

    def callbacks(self, ctx) -> list:
        return []

    def no_decay_parameter_names(self, model: nn.Module) -> set[str]:
        """Trainable parameters that weight decay must leave alone (decay pulls toward 0, and for some
        parameters 0 is not the neutral value), beyond biases and norms, which are never decayed."""
        return set()

    def save_adapter(self, model: nn.Module, directory: Path) -> bool:
        """Save only what was trained; False when there is nothing separate to save."""
        return False

    def adapter_refusal(self, model: nn.Module) -> Optional[str]:
        """Why the adapter of trained `model`, loaded without llmk_lab onto the run's base, would not be
        `model` (the adapter export is then left out with this reason, before anything is written), or None."""
        if self.adapter_format is None:
            return "it trains the model's own weights and keeps no separate adapter (model/ holds the model)"
        return None

    def merged(self, model: nn.Module) -> nn.Module:
        """A plain transformers model with the update folded in (may modify `model`)."""
        if not self.mergeable:
            raise UserError(f"peft.method={self.registered_name!r} cannot be merged into the model's weights; "
                            "set export.merged=false")
        return model

    registered_name: str


PEFT: Registry[PeftStrategy] = Registry("peft")

# The forms of `adapter/` (`PeftStrategy.adapter_format`, and the `format` in its llmk_lab.json).
PEFT_FOLDER = "peft"
TRAINED_TENSORS = "trained_tensors"


def check_rank(model: nn.Module, targets: Any, rank: int, key: str) -> None:
    """Refuse a rank above a targeted layer's smaller side: B A of rank r on a d_out x d_in layer has
    r (d_out + d_in) parameters, more than the layer itself once r exceeds min(d_out, d_in), and no more
    expressive than a full update."""
    for name, layer in matching_modules(model, targets, LINEAR_TYPES).items():
        smaller = min(in_features(layer), out_features(layer))
        if rank > smaller:
            raise UserError(f"{key}={rank} is not allowed: the targeted layer {name} is {out_features(layer)} x "
                            f"{in_features(layer)}, and a rank above its smaller side is not low-rank; allowed: "
                            f"1..{smaller} (or target other layers)")


def train_only(model: nn.Module, trainable: set[str]) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)


def resolve_targets(model: nn.Module, target_modules: Optional[Any], default: Optional[str] = None,
                    key: str = "peft.target_modules", kinds: Optional[tuple[type, ...]] = None) -> Any:
    """The user's targets, or `default` (an architecture default; null: the block linears), after checking
    that they match a layer. peft would otherwise fail late with a long message, or (for some methods)
    silently adapt nothing."""
    kinds = kinds or (*LINEAR_TYPES, nn.Embedding)  # the layer types peft's LoRA/IA3 adapt
    if target_modules is None:
        value: Any = default if default is not None else architecture(model).block_linears()
    else:
        value = target_modules if isinstance(target_modules, str) else [str(t) for t in target_modules]
        if not value:
            raise UserError(f"{key}=[] is not allowed: give a regex over module names or a list of name suffixes")
    if not matching_modules(model, value, kinds):
        arch_linears = architecture(model).linears if target_modules is not None else ()
        hint = f" (the block linears are {list(arch_linears)})" if arch_linears else ""
        raise UserError(f"{key}={target_modules if target_modules is not None else value!r} matches no "
                        f"{'/'.join(k.__name__ for k in kinds)} layer of {type(model).__name__}; give a regex "
                        f"over module names or a list of names / dotted suffixes{hint}")
    return value


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks (`llmk_lab.architectures`)."""
    return architecture(model).blocks


def save_trained_tensors(model: nn.Module, directory: Path, config: dict[str, Any]) -> bool:
    """Save the trainable tensors (safetensors) and how they were made (JSON), like peft's adapter folders."""
    from safetensors.torch import save_file

    tensors = {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str))
    return True


def load_trained_tensors(model: nn.Module, directory: Path) -> nn.Module:
    """Load what `save_trained_tensors` wrote into a model prepared by the same strategy."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(directory) / "adapter_model.safetensors"))
    missing = set(tensors) - {name for name, _ in model.named_parameters()}
    if missing:
        raise UserError(f"{directory}: tensors {sorted(missing)[:3]} have no place in {type(model).__name__}; "
                        "apply the same peft strategy before loading")
    model.load_state_dict(tensors, strict=False)
    return model


# Every module of this package registers its peft entries when imported.
import_submodules(__name__, __path__)
