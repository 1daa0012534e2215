"""What `model/` holds and how it loads: the formats of a run's final model (plain transformers, torchao and torch.ao int8,
compressed-tensors and low-bit state dicts), saving and reloading them, and the zeros of their linear layers.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from llmk_lab.compression.low_bit import PER_CHANNEL, packed_layers, PackedLinear, replace_module
from llmk_lab.errors import UserError
from llmk_lab.masks import is_packed_int8_linear, stored_values
from llmk_lab.measure import unique_state

log = logging.getLogger(__name__)


MODEL_DIR = "model"

ONNX_DIR = "onnx"

INFO_FILE = "llmk_lab.json"

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

def linear_sparsity(model) -> dict[str, Any]:
    """Zero fraction of every linear layer's weight and over all of them: pruning's zeros must survive a
    reload. int8 layers count their stored int8 values (symmetric quantisation keeps a zero a zero)."""
    import torch

    per_layer, zeros, total = {}, 0, 0
    for name, module in model.named_modules():
        if isinstance(module, PackedLinear):  # the values its codes stand for
            weight = module.dequantized_weight()
        elif isinstance(module, torch.nn.Linear) and hasattr(module, "weight_packed"):
            weight = _compressed_tensors_weight(module)  # reloaded by transformers, kept packed
        elif isinstance(module, torch.nn.Linear):  # torchao's int8 tensors stay inside nn.Linear
            weight = stored_values(module.weight)
        elif is_packed_int8_linear(module):
            weight = module.weight().int_repr()  # torch.ao's dynamic int8 Linear packs its weight
        else:
            continue
        z = int((weight == 0).sum())
        per_layer[name] = z / weight.numel()
        zeros, total = zeros + z, total + weight.numel()
    return {"overall": zeros / total if total else 0.0, "per_layer": per_layer}

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

def not_exportable_reason(model) -> Optional[str]:
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
    modules = list(model.modules())
    packed = packed_layers(model)
    if packed:
        return COMPRESSED_TENSORS if all(p.symmetric for p in packed.values()) else LOW_BIT_STATE
    if any(is_packed_int8_linear(m) for m in modules):
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
             if is_packed_int8_linear(module)]
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
    full = model.state_dict()
    state = {k: v.contiguous() for k, v in unique_state(model).items()}
    return state, sorted(set(full) - set(state))

def _save_config(model, dest: Path) -> None:
    model.config.save_pretrained(dest)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(dest)

def _save_compressed_tensors(model, dest: Path) -> dict[str, Any]:
    """compressed-tensors' `pack-quantized` folder: the packed codes and scales under the layers' names, and a
    `quantization_config` naming every packed layer with its scheme, so `from_pretrained` rebuilds them."""
    from safetensors.torch import save_file

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
