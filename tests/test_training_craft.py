"""Training craft: TensorBoard, early stopping, layer-wise LR decay, adaptive weight decay,
adversarial training and cross-layer pooling, each on a tiny model."""
from __future__ import annotations

import pytest
import torch

from llmk_lab.errors import UserError
from llmk_lab.run import plan
from tests.conftest import compose_config, run_config

# Training long enough to log a few steps.
STEPS = ["train.log_every_n_steps=1", "compression=none"]


def _scalars(event_dir) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_writes_event_files_next_to_the_csv_log(tmp_path, tiny):
    run_config(tiny + STEPS + ["logger.kinds=[csv,tensorboard]"], tmp_path)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events, list(tmp_path.iterdir())
    scalars = _scalars(tmp_path / "tensorboard")
    # 64 examples / batch 16 = 4 optimiser steps, each logged
    assert len(scalars["train/loss"]) == 4 and all(v > 0 for v in scalars["train/loss"])
    assert "val/acc" in scalars
    assert (tmp_path / "csv" / "metrics.csv").exists()


def test_logger_options_compose_and_several_kinds_are_active_at_once():
    assert plan(compose_config(["logger=tensorboard"])).settings.logger.active == ["tensorboard"]
    assert plan(compose_config(["logger=csv"])).settings.logger.active == []
    both = plan(compose_config(["logger.kinds=[wandb,tensorboard]"])).settings.logger
    assert both.active == ["wandb", "tensorboard"]
    with pytest.raises(UserError, match=r"logger\.kinds=\['wandb', 'tb'\].*allowed"):
        plan(compose_config(["logger.kinds=[wandb,tb]"]))
