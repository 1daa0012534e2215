"""A run's final model as folders anyone can load, each checked against what the run predicted.

At the end of a run (`export.model=true`, the default) three things go into the run directory:

- `model/`: the final model as a plain Hugging Face folder (`from_pretrained`, no llmk_lab needed):
  the adapter merged where it can be, pruned structure and zeros kept, with the tokenizer and
  `llmk_lab.json` (task, labels, the run's `data.max_length`, the folder's `format`). Written only
  when reloading it reproduces the run's predictions; otherwise the reason goes to `metrics.json`
  (`export/model`), e.g. adapters that transformers cannot rebuild. int8 models keep their int8 form:
  torchao's tensors (`weight_only_int8`, `dynamic_int8` with `backend: torchao`) as transformers'
  torchao format (`from_pretrained` with torchao installed); torch.ao's dynamic int8 modules
  (`dynamic_int8`'s default backend), which transformers' format cannot hold, as their state dict
  (`int8_state_dict.pt`) beside config.json, loaded by `load_exported` (three lines of plain torch
  and transformers, in the README). Low-bit models (`rtn`, `gptq`, `awq`) keep their packed codes:
  symmetric grids as compressed-tensors' `pack-quantized` format (`from_pretrained` with
  compressed-tensors installed, which unpacks them into float layers); asymmetric ones, which
  transformers' compressed-tensors loader does not read back (its zero-point layout differs), as
  their state dict (`low_bit_state_dict.safetensors`) loaded by `load_exported`.
- `reference/test.safetensors`: the run's own outputs on (up to `REFERENCE_EXAMPLES` of) its test
  split and the token ids they came from, so any later export (ONNX) or comparison is checked
  against the run with nothing but the run directory.
- in `metrics.json`: `export/model_agreement` (share of identical predictions after reloading),
  `export/model_max_abs_diff`, and the zero fraction of the linear layers before and after.

With `export.adapter=true` (the default), `adapter/` holds the adapter alone, for the base the run started
from, where loading it that way without llmk_lab reproduces the run (`export_adapter`; `export/adapter`,
`export/adapter_agreement`), and `export/adapter` says why not otherwise.

`python -m llmk_lab.export RUN_DIR [--onnx]` checks `model/` again, and writes and checks
`onnx/model.onnx` for classification runs (onnxruntime, the `onnx` extra).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

from llmk_lab.errors import UserError
from llmk_lab.reference import (CHECK_EXAMPLES, CHECKED_TASKS, INPUT_KEYS, LM_TASKS, MASKED_LM_TASKS,  # noqa: F401
                                REFERENCE_EXAMPLES, REFERENCE_FILE, REFERENCE_WINDOWS, agreement, check_subset,
                                load_reference, model_outputs, outputs_by_length, reference_inputs, run_outputs,
                                save_reference)
from llmk_lab.console import quiet_libraries

log = logging.getLogger(__name__)

MODEL_DIR = "model"
ONNX_DIR = "onnx"
INFO_FILE = "llmk_lab.json"
ONNX_TASKS = ("sequence_classification",)
# What `model/` holds (llmk_lab.json's `format`): how it loads.
PLAIN = "transformers"                      # from_pretrained
TORCHAO_INT8 = "transformers_torchao_int8"  # from_pretrained, with torchao installed
TORCH_AO_INT8 = "torch_ao_dynamic_int8"     # from_config + quantize_dynamic + load_state_dict
INT8_STATE_FILE = "int8_state_dict.pt"
COMPRESSED_TENSORS = "compressed_tensors_pack_quantized"  # from_pretrained, with compressed-tensors installed
LOW_BIT_STATE = "llmk_lab_low_bit_state_dict"             # from_config + PackedLinear + load_state_dict
LOW_BIT_STATE_FILE = "low_bit_state_dict.safetensors"
# The largest |output difference| an export may show, relative to 1 + the largest |output| of the run.
OUTPUT_TOLERANCE = 1e-3
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file name; the trained-tensors form uses it too


# ----------------------------------------------------------------------------- sparsity

def linear_sparsity(model) -> dict[str, Any]:
    """Zero fraction of every linear layer's weight and over all of them: pruning's zeros must survive a
    reload. int8 layers count their stored int8 values (symmetric quantisation keeps a zero a zero)."""
    import torch

    from llmk_lab.masks import stored_values

    from llmk_lab.compression.low_bit import PackedLinear

    per_layer, zeros, total = {}, 0, 0
    for name, module in model.named_modules():
        if isinstance(module, PackedLinear):  # the values its codes stand for
            weight = module.dequantized_weight()
        elif isinstance(module, torch.nn.Linear) and hasattr(module, "weight_packed"):
            weight = _compressed_tensors_weight(module)  # reloaded by transformers, kept packed
        elif isinstance(module, torch.nn.Linear):  # torchao's int8 tensors stay inside nn.Linear
            weight = stored_values(module.weight)
        elif hasattr(module, "_packed_params") and callable(getattr(module, "weight", None)):
            weight = module.weight().int_repr()  # torch.ao's dynamic int8 Linear packs its weight
        else:
            continue
        z = int((weight == 0).sum())
        per_layer[name] = z / weight.numel()
        zeros, total = zeros + z, total + weight.numel()
    return {"overall": zeros / total if total else 0.0, "per_layer": per_layer}


# ----------------------------------------------------------------------------- the HF folder

def _compressed_tensors_weight(module):
    """The weight a packed layer that transformers' compressed-tensors loader rebuilt stands for."""
    from compressed_tensors.compressors import PackedQuantizationCompressor

    parts = {k: getattr(module, k) for k in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
             if hasattr(module, k)}
    return PackedQuantizationCompressor.decompress(parts, module.quantization_scheme)["weight"]


