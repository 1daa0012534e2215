"""Loading a pretrained model and tokenizer with the task's head.

`model.name_or_path` is `asset:NAME`, a local directory, or a hub id; a tiny
model can be built from `model.from_config` for tests.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import CONFIG_MAPPING, AutoConfig, AutoTokenizer

from llmk_lab import assets, pruned_bert
from llmk_lab.architectures import pin_blocks
from llmk_lab.errors import UserError

log = logging.getLogger(__name__)

# Files a tokenizer can be loaded from (fast, sentencepiece, WordPiece, BPE): a folder with none of them has none.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def resolve_model_reference(reference: str, key: str, needs: str = "model") -> tuple[str, str | None]:
    """(path or hub id, asset name or None). A path that does not exist, or a local folder that lacks what
    `needs` ("model": a config of a model type transformers knows; "tokenizer": tokenizer files), is refused
    here in one line, before transformers fails on it with a traceback."""
    path, asset = assets.resolve(reference)
    if asset is not None:
        return path, asset
    assets.refuse_missing_model_path(reference, key)  # hub ids are `name` or `org/name`, the rest local paths
    local = Path(reference).expanduser()
    if not local.exists():
        return reference, None
    if local.is_dir():
        check_model_folder(local, reference, key, needs)
    return str(local), None


def check_model_folder(folder: Path, reference: str, key: str, needs: str) -> None:
    if needs == "tokenizer":
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise UserError(f"{key}={reference!r}: the folder has no tokenizer files (one of {list(TOKENIZER_FILES)}); "
                            "point model.tokenizer at a folder or hub id that has them")
        if not (folder / "config.json").is_file():
            return  # a tokenizer-only folder; AutoTokenizer reads config.json only where there is one
    pruned_bert.register()  # a checkpoint saved after structured head pruning has this model type
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"{key}={reference!r}: the folder has no config.json, so it is not a Hugging Face model folder")
    try:
        config = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{key}={reference!r}: config.json is not valid JSON ({err})") from None
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING and "auto_map" not in config:
        raise UserError(f"{key}={reference!r}: config.json has model_type {model_type!r}, which this transformers "
                        "does not know (and no auto_map for remote code); allowed: a model type transformers knows, "
                        "e.g. bert, llama, qwen2, gemma3_text")


def load_tokenizer(model_cfg):
    reference = model_cfg.tokenizer or model_cfg.name_or_path
    if reference is None:
        raise UserError("model.tokenizer is required when model.name_or_path is null")
    path, _ = resolve_model_reference(reference, "model.tokenizer" if model_cfg.tokenizer else "model.name_or_path",
                                      needs="tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=model_cfg.revision,
                                                  trust_remote_code=model_cfg.trust_remote_code)
    except OSError as err:
        raise UserError(f"model.name_or_path={reference!r}: cannot load a tokenizer ({str(err).splitlines()[0]})") from None
    if tokenizer.pad_token is None:
        # Causal LMs often ship without a pad token; padding positions are masked anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_cfg, task, tokenizer):
    """The pretrained model with `task`'s head (newly initialised when the checkpoint lacks it)."""
    kwargs = task.model_kwargs()
    if model_cfg.from_config is not None:
        spec = dict(model_cfg.from_config)
        config = AutoConfig.for_model(spec.pop("model_type"), vocab_size=len(tokenizer), **spec, **kwargs)
        config.pad_token_id = tokenizer.pad_token_id
        model = task.auto_class.from_config(config)
        pin_blocks(model, model_cfg.blocks)
        return model, {"from_config": dict(model_cfg.from_config)}
    path, asset = resolve_model_reference(model_cfg.name_or_path, "model.name_or_path")
    pruned_bert.register()  # a checkpoint saved after structured head pruning has this model type
    try:
        model, loading = task.auto_class.from_pretrained(path, revision=model_cfg.revision, dtype=torch.float32,
                                                         trust_remote_code=model_cfg.trust_remote_code,
                                                         output_loading_info=True, **kwargs)
    except OSError as err:
        raise UserError(f"model.name_or_path={model_cfg.name_or_path!r}: cannot load "
                        f"({str(err).splitlines()[0]})") from None
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise UserError(f"model.name_or_path={model_cfg.name_or_path!r} has no {task.auto_class.__name__} "
                            f"head for task {task.registered_name!r}") from None
        raise
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    pin_blocks(model, model_cfg.blocks)
    info = {"name_or_path": model_cfg.name_or_path, "resolved": path}
    new_weights = newly_initialised(model, loading)
    if new_weights:
        info["newly_initialised"] = new_weights
    if asset:
        info.update(asset=asset, sha256=assets.checksum(asset))
    return model, info


def newly_initialised(model, loading: dict) -> list[str]:
    """Weights the checkpoint did not have (a new task head), logged so nobody mistakes them for pretrained ones."""
    missing = sorted(set(loading.get("missing_keys", [])))
    if not missing:
        return []
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    tied = output is not None and inputs is not None and output.weight is inputs.weight
    heads = sorted({".".join(name.split(".")[:2]) for name in missing})
    log.warning("the checkpoint has no weights for %s: newly initialised (%d tensors)%s", ", ".join(heads),
                len(missing), "; the output layer is tied to the word embeddings" if tied else "")
    return missing
