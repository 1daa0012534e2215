"""`adapter/`: the adapter alone, for the base the run started from, written only where loading it that way (without
llmk_lab) reproduces the run.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Optional

from llmk_lab.compression import build_methods
from llmk_lab.export.formats import ADAPTER_DIR, ADAPTER_WEIGHTS, INFO_FILE, read_info, task_info
from llmk_lab.export.model import compare_outputs, one_line
from llmk_lab.masks import PRUNED_BASE, save_pruned_base
from llmk_lab.reference import CHECK_EXAMPLES, check_subset, outputs_by_length, reference_inputs
from llmk_lab.training import pooling
from llmk_lab.paths import write_text_atomically

log = logging.getLogger(__name__)


def export_adapter(ctx, strategy) -> dict[str, str]:
    """Write `adapter/` where, loaded without llmk_lab onto the base the run started from, it reproduces the
    run: what the strategy trained (peft's folder, or the trained tensors of the model's own parameters), the
    pruned base layers beside it where the run pruned, the tokenizer and `llmk_lab.json` (task, labels, the
    base, its `from_pretrained` arguments, `format`). Checked as model/ is: loaded as the README shows
    (`load_adapter_folder`), it must give the run's outputs on the test reference (`export/adapter_agreement`,
    `export/adapter_max_abs_diff`). Where it cannot, no adapter/ is left and `export/adapter` in metrics.json
    says `skipped: <why>`, decided before anything is written where the run's settings tell
    (`adapter_refusal`), else by the check. A run never fails because of it."""
    dest = ctx.run_dir / ADAPTER_DIR
    reason = adapter_refusal(ctx, strategy)
    decided_up_front = reason is not None
    if reason is None:
        try:
            reason = _write_adapter(ctx, strategy, dest)
        except Exception as err:  # noqa: BLE001  (an adapter that cannot be reloaded does not reproduce the run)
            reason = f"saving or reloading it failed ({one_line(err)})"
    if reason is not None:
        if dest.is_dir():
            shutil.rmtree(dest)
        ctx.reports["export/adapter"] = f"skipped: {reason}"
        # A refusal by design is part of the method; one found by the check is a surprise worth a warning.
        (log.info if decided_up_front else log.warning)("no adapter/ export: %s", reason)
        return {}
    ctx.reports["export/adapter"] = str(dest)
    written = {"adapter": str(dest)}
    if (dest / PRUNED_BASE).exists():
        written["adapter_pruned_base"] = str(dest / PRUNED_BASE)
    return written

def adapter_refusal(ctx, strategy) -> Optional[str]:
    """Why the adapter, loaded without llmk_lab onto the base `from_pretrained` gives (and the pruned layers saved
    beside it), would not be the run's model, from what the strategy, the compression methods and the settings
    declare; None when nothing says so (the check after writing it still decides)."""
    settings = ctx.settings
    reason = strategy.adapter_refusal(ctx.model)
    if reason is not None:
        return f"peft.method={strategy.registered_name!r}: {reason}"
    if settings.model.quantize_base is not None:
        return (f"model.quantize_base={settings.model.quantize_base}: the adapter trained over the 4-bit base, and "
                "from_pretrained gives the float one; model/ holds the float merge (dequantised base + update)")
    if settings.model.from_config is not None:
        return ("the base model was built from model.from_config (random weights that only this run had); an "
                "adapter needs a base that from_pretrained loads (model.name_or_path)")
    for method in build_methods(settings.compression or {"method": "none"}):
        if method.adapter_export_refusal:
            return f"compression.method={method.registered_name!r}: {method.adapter_export_refusal}"
    if pooling.enabled(settings.train):
        return (f"train.pooling={settings.train.pooling!r} / train.layer_mix={settings.train.layer_mix!r} give the "
                "model a cross-layer head that no transformers class has")
    # A weight the checkpoint lacked was drawn at random in this run; unless it trained (and is saved with the
    # adapter), another load of the base draws another one.
    held = _trained_names(ctx.model)
    lost = [name for name in _base_origin(ctx).get("newly_initialised", []) if name not in held]
    if lost:
        return (f"the base checkpoint has no {lost[0]} ({len(lost)} tensors in all): the run initialised it at "
                "random, and it did not train, so it is not in the adapter and another load would draw another")
    return None

def _trained_names(model) -> set[str]:
    """The plain model's names of the parameters that trained (peft's copy of a trained head under its own)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {name.replace(".modules_to_save.default", "").replace(".base_layer", "")
            for name, param in base.named_parameters() if param.requires_grad}