def task_info(task, data_cfg, extra: Optional[dict] = None) -> dict[str, Any]:
    return {"task": task.registered_name, "labels": list(task.labels) if task.labels else None,
            "max_length": int(data_cfg.max_length), "text_pair": data_cfg.text_pair_column is not None,
            "auto_class": task.auto_class.__name__, **(extra or {})}


def _not_exportable(model) -> Optional[str]:
    """Why this model cannot be saved as a transformers folder, or None."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return f"the final model is a {type(model).__name__}, not a transformers model (an adapter that is not merged)"
    return None


def _torchao_weight(module):
    import torch

    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) and type(weight) not in (torch.Tensor, torch.nn.Parameter) \
        else None


def model_format(model) -> str:
    """PLAIN, TORCHAO_INT8, TORCH_AO_INT8, COMPRESSED_TENSORS or LOW_BIT_STATE: which of the folder forms
    holds this model."""
    from llmk_lab.compression.low_bit import packed_layers

    modules = list(model.modules())
    packed = packed_layers(model)
    if packed:
        return COMPRESSED_TENSORS if all(p.symmetric for p in packed.values()) else LOW_BIT_STATE
    if any(hasattr(m, "_packed_params") for m in modules):
        return TORCH_AO_INT8
    if any(_torchao_weight(m) is not None for m in modules):
        return TORCHAO_INT8
    return PLAIN


def _save_torchao(model, dest: Path) -> None:
    """transformers' own torchao format (safetensors + `quantization_config` in config.json), naming each
    int8 layer with the torchao config that made it: `from_pretrained` rebuilds the same int8 tensors."""
    from torchao.quantization import FqnToConfig, Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
    from transformers import TorchAoConfig
    from transformers.quantizers.auto import AutoHfQuantizer

    per_layer = {}
    for name, module in model.named_modules():
        weight = _torchao_weight(module)
        if weight is None:
            continue
        if type(weight).__name__ != "Int8Tensor":
            raise ValueError(f"{name} holds a {type(weight).__name__}; the export knows torchao's Int8Tensor")
        # The two configs llmk_lab applies, with their defaults; an int8 tensor that quantises its
        # activations carries their quantisation arguments. The reload check below confirms the pick.
        dynamic = getattr(weight, "act_quant_kwargs", None) is not None
        per_layer[name] = Int8DynamicActivationInt8WeightConfig() if dynamic else Int8WeightOnlyConfig()
    config = TorchAoConfig(quant_type=FqnToConfig(per_layer))
    before = (getattr(model.config, "quantization_config", None), getattr(model, "hf_quantizer", None))
    model.config.quantization_config = config
    model.hf_quantizer = AutoHfQuantizer.from_config(config, pre_quantized=False)
    try:
        model.save_pretrained(dest, safe_serialization=True)
    finally:  # the run's copy stays as the figures measured it
        model.config.quantization_config, model.hf_quantizer = before
        if before[0] is None:
            del model.config.quantization_config


def _save_torch_ao(model, dest: Path) -> dict[str, Any]:
    """torch.ao's dynamic int8 Linear has no transformers form: its state dict (int8 weights with their
    scales, float rest) next to config.json; `load_exported` rebuilds the model around it."""
    import torch

    dest.mkdir(parents=True, exist_ok=True)
    # The int8 layers themselves, not the packed-parameter holder each has inside.
    names = [name for name, module in model.named_modules()
             if hasattr(module, "_packed_params") and callable(getattr(module, "weight", None))]
    kinds = {f"{type(model.get_submodule(n)).__module__}.{type(model.get_submodule(n)).__name__}" for n in names}
    if kinds != {"torch.ao.nn.quantized.dynamic.modules.linear.Linear"}:
        raise ValueError(f"quantised modules {sorted(kinds)}; the export knows torch.ao's dynamic Linear")
    model.config.save_pretrained(dest)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(dest)
    torch.save(model.state_dict(), dest / INT8_STATE_FILE)
    return {"int8_modules": names}


def _unique_tensors(model) -> tuple[dict[str, Any], list[str]]:
    """The state dict with tied tensors stored once (safetensors holds no shared tensors), and the names
    left out (their tensor is stored under another name; the model ties them again when built)."""
    from llmk_lab.measure import _unique_state

    full = model.state_dict()
    state = {k: v.contiguous() for k, v in _unique_state(model).items()}
    return state, sorted(set(full) - set(state))


def _save_config(model, dest: Path) -> None:
    model.config.save_pretrained(dest)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(dest)


def _save_compressed_tensors(model, dest: Path) -> dict[str, Any]:
    """compressed-tensors' `pack-quantized` folder: the packed codes and scales under the layers' names, and a
    `quantization_config` naming every packed layer with its scheme, so `from_pretrained` rebuilds them."""
    from safetensors.torch import save_file

    from llmk_lab.compression.low_bit import PER_CHANNEL, packed_layers

    schemes: dict[tuple, list[str]] = {}
    for name, layer in packed_layers(model).items():
        schemes.setdefault((layer.bits, layer.group_size), []).append(name)
    groups = {f"group_{i}": {"targets": names, "weights": {
        "num_bits": bits, "type": "int", "symmetric": True, "dynamic": False, "observer": "minmax",
        "strategy": "channel" if size == PER_CHANNEL else "group",
        "group_size": None if size == PER_CHANNEL else size}}
        for i, ((bits, size), names) in enumerate(sorted(schemes.items()))}
    config = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
              "config_groups": groups, "ignore": []}
    dest.mkdir(parents=True, exist_ok=True)
    before = getattr(model.config, "quantization_config", None)
    model.config.quantization_config = config
    try:
        _save_config(model, dest)
    finally:  # the run's copy stays as the figures measured it
        if before is None:
            del model.config.quantization_config
        else:
            model.config.quantization_config = before
    state, _ = _unique_tensors(model)
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return {}


def _save_low_bit_state(model, dest: Path) -> dict[str, Any]:
    """Packed layers transformers cannot rebuild: config.json and the state dict, with each layer's scheme."""
    from safetensors.torch import save_file

    from llmk_lab.compression.low_bit import packed_layers

    dest.mkdir(parents=True, exist_ok=True)
    _save_config(model, dest)
    state, tied = _unique_tensors(model)
    save_file(state, str(dest / LOW_BIT_STATE_FILE), metadata={"format": "pt"})
    layers = {name: {"bits": p.bits, "group_size": p.group_size, "symmetric": p.symmetric, "bias": p.bias is not None}
              for name, p in packed_layers(model).items()}
    return {"low_bit_modules": layers, "tied_keys": tied}


