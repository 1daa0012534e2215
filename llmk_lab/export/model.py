"""`model/` at the end of a run: the final model written in its format, reloaded, and checked against the run's own
test outputs (`reference/test.safetensors`); `check_model_dir` checks a finished run's folder again.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Optional

from llmk_lab.compression.weight_sharing import untie_shared_weights
from llmk_lab.export.formats import (INFO_FILE, MODEL_DIR, OUTPUT_TOLERANCE, not_exportable_reason, finished_model_dir,
                                     linear_sparsity, load_exported, read_info, save_model, task_info)
from llmk_lab.measure import deployed
from llmk_lab.reference import (CHECK_EXAMPLES, agreement, check_subset, load_reference, outputs_by_length,
                                reference_inputs, run_outputs, save_reference)
from llmk_lab.training import pooling
from llmk_lab.paths import write_text_atomically

log = logging.getLogger(__name__)


def export_model(ctx, strategy) -> dict[str, str]:
    """Write `model/` and the test reference at the end of a run; figures go to `ctx.reports`.

    An export that cannot be written or does not reproduce the run is left out, and `export/model`
    in metrics.json says why (a warning says so too): a run never fails because of it."""
    run_dir, task = ctx.run_dir, ctx.task
    written: dict[str, str] = {}
    ours = inputs = None
    try:
        inputs = reference_inputs(task, ctx.tokenizer, ctx.datamodule.splits["test"])
        # The test stage's own outputs where they are a float32 pass (llmk_lab.reference), so the
        # trained model is not run over the test examples a second time.
        ours, ctx.reports["export/reference_outputs"] = run_outputs(ctx, inputs)
        written["reference"] = str(save_reference(run_dir, inputs, ours, task.registered_name))
    except Exception as err:  # noqa: BLE001  (recorded, and the model/ export is then not checked)
        return _left_out(ctx, written, f"the run's test outputs could not be recorded ({one_line(err)})")
    try:
        reason = _write_model(ctx, strategy, ours, inputs)
    except Exception as err:  # noqa: BLE001  (an export that cannot be reloaded does not reproduce the run)
        reason = f"saving or reloading it failed ({one_line(err)})"
    if reason is not None:
        shutil.rmtree(run_dir / MODEL_DIR, ignore_errors=True)
        return _left_out(ctx, written, reason)
    ctx.reports["export/model"] = str(run_dir / MODEL_DIR)
    written["model"] = str(run_dir / MODEL_DIR)
    return written

def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__

def _left_out(ctx, written: dict, reason: str) -> dict:
    ctx.reports["export/model"] = f"not written: {reason}"
    log.warning("no model/ export: %s", reason)
    return written

def _write_model(ctx, strategy, ours, inputs) -> Optional[str]:
    """Save the deployable model to `model/`, reload it without llmk_lab and compare; the reason it is not
    a faithful export, or None."""
    task, dest, train = ctx.task, ctx.run_dir / MODEL_DIR, ctx.settings.train
    if pooling.enabled(train):
        return (f"train.pooling={train.pooling!r} / train.layer_mix={train.layer_mix!r} give the model a "
                "cross-layer head that no transformers class has (a plain model would predict with its own, "
                "bypassed head); the Lightning checkpoint (export.checkpoint=true) holds it")
    final = deployed(ctx, strategy)  # the copy the figures measured (unmergeable: a plain copy)
    untie_shared_weights(final)  # transformers' format has no cross-layer sharing: each block saves its own copy
    reason = not_exportable_reason(final)
    if reason is not None:
        return reason
    extra = save_model(final, dest)
    ctx.tokenizer.save_pretrained(dest)
    before = linear_sparsity(final)
    # eval_batch_size: torch.ao's dynamic int8 scales activations per batch, so a check reproduces the run's
    # outputs exactly only in the test loader's batches (outputs_by_length).
    info = task_info(task, ctx.settings.data, {"linear_sparsity": before["overall"],
                                               "eval_batch_size": int(ctx.settings.train.eval_batch_size), **extra})
    write_text_atomically(dest / INFO_FILE, json.dumps(info, indent=2) + "\n")
    ctx.reports["export/model_format"] = info["format"]
    reloaded, unused = load_exported(dest, info, loading_info=True)
    if unused:  # e.g. adapter modules inside the model: saved, but plain transformers has no place for them
        return (f"{len(unused)} weights do not load into plain {task.auto_class.__name__} "
                f"(e.g. {unused[0]})")
    after = linear_sparsity(reloaded)
    ctx.reports["export/model_sparsity_before"] = before["overall"]
    ctx.reports["export/model_sparsity_after"] = after["overall"]
    if after["overall"] != before["overall"]:
        return f"its linear-layer sparsity changed on reloading ({before['overall']:.4f} -> {after['overall']:.4f})"
    if ours is not None:
        batch_size = ctx.settings.train.eval_batch_size
        picked = check_subset(inputs, batch_size, CHECK_EXAMPLES)
        if picked is not None:
            inputs, ours = {k: v[picked] for k, v in inputs.items()}, ours[picked]
        ctx.reports["export/model_checked_examples"] = len(ours)
        theirs = outputs_by_length(reloaded, task.registered_name, inputs, batch_size)
        figures, reason = compare_outputs(task.registered_name, ours, theirs, inputs.get("labels"))
        ctx.reports.update({f"export/model_{k}": v for k, v in figures.items()})
        return reason
    return None

def compare_outputs(task_name: str, ours, theirs, labels=None) -> tuple[dict[str, float], Optional[str]]:
    """`agreement` of an export's outputs with the run's, and why the export does not reproduce the run (None
    when it does): every prediction the same, and no output further than OUTPUT_TOLERANCE from the run's."""
    figures = agreement(task_name, ours, theirs, labels)
    if figures["agreement"] < 1.0:
        return figures, f"reloaded, it agreed with the run on {figures['agreement']:.1%} of test predictions"
    scale = 1.0 + float(ours.abs().max())
    if figures["max_abs_diff"] > OUTPUT_TOLERANCE * scale:  # same labels can hide a model that lost a part
        return figures, (f"reloaded, its outputs differ from the run's by up to {figures['max_abs_diff']:.3g} "
                         "(same labels, different model)")
    return figures, None

def check_model_dir(run_dir: Path) -> dict[str, float]:
    """Reload `model/` without llmk_lab and compare with the run's reference outputs."""
    folder = finished_model_dir(run_dir)
    info = read_info(folder)
    model = load_exported(folder, info)
    inputs, reference = load_reference(folder.parent)
    outputs = outputs_by_length(model, info["task"], inputs, info.get("eval_batch_size", 64))
    figures = agreement(info["task"], reference, outputs, inputs.get("labels"))
    figures["sparsity"] = linear_sparsity(model)["overall"]
    figures["sparsity_recorded"] = info.get("linear_sparsity")
    return figures
