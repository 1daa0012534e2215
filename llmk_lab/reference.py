"""What the run predicted on its test split, taken from the test stage itself.

The export checks (`export.export_model`) compare the exported model with the run's own outputs on the
first `REFERENCE_EXAMPLES` test examples, and `reference/test.safetensors` keeps those outputs.
They are the test stage's: `TaskModule.test_step` hands each batch's outputs to a `RecordedTestOutputs`,
so the trained model goes over the test split once and the export runs only the reloaded copy. Where the
test stage's outputs are not what a float32 pass of the trained model gives, the export runs the trained
model over the reference examples instead, and `export/reference_outputs` in metrics.json says why: mixed
precision, a distributed run (each process scores a shard), a test stage cut to some batches, left padding,
or a task whose evaluation keeps no per-example logits (causal and masked LM score their loss in chunks).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from llmk_lab.errors import UserError

if TYPE_CHECKING:  # torch is imported where it is used: `llmk_lab.export` imports this module at start-up
    import torch

# Tasks whose test-stage outputs are the reference's (logits per example or per token, as
# `model_outputs` gives them).
RECORDED_TASKS = ("sequence_classification", "token_classification")
FULL_PRECISION = ("32-true", "32")
FROM_TEST_STAGE = "test stage"
REFERENCE_FILE = Path("reference") / "test.safetensors"
# Test examples whose outputs the run keeps (classification and NER: the default test split is 1,000);
# causal LM: windows, each scored by its mean token NLL.
REFERENCE_EXAMPLES = 1000
REFERENCE_WINDOWS = 16
# Reference examples the run checks the reloaded model/ on: whole test batches spread over the lengths
# (`reference.check_subset`), one evaluation batch by default. The stored reference keeps them all, and
# `python -m llmk_lab.export RUN_DIR` checks every one; in the run, a pass over all of them would cost as
# much as the test stage itself.
CHECK_EXAMPLES = 128
# Tasks whose outputs the reference stores and predictions are checked on.
CHECKED_TASKS = ("sequence_classification", "token_classification", "causal_lm", "masked_lm", "masked_lm_nsp")
# Language-model tasks: the reference holds a few windows, each scored by its mean token NLL.
LM_TASKS = ("causal_lm", "masked_lm", "masked_lm_nsp")
MASKED_LM_TASKS = ("masked_lm", "masked_lm_nsp")
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


# ----------------------------------------------------------------------------- what the run predicted

def reference_inputs(task, tokenizer, examples: list[dict], limit: Optional[int] = None) -> dict:
    """The first `limit` test examples as one padded batch of tensors (with their labels)."""
    import torch

    if limit is None:
        limit = REFERENCE_WINDOWS if task.registered_name in LM_TASKS else REFERENCE_EXAMPLES
    examples = examples[:limit]
    if task.registered_name == "causal_lm":
        ids = torch.stack([torch.as_tensor(e["input_ids"]) for e in examples])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    features = [{k: e[k] for k in INPUT_KEYS if k in e} for e in examples]
    batch = dict(tokenizer.pad(features, padding="longest", return_tensors="pt"))
    width = batch["input_ids"].shape[1]
    labels = []
    for e in examples:
        label = e.get("labels")
        if isinstance(label, (list, tuple)) or getattr(label, "ndim", 0):  # per token: pad with -100
            label = list(label) + [-100] * (width - len(label))
        labels.append(label)
    batch["labels"] = torch.tensor(labels)
    return {k: v for k, v in batch.items() if k in (*INPUT_KEYS, "labels")}


def model_outputs(model, task_name: str, inputs: dict, batch_size: int = 64):
    """Logits (classification, NER) or mean token NLL per window (causal LM; masked LM: over its masked
    tokens), on CPU, in batches."""
    import torch

    model = model.eval()
    device = next(model.parameters()).device
    feed = {k: v for k, v in inputs.items() if k in INPUT_KEYS}
    if task_name in LM_TASKS:
        batch_size = 1  # windows are long and the vocabulary large: one window's logits at a time
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(feed["input_ids"]), batch_size):
            batch = {k: v[start:start + batch_size].to(device) for k, v in feed.items()}
            out = model(**batch)
            # BERT's pretraining heads (masked LM + NSP) call the token scores prediction_logits.
            logits = (out.logits if "logits" in out else out["prediction_logits"]).float()
            if task_name in MASKED_LM_TASKS:
                labels = inputs["labels"][start:start + batch_size].to(device)
                logits = logits[:, -labels.shape[1]:]
                nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100,
                                                        reduction="none").sum(-1)
                outputs.append((nll / (labels != -100).sum(-1).clamp_min(1)).double().cpu())
            elif task_name == "causal_lm":
                ids = batch["input_ids"]
                logits = logits[:, -ids.shape[1]:]  # prompt tuning puts virtual tokens in front
                nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:],
                                                        reduction="none").mean(-1)
                outputs.append(nll.double().cpu())
            else:
                outputs.append(logits.cpu())
    return torch.cat(outputs)


def agreement(task_name: str, ours, theirs, labels=None) -> dict[str, float]:
    """How far two models' outputs on the same inputs are apart: identical predictions, largest difference."""
    import torch

    if task_name in LM_TASKS:
        return {"agreement": float(torch.isclose(ours, theirs, rtol=1e-4, atol=1e-5).double().mean()),
                "max_abs_diff": float((ours - theirs).abs().max())}
    same, gap = ours.argmax(-1) == theirs.argmax(-1), (ours - theirs).abs()
    if task_name == "token_classification" and labels is not None:
        read = labels != -100  # the words' first sub-tokens: where a tag is read (padding is not)
        same, gap = same[read], gap[read]
    return {"agreement": float(same.double().mean()), "max_abs_diff": float(gap.max())}


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
        import torch

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
        import torch

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
    first `limit` test examples, default `REFERENCE_EXAMPLES`), refusing up front where they would
    not be a float32 pass of the whole model over the examples."""
    settings = ctx.settings
    limit = REFERENCE_EXAMPLES if limit is None else limit
    refusal = None
    if ctx.task.registered_name not in RECORDED_TASKS:
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
    import torch

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
    import torch

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