def save_model(model, dest: Path) -> dict[str, Any]:
    """Write `model` to `dest` in its format; what `llmk_lab.json` must say to load it."""
    kind = model_format(model)
    extra: dict[str, Any] = {"format": kind}
    if kind == COMPRESSED_TENSORS:
        extra.update(_save_compressed_tensors(model, dest))
    elif kind == LOW_BIT_STATE:
        log.warning("model/: asymmetric low-bit weights do not reload through transformers' compressed-tensors "
                    "loader; written as their state dict (%s), loaded by llmk_lab.export.load_exported",
                    LOW_BIT_STATE_FILE)
        extra.update(_save_low_bit_state(model, dest))
    elif kind == TORCH_AO_INT8:
        extra.update(_save_torch_ao(model, dest))
    elif kind == TORCHAO_INT8:
        _save_torchao(model, dest)
    else:
        model.save_pretrained(dest, safe_serialization=True)
    return extra


def load_exported(folder: Path, info: Optional[dict] = None, loading_info: bool = False):
    """The model of a `model/` folder (eval mode, CPU), whatever its format; with `loading_info`, also the
    weights that found no place or were missing (always none for the int8 state dict, loaded strictly)."""
    import torch
    import transformers

    folder = Path(folder)
    info = info or read_info(folder)
    auto_class = getattr(transformers, info["auto_class"])
    if info.get("format", PLAIN) == TORCH_AO_INT8:
        import warnings

        model = auto_class.from_config(transformers.AutoConfig.from_pretrained(folder))
        # torch calls torch.ao.quantization and its quantised tensors deprecated; they are what the run used.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            torch.ao.quantization.quantize_dynamic(model, set(info["int8_modules"]), dtype=torch.qint8, inplace=True)
            model.load_state_dict(torch.load(folder / INT8_STATE_FILE, weights_only=True))
        model = model.eval()
        return (model, []) if loading_info else model
    if info.get("format") == LOW_BIT_STATE:
        from safetensors.torch import load_file

        from llmk_lab.compression.low_bit import PackedLinear, replace_module

        model = auto_class.from_config(transformers.AutoConfig.from_pretrained(folder))
        for name, scheme in info["low_bit_modules"].items():
            old = model.get_submodule(name)
            replace_module(model, name, PackedLinear(old.in_features, old.out_features, scheme["bits"],
                                                     scheme["group_size"], scheme["symmetric"], scheme["bias"],
                                                     old.weight.dtype))
        result = model.load_state_dict(load_file(str(folder / LOW_BIT_STATE_FILE)), strict=False)
        unused = sorted(set(result.unexpected_keys) | (set(result.missing_keys) - set(info.get("tied_keys", []))))
        model.tie_weights()
        model = model.eval()
        return (model, unused) if loading_info else model
    if info.get("format") == COMPRESSED_TENSORS:
        try:
            import compressed_tensors  # noqa: F401
        except ImportError:
            raise UserError(f"{folder} holds low-bit weights in compressed-tensors' format: loading them needs "
                            "compressed-tensors (pip install compressed-tensors)") from None
    if info.get("format") == TORCHAO_INT8:
        try:
            import torchao  # noqa: F401
        except ImportError:
            raise UserError(f"{folder} holds torchao int8 weights: loading them needs torchao "
                            "(pip install torchao)") from None
    model, loading = auto_class.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    model = model.eval()
    if not loading_info:
        return model
    return model, sorted(set(loading.get("unexpected_keys", [])) | set(loading.get("missing_keys", [])))


