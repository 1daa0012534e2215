"""The regression task: a sibling of sequence classification added as one file in llmk_lab/tasks/.

A tiny BERT learns a rating that the words of each text determine (good words minus bad words); the run's
Pearson correlation is the one computed by hand from the test outputs it saved, and nothing outside the
tasks package knows the task exists.
"""
from __future__ import annotations

import csv
import random
import re
from pathlib import Path

import numpy as np
import pytest

from llmk_lab import export
from llmk_lab.errors import UserError
from tests.conftest import run_config

GOOD = ["good", "great", "fine", "superb", "lovely"]
BAD = ["bad", "awful", "poor", "dull", "weak"]
NEUTRAL = ["the", "film", "plot", "actor", "scene", "story", "music", "ending", "was", "and"]
ROOT = Path(__file__).resolve().parent.parent


def write_ratings(path: Path, rows: int = 600, label=lambda good, bad: good - bad) -> Path:
    rng = random.Random(0)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["text", "score"])
        writer.writeheader()
        for _ in range(rows):
            good, bad = rng.randint(0, 3), rng.randint(0, 3)
            words = rng.sample(GOOD, good) + rng.sample(BAD, bad) + rng.choices(NEUTRAL, k=rng.randint(3, 8))
            rng.shuffle(words)
            writer.writerow({"text": " ".join(words), "score": label(good, bad)})
    return path


def regression_run(data: Path, extra: list[str] | None = None) -> list[str]:
    return ["model=tiny_bert", "logger=csv", "data=local_csv", f"data.path={data}", "data.label_column=score",
            "data.task=regression", "compression=none", "peft=full", "train.max_epochs=3", "train.lr=1e-3",
            "export.checkpoint=false", *(extra or [])]


def test_a_regression_run_learns_the_rating_and_its_pearson_is_the_hand_computed_one(tmp_path):
    data = write_ratings(tmp_path / "ratings.csv")
    metrics = run_config(regression_run(data), tmp_path / "run")
    assert metrics["test/pearson"] > 0.7  # the words decide the rating; chance is 0
    assert metrics["test/mse"] == pytest.approx(metrics["test/loss"], rel=1e-5)  # the model's loss is the MSE
    inputs, outputs = export.load_reference(tmp_path / "run")
    assert outputs.shape == (100, 1) and len(inputs["labels"]) == 100  # the whole test split, one number each
    predicted, target = outputs[:, 0].double().numpy(), inputs["labels"].double().numpy()
    assert metrics["test/pearson"] == pytest.approx(np.corrcoef(predicted, target)[0, 1], abs=1e-5)
    assert metrics["test/mae"] == pytest.approx(np.abs(predicted - target).mean(), abs=1e-5)
    # the exported model reproduces the run (the task's own agreement: equal numbers)
    assert metrics["export/model_agreement"] == 1.0


def test_regression_labels_that_are_not_numbers_are_refused_in_one_line(tmp_path):
    data = write_ratings(tmp_path / "ratings.csv", label=lambda good, bad: "high" if good > bad else 3)
    with pytest.raises(UserError, match=r"data\.label_column='score': .* 'high', not a number"):
        run_config(regression_run(data), tmp_path / "run")


def test_distillation_is_refused_for_a_task_whose_outputs_are_not_a_distribution(tmp_path):
    data = write_ratings(tmp_path / "ratings.csv")
    with pytest.raises(UserError, match=r"compression.method='distillation' is not possible with task 'regression'"):
        run_config(regression_run(data, ["compression=distillation", "train.max_epochs=1"]), tmp_path / "run")


def test_no_module_outside_the_tasks_package_switches_on_a_task_name():
    """Task behaviour is declared on the Task classes: the pipeline, data, training, measurement and export
    never compare a task's name, and the regression task is known only to its own file."""
    outside = [p for p in (ROOT / "llmk_lab").rglob("*.py") if "tasks" not in p.relative_to(ROOT / "llmk_lab").parts]
    # a name compared with a literal, or looked up in a tuple of task names
    switch = re.compile(r"(registered_name|task_name|\[\"task\"\])\s*((==|!=)\s*[\"']|(not )?in\s*(\(|\[|[A-Z_]*TASKS\b))")
    offenders = [f"{p.name}: {line.strip()}" for p in outside for line in p.read_text().splitlines()
                 if switch.search(line) or "regression" in line]
    assert offenders == []
