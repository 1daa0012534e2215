"""Compression methods: one file each, registered with their config schema.

A method acts at one or more points of the run and says so in `acts`:
`before_fit(ctx)` (one-shot, on weights and calibration data), `callbacks(ctx)`
(Lightning callbacks or loss terms during fit), `after_fit(ctx)` (post-training).
`run` calls every hook of every configured method in order and never looks at
names, so adding a method is one Python file here and one YAML in
`conf/compression/`.
"""
from __future__ import annotations

import re
from typing import Any, Optional

import torch
from torch import nn

from llmk_lab.errors import UserError
from llmk_lab.registry import Registry, import_submodules


class CompressionMethod:
    acts: tuple[str, ...] = ()  # of "before_fit", "during_fit", "after_fit"

    def __init__(self, settings: Any):
        self.settings = settings
        # What the method did, e.g. the layers it pruned: recorded in metrics.json.
        self.report: dict[str, Any] = {}

    def before_fit(self, ctx) -> None:
        pass

    def callbacks(self, ctx) -> list:
        return []

    def after_fit(self, ctx) -> None:
        pass


COMPRESSION: Registry[CompressionMethod] = Registry("compression")


def build_methods(node, path: str = "compression") -> list[CompressionMethod]:
    """The configured method as a list (a chain yields its steps, in order)."""
    if node is None:
        return []
    method = COMPRESSION.build(node, path)
    return list(getattr(method, "steps", [method]))


def target_linears(model: nn.Module, target_modules: Optional[Any], key: str) -> dict[str, nn.Linear]:
    """Linear layers to compress: the model's transformer-block linears by default.

    `target_modules` is a regex over module names or a list of name suffixes.
    """
    from llmk_lab.models import block_linear_pattern

    if target_modules is None:
        pattern = block_linear_pattern(model)
        match = lambda name: re.fullmatch(pattern, name) is not None  # noqa: E731
    elif isinstance(target_modules, str):
        match = lambda name: re.fullmatch(target_modules, name) is not None  # noqa: E731
    else:
        suffixes = tuple(target_modules)
        match = lambda name: name.split(".")[-1] in suffixes or name in suffixes  # noqa: E731
    found = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and match(name)}
    if not found:
        raise UserError(f"{key}={target_modules!r} matches no linear layer of the model")
    return found


# Every module of this package registers its compression entries when imported.
import_submodules(__name__, __path__)