def export_model(ctx, strategy) -> dict[str, str]:
    """Write `model/` and the test reference at the end of a run; figures go to `ctx.reports`.

    An export that cannot be written or does not reproduce the run is left out, and `export/model`
    in metrics.json says why (a warning says so too): a run never fails because of it."""
    run_dir, task = ctx.run_dir, ctx.task
    written: dict[str, str] = {}
    ours = inputs = None
    if task.registered_name in CHECKED_TASKS:
        try:
            inputs = reference_inputs(task, ctx.tokenizer, ctx.datamodule.splits["test"])
            # The test stage's own outputs where they are a float32 pass (llmk_lab.reference), so the
            # trained model is not run over the test examples a second time.
            ours, ctx.reports["export/reference_outputs"] = run_outputs(ctx, inputs)
            written["reference"] = str(save_reference(run_dir, inputs, ours, task.registered_name))
        except Exception as err:  # noqa: BLE001  (recorded, and the model/ export is then not checked)
            return _left_out(ctx, written, f"the run's test outputs could not be recorded ({_one_line(err)})")
    try:
        reason = _write_model(ctx, strategy, ours, inputs)
    except Exception as err:  # noqa: BLE001  (an export that cannot be reloaded does not reproduce the run)
        reason = f"saving or reloading it failed ({_one_line(err)})"
    if reason is not None:
        shutil.rmtree(run_dir / MODEL_DIR, ignore_errors=True)
        return _left_out(ctx, written, reason)
    ctx.reports["export/model"] = str(run_dir / MODEL_DIR)
    written["model"] = str(run_dir / MODEL_DIR)
    return written


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _left_out(ctx, written: dict, reason: str) -> dict:
    ctx.reports["export/model"] = f"not written: {reason}"
    log.warning("no model/ export: %s", reason)
    return written


