"""PEFT strategies: which parameters train, and how the result is saved and merged.

Strategies the peft library covers are thin wrappers over it; the rest are
one file each here. Adding one is one Python file and one YAML in `conf/peft/`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from llmk_lab.errors import UserError
from llmk_lab.registry import Registry, import_submodules


class PeftStrategy:
    # Whether the trained update can be folded into plain weights.
    mergeable: bool = True

    def __init__(self, settings: Any):
        self.settings = settings

    def apply(self, model: nn.Module, ctx) -> nn.Module:
        """Freeze / wrap `model`; return the model to train."""
        raise NotImplementedError

    def callbacks(self, ctx) -> list:
        return []

    def save_adapter(self, model: nn.Module, directory: Path) -> bool:
        """Save only what was trained; False when there is nothing separate to save."""
        return False

    def merged(self, model: nn.Module) -> nn.Module:
        """A plain transformers model with the update folded in (may modify `model`)."""
        if not self.mergeable:
            raise UserError(f"peft.method={self.registered_name!r} cannot be merged into the model's weights; "
                            "set export.merged=false")
        return model

    registered_name: str


PEFT: Registry[PeftStrategy] = Registry("peft")


def head_parameter_names(model: nn.Module, task) -> list[str]:
    """Parameters of the task head (always trained)."""
    names = [n for n, _ in model.named_parameters() if n.split(".")[0] in task.head_modules]
    if not names:
        raise UserError(f"model {type(model).__name__} has no task head named one of {task.head_modules}")
    return names


def train_only(model: nn.Module, trainable: set[str]) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)


# Every module of this package registers its peft entries when imported.
import_submodules(__name__, __path__)