def _base_origin(ctx) -> dict[str, Any]:
    """Where the run's model came from, as its manifest records it (`models.load_model`)."""
    manifest = json.loads((ctx.run_dir / "manifest.json").read_text())
    return manifest["assets"]["model"]

def _write_adapter(ctx, strategy, dest: Path) -> Optional[str]:
    """Save the adapter with what loading it needs, reload it as the README shows and compare with the run's
    test outputs; why it does not reproduce the run, or None."""
    task, model, model_cfg = ctx.task, ctx.model, ctx.settings.model
    if not strategy.save_adapter(model, dest):
        return f"peft.method={strategy.registered_name!r} saved nothing"
    # Named as in the plain model (no peft wrapping): `load_state_dict` of the base takes them as they are.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    pruned = save_pruned_base(base, dest)
    ctx.tokenizer.save_pretrained(dest)
    # The label names are `labels`: through JSON id2label's integer keys would come back as strings, and
    # from_pretrained keeps an argument's keys as they are.
    kwargs: dict[str, Any] = {k: v for k, v in task.model_kwargs().items() if k not in ("id2label", "label2id")}
    # load_model gives a base without a pad token the tokenizer's (causal LMs); classification heads read it.
    if getattr(base.config, "pad_token_id", None) is not None:
        kwargs["pad_token_id"] = base.config.pad_token_id
    if model_cfg.revision is not None:
        kwargs["revision"] = model_cfg.revision
    if model_cfg.trust_remote_code:
        kwargs["trust_remote_code"] = True
    origin = _base_origin(ctx)
    info = task_info(task, ctx.settings.data, {
        "format": strategy.adapter_format, "base_model": origin["resolved"],
        "base_model_configured": origin.get("name_or_path"), "base_kwargs": kwargs,
        "pruned_base": PRUNED_BASE if pruned else None})
    write_text_atomically(dest / INFO_FILE, json.dumps(info, indent=2) + "\n")
    ctx.reports["export/adapter_format"] = info["format"]
    # The examples model/ is checked on (CHECK_EXAMPLES), with the test stage's outputs where it kept them.
    batch_size = ctx.settings.train.eval_batch_size
    inputs = reference_inputs(task, ctx.tokenizer, ctx.datamodule.splits["test"])
    record = ctx.module.test_outputs
    ours = record.outputs(inputs, model)[0] if record is not None else None
    picked = check_subset(inputs, batch_size, CHECK_EXAMPLES)
    if picked is not None:
        inputs = {k: v[picked] for k, v in inputs.items()}
        ours = ours[picked] if ours is not None else None
    if ours is None:  # no usable test-stage outputs (`reference.run_outputs`): the trained model on these only
        was_training = model.training
        ours = outputs_by_length(model, task.registered_name, inputs, batch_size)
        model.train(was_training)
    ctx.reports["export/adapter_checked_examples"] = len(ours)
    reloaded = load_adapter_folder(dest, info)
    theirs = outputs_by_length(reloaded, task.registered_name, inputs, batch_size)
    figures, reason = compare_outputs(task.registered_name, ours, theirs, inputs.get("labels"))
    ctx.reports.update({f"export/adapter_{k}": v for k, v in figures.items()})
    return reason

def load_adapter_folder(folder: Path, info: Optional[dict] = None):
    """The model of an `adapter/` folder on its base (eval mode, CPU), loaded the way the README shows, with
    transformers, peft and safetensors only: the base from `from_pretrained`, its pruned layers put in place,
    then the adapter (peft) or the trained tensors (`load_state_dict`)."""
    import torch
    import transformers
    from safetensors.torch import load_file

    folder = Path(folder)
    info = info or read_info(folder)
    model = getattr(transformers, info["auto_class"]).from_pretrained(info["base_model"], dtype=torch.float32,
                                                                      **info["base_kwargs"])
    if info["pruned_base"]:  # the masks saved beside the weights are for llmk_lab's own loader
        tensors = load_file(str(folder / info["pruned_base"]))
        _load_into(model, {k: v for k, v in tensors.items() if k.endswith(".weight")}, folder / info["pruned_base"])
    if info["format"] == "peft":  # llmk_lab.peft.PEFT_FOLDER, spelled out as in the README's lines
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, folder)
    else:
        _load_into(model, load_file(str(folder / ADAPTER_WEIGHTS)), folder / ADAPTER_WEIGHTS)
    return model.eval()

def _load_into(model, tensors: dict, source: Path) -> None:
    unexpected = model.load_state_dict(tensors, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"{source}: {len(unexpected)} tensors have no place in {type(model).__name__} "
                         f"(e.g. {unexpected[0]})")