def _write_model(ctx, strategy, ours, inputs) -> Optional[str]:
    """Save the deployable model to `model/`, reload it without llmk_lab and compare; the reason it is not
    a faithful export, or None."""
    from llmk_lab.measure import deployed
    from llmk_lab.training import pooling

    task, dest, train = ctx.task, ctx.run_dir / MODEL_DIR, ctx.settings.train
    if pooling.enabled(train):
        return (f"train.pooling={train.pooling!r} / train.layer_mix={train.layer_mix!r} give the model a "
                "cross-layer head that no transformers class has (a plain model would predict with its own, "
                "bypassed head); the Lightning checkpoint (export.checkpoint=true) holds it")
    final = deployed(ctx, strategy)  # the copy the figures measured (unmergeable: a plain copy)
    try:  # transformers' format has no cross-layer sharing: each block saves its own copy
        from llmk_lab.compression.weight_sharing import untie_shared_weights
    except ImportError:
        untie_shared_weights = None
    if untie_shared_weights is not None:
        untie_shared_weights(final)
    reason = _not_exportable(final)
    if reason is not None:
        return reason
    extra = save_model(final, dest)
    ctx.tokenizer.save_pretrained(dest)
    before = linear_sparsity(final)
    # eval_batch_size: torch.ao's dynamic int8 scales activations per batch, so a check reproduces the run's
    # outputs exactly only in the test loader's batches (outputs_by_length).
    info = task_info(task, ctx.settings.data, {"linear_sparsity": before["overall"],
                                               "eval_batch_size": int(ctx.settings.train.eval_batch_size), **extra})
    (dest / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
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


# ----------------------------------------------------------------------------- the adapter alone

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
            reason = f"saving or reloading it failed ({_one_line(err)})"
    if reason is not None:
        if dest.is_dir():
            shutil.rmtree(dest)
        ctx.reports["export/adapter"] = f"skipped: {reason}"
        # A refusal by design is part of the method; one found by the check is a surprise worth a warning.
        (log.info if decided_up_front else log.warning)("no adapter/ export: %s", reason)
        return {}
    from llmk_lab.masks import PRUNED_BASE

    ctx.reports["export/adapter"] = str(dest)
    written = {"adapter": str(dest)}
    if (dest / PRUNED_BASE).exists():
        written["adapter_pruned_base"] = str(dest / PRUNED_BASE)
    return written


def adapter_refusal(ctx, strategy) -> Optional[str]:
    """Why the adapter, loaded without llmk_lab onto the base `from_pretrained` gives (and the pruned layers saved
    beside it), would not be the run's model, from what the strategy, the compression methods and the settings
    declare; None when nothing says so (the check after writing it still decides)."""
    from llmk_lab.compression import build_methods
    from llmk_lab.training import pooling

    settings, task = ctx.settings, ctx.task
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
    if task.registered_name not in CHECKED_TASKS:
        return f"the {task.registered_name} task keeps no test reference to check it against"
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
    from llmk_lab.masks import PRUNED_BASE, save_pruned_base

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
    (dest / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
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


# ----------------------------------------------------------------------------- checks from the command line

def read_info(folder: Path) -> dict[str, Any]:
    path = Path(folder) / INFO_FILE
    if not path.exists():
        raise UserError(f"{folder}: no {INFO_FILE}; give a finished run directory or its {MODEL_DIR}/ folder")
    return json.loads(path.read_text())


def finished_model_dir(path: Path) -> Path:
    """The `model/` folder of a finished run directory (or `path` itself when it is such a folder)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{path}: no such run directory or model folder")
    if (path / INFO_FILE).exists():
        return path
    failed = path / "failed.json"
    if failed.exists():
        error = json.loads(failed.read_text()).get("error", "")
        raise UserError(f"{path}: the run failed ({error}); there is no model to use")
    metrics_path = path / "metrics.json"
    if not metrics_path.exists():
        raise UserError(f"{path}: not a finished run directory (no metrics.json; the run is incomplete or "
                        "still running)")
    metrics = json.loads(metrics_path.read_text())
    if metrics.get("failed_stage"):
        raise UserError(f"{path}: the run stopped in stage {metrics['failed_stage']!r} ({metrics.get('error', '')})")
    if not (path / MODEL_DIR / INFO_FILE).exists():
        reason = metrics.get("export/model", "the run was made before model exports existed")
        raise UserError(f"{path}: no {MODEL_DIR}/ export ({reason})")
    return path / MODEL_DIR


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


def export_onnx(run_dir: Path, opset: int = 17) -> Path:
    """`onnx/model.onnx` of a classification run's `model/`, with its tokenizer and `llmk_lab.json`."""
    import torch
    import transformers

    folder = finished_model_dir(run_dir)
    info = read_info(folder)
    if info["task"] not in ONNX_TASKS:
        raise UserError(f"{run_dir}: ONNX export is for {', '.join(ONNX_TASKS)} runs; this one is {info['task']}")
    if info.get("format", PLAIN) != PLAIN:
        raise UserError(f"{run_dir}: ONNX export is of float models; this run's model/ is int8 ({info['format']}): "
                        "export its float parent and quantise the graph with onnxruntime.quantization instead")
    model = getattr(transformers, info["auto_class"]).from_pretrained(folder, dtype=torch.float32).eval()
    model.config.return_dict = False  # a tuple output traces to a plain ONNX graph
    inputs, _ = load_reference(folder.parent)
    names = [k for k in INPUT_KEYS if k in inputs]
    example = tuple(inputs[k][:2] for k in names)
    dest = folder.parent / ONNX_DIR
    dest.mkdir(parents=True, exist_ok=True)
    dynamic = {k: {0: "batch", 1: "sequence"} for k in names}
    dynamic["logits"] = {0: "batch"}
    # The TorchScript exporter (dynamo=False) needs no extra package beyond onnx and handles BERT/Llama heads.
    import warnings

    with warnings.catch_warnings():  # torch calls this exporter legacy; it is the one that needs no onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        # Tracing notes on shape checks that are constant for these models; check_onnx runs other lengths.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*aten::index.*")
        torch.onnx.export(model, example, str(dest / "model.onnx"), input_names=names, output_names=["logits"],
                          dynamic_axes=dynamic, opset_version=opset, dynamo=False)
    for item in folder.iterdir():  # tokenizer files and llmk_lab.json, so the folder stands alone
        if item.is_file() and not item.name.endswith((".safetensors", ".bin")) and item.name != "config.json":
            shutil.copy2(item, dest / item.name)
    shutil.copy2(folder / "config.json", dest / "config.json")
    return dest / "model.onnx"


def check_onnx(run_dir: Path) -> dict[str, float]:
    """Labels of the ONNX model under onnxruntime against the run's own, on the reference test inputs."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError("checking the ONNX export needs onnxruntime: pip install 'llmk_lab[onnx]'") from None
    import numpy as np
    import torch

    folder = finished_model_dir(run_dir)
    session = onnxruntime.InferenceSession(str(folder.parent / ONNX_DIR / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    inputs, reference = load_reference(folder.parent)
    wanted = [i.name for i in session.get_inputs()]
    logits = []
    for start in range(0, len(inputs["input_ids"]), 64):
        feed = {k: inputs[k][start:start + 64].numpy().astype(np.int64) for k in wanted}
        logits.append(torch.from_numpy(session.run(["logits"], feed)[0]))
    figures = agreement("sequence_classification", reference, torch.cat(logits))
    # The graph was traced at one shape: single unpadded examples, each at its own length, must match too.
    import transformers

    info = read_info(folder)
    model = getattr(transformers, info["auto_class"]).from_pretrained(folder, dtype=torch.float32).eval()
    gaps, same = [], []
    with torch.inference_mode():
        for i in range(min(8, len(inputs["input_ids"]))):
            length = int(inputs["attention_mask"][i].sum())
            one = {k: inputs[k][i:i + 1, :length] for k in wanted}
            theirs = torch.from_numpy(session.run(["logits"], {k: v.numpy().astype(np.int64) for k, v in one.items()})[0])
            ours = model(**one).logits.float()
            gaps.append(float((ours - theirs).abs().max()))
            same.append(bool(ours.argmax(-1) == theirs.argmax(-1)))
    figures["unpadded_agreement"] = sum(same) / len(same)
    figures["unpadded_max_abs_diff"] = max(gaps)
    return figures


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmk_lab.export",
                                     description="Check a finished run's model/ export against the run's own test "
                                                 "predictions; --onnx also writes and checks onnx/model.onnx.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--onnx", action="store_true", help="write onnx/model.onnx (classification runs)")
    args = parser.parse_args(argv)
    quiet_libraries()  # no per-load progress bars or load reports
    try:
        figures = check_model_dir(args.run_dir)
        print(f"model/: agreement {figures['agreement']:.4f}, max |difference| {figures['max_abs_diff']:.3g}, "
              f"linear-layer sparsity {figures['sparsity']:.4f} (recorded {figures['sparsity_recorded']})")
        if args.onnx:
            path = export_onnx(args.run_dir)
            onnx_figures = check_onnx(args.run_dir)
            print(f"{path}: label agreement with the run {onnx_figures['agreement']:.4f}, "
                  f"max |logit difference| {onnx_figures['max_abs_diff']:.3g}; unpadded at other lengths: "
                  f"agreement {onnx_figures['unpadded_agreement']:.4f}, max |difference| "
                  f"{onnx_figures['unpadded_max_abs_diff']:.3g}")
            figures = {**figures, **{f"onnx_{k}": v for k, v in onnx_figures.items()}}
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if all(v == 1.0 for k, v in figures.items() if k.endswith("agreement")) else 1


if __name__ == "__main__":
    sys.exit(main())
