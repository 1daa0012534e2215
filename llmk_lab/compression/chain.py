"""Several compression methods in one run, applied in the order given.

    compression:
      method: chain
      steps:
        - {method: magnitude, sparsity: 0.5}
        - {method: dynamic_int8}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmk_lab.compression import COMPRESSION, CompressionMethod
from llmk_lab.errors import UserError


@dataclass
class ChainConfig:
    method: str = "chain"
    # Each step is the config of one method, with its `method` key.
    steps: list[Any] = field(default_factory=list)


@COMPRESSION.register("chain", config=ChainConfig)
class Chain(CompressionMethod):
    def __init__(self, settings: ChainConfig):
        super().__init__(settings)
        if not settings.steps:
            raise UserError("compression.steps=[] is not allowed: a chain needs at least one step")
        self.step_methods: list[CompressionMethod] = []
        for i, step in enumerate(settings.steps):
            if isinstance(step, dict) and step.get("method") == "chain":
                raise UserError(f"compression.steps[{i}].method='chain' is not allowed: chains do not nest")
            self.step_methods.append(COMPRESSION.build(step, f"compression.steps[{i}]"))
        quantizers = [i for i, step in enumerate(self.step_methods) if step.quantizes_weights]
        if len(quantizers) > 1:
            names = [self.step_methods[i].registered_name for i in quantizers]
            raise UserError(f"compression.steps[{quantizers[1]}].method={names[1]!r} is not allowed: step "
                            f"{quantizers[0]} ({names[0]!r}) already quantises the weights; a chain quantises "
                            "once (prune first, then one quantisation step)")

    def steps(self) -> list[CompressionMethod]:
        return list(self.step_methods)
