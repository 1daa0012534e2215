"""What the stages of a run share: passed to compression methods and PEFT strategies.

Every field is declared here, and the class has slots: a stage that needs to
leave something for a later one adds a field with its meaning, instead of
setting an attribute nobody else knows about.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from llmk_lab.config import RunConfig
    from llmk_lab.data.module import TaskDataModule
    from llmk_lab.module import TaskModule
    from llmk_lab.tasks import Task


@dataclass(slots=True)
class RunContext:
    settings: RunConfig  # the validated config
    run_dir: Path
    task: Task
    tokenizer: PreTrainedTokenizerBase
    model: nn.Module  # replaced by stages that wrap or rebuild the model
    datamodule: TaskDataModule
    # The Lightning module, once built.
    module: Optional[TaskModule] = None
    # The model as loaded, before any compression, when a method needs a reference.
    dense_model: Optional[nn.Module] = None
    # The compression method that quantised the model, if one did: a second quantisation is refused.
    quantized_by: Optional[str] = None
    # The deployable copy of the final model (adapter merged, eval mode, CPU), built once after training
    # and shared by the after-merge sparsity, size, latency, fidelity and the exports, with the model it
    # was built from (a copy of another model is never reused): see `measure.deployed`.
    deployed: Optional[tuple[nn.Module, nn.Module]] = None
    # What each stage reports; flattened into metrics.json.
    reports: dict[str, Any] = field(default_factory=dict)
