"""What the stages of a run share: passed to compression methods and PEFT strategies."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


@dataclass
class RunContext:
    settings: Any  # the validated RunConfig dataclass
    run_dir: Path
    task: Any
    tokenizer: Any
    model: Any  # replaced by stages that wrap or rebuild the model
    datamodule: Any
    # The Lightning module, once built (fit-time methods add loss terms to it).
    module: Optional[Any] = None
    # The model as loaded, before any compression, when a method needs a reference.
    dense_model: Optional[Any] = None
    # What each stage reports; flattened into metrics.json.
    reports: dict[str, Any] = field(default_factory=dict)
