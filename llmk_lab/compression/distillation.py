"""Knowledge distillation from a teacher into the model being trained (Hinton et al. 2015).

The student's loss is

    alpha * task_loss + (1 - alpha) * T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T))

added as a term of the training loss (`loss_term`). The teacher is either

- `teacher: PATH`: a fine-tuned Hugging Face model directory (or hub id, or
  asset:NAME) with the task's head and the same labels, or
- `teacher: dense`: the dense model as loaded, fully fine-tuned first in this
  run for `teacher_epochs` (before the student trains), so a pruned or
  shallower student (chain it after `structured`, `magnitude`...) learns
  from its own uncompressed parent. That teacher also becomes the run's dense
  reference, so fidelity is measured against it.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from llmk_lab.compression import COMPRESSION, CompressionMethod, LossTerm
from llmk_lab.errors import UserError, check
from llmk_lab.models import resolve_model_reference
from llmk_lab.module import TaskModule

log = logging.getLogger(__name__)


@dataclass
class DistillationConfig:
    method: str = "distillation"
    # `dense` (fine-tune the loaded dense model first, in this run) or a model directory / hub id / asset:NAME.
    teacher: str = "dense"
    # Weight of the task loss; 1 - alpha goes to the distillation term.
    alpha: float = 0.5
    # Softmax temperature T of both teacher and student.
    temperature: float = 2.0
    # Epochs of full fine-tuning of the dense teacher (teacher: dense).
    teacher_epochs: int = 1
    # Learning rate of that fine-tuning (full fine-tuning needs a smaller one than adapters).
    teacher_lr: float = 5.0e-5

    def __post_init__(self):
        check(0 <= self.alpha <= 1, "alpha", self.alpha, "a number in [0, 1]")
        check(self.temperature > 0, "temperature", self.temperature, "a positive number")
        check(self.teacher_epochs >= 1, "teacher_epochs", self.teacher_epochs, "an integer >= 1")
        check(self.teacher_lr > 0, "teacher_lr", self.teacher_lr, "a positive number")
        check(bool(self.teacher), "teacher", self.teacher, "'dense' or a model directory")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, task_loss: torch.Tensor,
                      alpha: float, temperature: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """alpha * task + (1 - alpha) * T^2 * mean KL(teacher_T || student_T) over the valid positions."""
    classes = student_logits.shape[-1]
    student, teacher = student_logits.reshape(-1, classes), teacher_logits.reshape(-1, classes)
    if valid is not None:
        student, teacher = student[valid.reshape(-1)], teacher[valid.reshape(-1)]
    kl = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                  log_target=True, reduction="batchmean")
    return alpha * task_loss + (1 - alpha) * temperature ** 2 * kl


def check_labels(teacher, ctx, reference: str) -> None:
    labels = ctx.task.labels
    if not labels:
        return
    taught = getattr(teacher.config, "id2label", None) or {}
    taught = [taught[i] for i in sorted(taught, key=int)] if taught else []
    if taught != list(labels):
        raise UserError(f"compression.teacher={reference!r} predicts labels {taught} but the task has {list(labels)}; "
                        "allowed: a teacher fine-tuned on the same label set, in the same order")


def load_teacher(reference: str, ctx):
    path, _ = resolve_model_reference(reference, "compression.teacher")
    try:
        # No label arguments: the teacher's own head and label names are what must match.
        teacher = ctx.task.auto_class.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise UserError(f"compression.teacher={reference!r}: cannot load ({str(err).splitlines()[0]})") from None
    check_labels(teacher, ctx, reference)
    return teacher


def finetune_dense_teacher(ctx, settings: DistillationConfig):
    source = ctx.dense_model if ctx.dense_model is not None else ctx.model
    teacher = copy.deepcopy(source)
    for param in teacher.parameters():
        param.requires_grad_(True)
    train = copy.copy(ctx.settings.train)
    train.lr, train.max_epochs, train.max_steps = settings.teacher_lr, settings.teacher_epochs, -1
    module = TaskModule(teacher, ctx.task, train)
    hw = ctx.settings.hardware
    trainer = pl.Trainer(accelerator=hw.accelerator, devices=1, precision=hw.precision,
                         max_epochs=settings.teacher_epochs, gradient_clip_val=train.grad_clip,
                         fast_dev_run=train.fast_dev_run, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
                         limit_val_batches=0, default_root_dir=str(ctx.run_dir / "teacher"))
    module.train()
    log.info("fine-tuning the dense teacher for %d epoch(s)", settings.teacher_epochs)
    trainer.fit(module, datamodule=ctx.datamodule)
    return teacher.cpu().eval()


class TeacherPlacement(pl.Callback):
    def __init__(self, teacher):
        self.teacher = teacher

    def on_fit_start(self, trainer, pl_module):
        self.teacher.to(pl_module.device)


@COMPRESSION.register("distillation", config=DistillationConfig)
class Distillation(CompressionMethod):
    reads_uncompressed_model = True  # the dense teacher is fine-tuned from the model as loaded

    def __init__(self, settings):
        super().__init__(settings)
        self.teacher = None

    def before_fit(self, ctx) -> None:
        s = self.settings
        if not ctx.task.scores_a_distribution:
            raise UserError(f"compression.method='distillation' is not possible with task {ctx.task.registered_name!r}: "
                            "its head's outputs are not a distribution to match with KL; allowed: a classification "
                            "or language-model task")
        if s.teacher == "dense":
            self.teacher = finetune_dense_teacher(ctx, s)
            # The fine-tuned dense model is the uncompressed counterpart the student is measured against.
            ctx.dense_model = copy.deepcopy(self.teacher)
            ctx.reports["measure/reference"] = "dense teacher fine-tuned in this run"
        else:
            self.teacher = load_teacher(s.teacher, ctx).eval()
        for param in self.teacher.parameters():
            param.requires_grad_(False)
        self.report = {"teacher": s.teacher, "alpha": s.alpha, "temperature": s.temperature}

    def callbacks(self, ctx) -> list:
        return [TeacherPlacement(self.teacher)]

    def loss_term(self, ctx) -> LossTerm:
        teacher, s, task = self.teacher, self.settings, ctx.task

        def distill(batch, outputs, loss):
            with torch.no_grad():
                teacher_logits = task.logits(teacher(**batch))
            logits = task.logits(outputs)
            labels = batch.get("labels")
            valid = labels != -100 if labels is not None and labels.shape == logits.shape[:-1] else None
            return distillation_loss(logits, teacher_logits, loss, s.alpha, s.temperature, valid)

        return distill
