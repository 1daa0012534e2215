"""What the run predicted on its test split, taken from the test stage itself.

The export checks (`export.export_model`) compare the exported model with the run's own outputs on the
first test examples (the task's `reference_size`), and `reference/test.safetensors` keeps those outputs.
They are the test stage's: `TaskModule.test_step` hands each batch's outputs to a `RecordedTestOutputs`,
so the trained model goes over the test split once and the export runs only the reloaded copy. Where the
test stage's outputs are not what a float32 pass of the trained model gives, the export runs the trained
model over the reference examples instead, and `export/reference_outputs` in metrics.json says why: mixed
precision, a distributed run (each process scores a shard), a test stage cut to some batches, left padding,
or a task whose evaluation keeps no per-example logits (causal and masked LM score their loss in chunks).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from llmk_lab.errors import UserError
from llmk_lab.tasks import INPUT_KEYS, Task, task_class


FULL_PRECISION = ("32-true", "32")
FROM_TEST_STAGE = "test stage"
REFERENCE_FILE = Path("reference") / "test.safetensors"
# Reference examples the run checks the reloaded model/ on: whole test batches spread over the lengths
# (`reference.check_subset`), one evaluation batch by default. The stored reference keeps them all (how many:
# the task's `reference_size`), and `python -m llmk_lab.export RUN_DIR` checks every one; in the run, a pass
# over all of them would cost as much as the test stage itself.
CHECK_EXAMPLES = 128


# ----------------------------------------------------------------------------- what the run predicted

def reference_inputs(task: Task, tokenizer, examples: list[dict], limit: Optional[int] = None) -> dict:
    """The first `limit` test examples (default: the task's `reference_size`) as one batch of tensors, with
    their labels."""
    return task.reference_batch(tokenizer, examples[:task.reference_size if limit is None else limit])


def model_outputs(model, task_name: str, inputs: dict, batch_size: int = 64):
    """What the reference keeps of the model's outputs (the task's `example_outputs`: logits for classification
    and NER, the mean token NLL of each window for language models), on CPU, in batches."""
    task = task_class(task_name)
    model = model.eval()
    device = next(model.parameters()).device
    if task.scores == "text":
        batch_size = 1  # windows are long and the vocabulary large: one window's logits at a time
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(inputs["input_ids"]), batch_size):
            batch = {k: v[start:start + batch_size].to(device) for k, v in inputs.items()}
            out = model(**{k: v for k, v in batch.items() if k in INPUT_KEYS})
            # BERT's pretraining heads (masked LM + NSP) call the token scores prediction_logits.
            logits = (out.logits if "logits" in out else out["prediction_logits"]).float()
            outputs.append(task.example_outputs(logits, batch).cpu())
    return torch.cat(outputs)


def agreement(task_name: str, ours, theirs, labels=None) -> dict[str, float]:
    """How far two models' outputs on the same inputs are apart (the task's `agreement`)."""
    return task_class(task_name).agreement(ours, theirs, labels)


def save_reference(run_dir: Path, inputs: dict, outputs, task_name: str) -> Path:
    from safetensors.torch import save_file

    path = run_dir / REFERENCE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in inputs.items()}
    tensors["outputs"] = outputs.contiguous()
    save_file(tensors, str(path), metadata={"task": task_name})
    return path


def load_reference(run_dir: Path) -> tuple[dict, Any]:
    from safetensors.torch import load_file

    path = Path(run_dir) / REFERENCE_FILE
    if not path.exists():
        raise UserError(f"{run_dir}: no {REFERENCE_FILE} (the run's own test outputs); it was written by a run "
                        "before exports existed, or the run did not finish: run it again")
    tensors = load_file(str(path))
    outputs = tensors.pop("outputs")
    return tensors, outputs


class RecordedTestOutputs:
    """The test stage's logits on the reference examples (test split indices below `limit`), each checked
    against the tokens of the example it should belong to, so a loader that changed its order or its
    examples cannot pass another example's outputs off as the run's."""

    def __init__(self, examples: list[dict], order: list[int], limit: int, model, refusal: Optional[str] = None):
        self.examples, self.order, self.limit, self.model = examples, order, limit, model
        self.rows: dict[int, torch.Tensor] = {}
        self.seen = 0
        # Why these outputs cannot serve as the reference (None while they can).
        self.refusal = refusal

    def add(self, batch: dict, outputs: Any) -> None:
        if self.refusal is not None:
            return
        logits = getattr(outputs, "logits", None)
        if logits is None:
            self.refusal = "the test stage's outputs hold no logits"
            return
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        for row in range(len(ids)):
            if self.seen >= len(self.order):
                self.refusal = "the test stage scored more examples than the test split has"
                return
            index = self.order[self.seen]
            self.seen += 1
            if index >= self.limit:
                continue
            attended = mask[row].bool() if mask is not None else torch.ones_like(ids[row], dtype=torch.bool)
            if not torch.equal(ids[row][attended].cpu(), torch.as_tensor(self.examples[index]["input_ids"])):
                self.refusal = f"the test stage's example {self.seen - 1} is not test example {index}"
                return
            out = logits[row][attended] if logits.ndim == 3 else logits[row]  # per token: its real tokens
            self.rows[index] = out.detach().float().cpu().clone()

    def outputs(self, inputs: dict, model) -> tuple[Optional[torch.Tensor], Optional[str]]:
        """The recorded outputs laid out as `inputs` (the reference batch; per-token logits at its attended
        positions, zero at padding), or None and why not."""
        n = len(inputs["input_ids"])
        if self.refusal is not None:
            return None, self.refusal
        if model is not self.model:
            return None, "the model changed after the test stage"
        missing = [i for i in range(n) if i not in self.rows]
        if missing:
            return None, (f"the test stage scored {n - len(missing)} of the {n} reference examples "
                          "(limited test batches)")
        first = self.rows[0]
        if first.ndim == 1:
            return torch.stack([self.rows[i] for i in range(n)]), None
        mask = inputs["attention_mask"].bool()
        laid_out = first.new_zeros(n, mask.shape[1], first.shape[-1])
        for i in range(n):
            laid_out[i][mask[i]] = self.rows[i]
        return laid_out, None


def record_test_stage(ctx, trainer, limit: Optional[int] = None) -> RecordedTestOutputs:
    """What `TaskModule.test_step` records the test stage's outputs into for the export's reference (the
    first `limit` test examples, default the task's `reference_size`), refusing up front where they would
    not be a float32 pass of the whole model over the examples."""
    settings = ctx.settings
    limit = ctx.task.reference_size if limit is None else limit
    refusal = None
    if not ctx.task.test_stage_keeps_outputs:
        refusal = f"the {ctx.task.registered_name} evaluation keeps no per-example logits"
    elif str(settings.hardware.precision) not in FULL_PRECISION:
        refusal = f"hardware.precision={settings.hardware.precision}: the test stage is not a float32 pass"
    elif trainer.world_size > 1:
        refusal = f"each of the {trainer.world_size} processes scored a shard of the test split"
    elif getattr(ctx.tokenizer, "padding_side", "right") != "right":
        # The evaluation batches pad each example to its batch's longest, the reference to the longest of
        # all: with left padding that moves its tokens, which models with absolute positions do not ignore.
        refusal = "the tokenizer pads on the left"
    examples = ctx.datamodule.splits["test"]
    order = ctx.datamodule.eval_order("test") if refusal is None else []
    return RecordedTestOutputs(examples, order, min(limit, len(examples)), ctx.model, refusal)


def run_outputs(ctx, inputs: dict) -> tuple[torch.Tensor, str]:
    """The run's outputs on the reference inputs and where they come from: the test stage's, or (where
    those cannot serve) a pass of the trained model, as before the test stage kept them."""
    record: Optional[RecordedTestOutputs] = ctx.module.test_outputs
    reason = "the test stage kept no outputs"
    if record is not None:
        ours, reason = record.outputs(inputs, ctx.model)
        if ours is not None:
            return ours, FROM_TEST_STAGE
    was_training = ctx.model.training
    ours = outputs_by_length(ctx.model, ctx.task.registered_name, inputs, ctx.settings.train.eval_batch_size)
    ctx.model.train(was_training)
    return ours, f"a second pass of the trained model ({reason})"


def outputs_by_length(model, task_name: str, inputs: dict, batch_size: int = 64) -> torch.Tensor:
    """`model_outputs` in batches of examples of similar length, each batch cut to the positions
    its examples attend: the same outputs as one batch padded to the longest example (padding is masked),
    for the padded work of the evaluation loader. Per-token outputs are zero at padding."""
    mask = inputs.get("attention_mask")
    if mask is None or bool(mask.all()):  # nothing padded (LM windows)
        return model_outputs(model, task_name, inputs, batch_size)
    n, width = mask.shape
    order = torch.argsort(mask.sum(-1), stable=True)
    result: Optional[torch.Tensor] = None
    for start in range(0, n, batch_size):
        rows = order[start:start + batch_size]
        # Only trailing padding is cut: a model with absolute positions sees a left-padded example at
        # other positions when its leading padding changes.
        columns = torch.arange(int(mask[rows].any(0).nonzero().max()) + 1)
        chunk = {k: (v[rows][:, columns] if v.ndim >= 2 and v.shape[:2] == (n, width) else v[rows])
                 for k, v in inputs.items()}
        out = model_outputs(model, task_name, chunk, len(rows))
        if out.ndim == 3:  # per token: back to the full width, zero where nothing is attended
            out = out * chunk["attention_mask"][..., None].to(out.dtype)
        if result is None:
            shape = (n, width, *out.shape[2:]) if out.ndim == 3 else (n, *out.shape[1:])
            result = out.new_zeros(shape)
        if out.ndim == 3:
            result[rows[:, None], columns[None, :]] = out
        else:
            result[rows] = out
    return result


def check_subset(inputs: dict, batch_size: int, examples: int) -> Optional["torch.Tensor"]:
    """Indices of whole batches of the reference, as `outputs_by_length` groups them (by length, which is
    how the test loader grouped them: a model whose outputs depend on the rest of the batch, e.g. dynamic
    int8 activation scales, is checked on the very batches it was tested on), holding at least `examples`
    examples spread over the length order (the middle batch of each of as many equal stretches); None
    when that is every batch."""
    n = len(inputs["input_ids"])
    mask = inputs.get("attention_mask")
    padded = mask is not None and not bool(mask.all())
    order = torch.argsort(mask.sum(-1), stable=True) if padded else torch.arange(n)
    batches = list(torch.split(order, batch_size))
    wanted = -(-examples // batch_size)
    if wanted >= len(batches):
        return None
    picked = [batches[int((i + 0.5) * len(batches) / wanted)] for i in range(wanted)]
    return torch.sort(torch.cat(picked)).values
