"""Loading a pretrained model and tokenizer with the task's head.

`model.name_or_path` is `asset:NAME`, a local directory, or a hub id; a tiny
model can be built from `model.from_config` for tests.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from llmk_lab import assets, pruned_bert
from llmk_lab.architectures import pin_blocks
from llmk_lab.errors import UserError

log = logging.getLogger(__name__)

def _resolve(reference: str, key: str) -> tuple[str, str | None]:
    """(path or hub id, asset name or None); a path that does not exist is refused here."""
    path, asset = assets.resolve(reference)
    if asset is not None:
        return path, asset
    assets.refuse_missing_model_path(reference, key)  # hub ids are `name` or `org/name`, the rest local paths
    local = Path(reference).expanduser()
    if local.exists():
        return str(local), None
    return reference, None


def load_tokenizer(model_cfg):
    reference = model_cfg.tokenizer or model_cfg.name_or_path
    if reference is None:
        raise UserError("model.tokenizer is required when model.name_or_path is null")
    path, _ = _resolve(reference, "model.tokenizer" if model_cfg.tokenizer else "model.name_or_path")
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
    path, asset = _resolve(model_cfg.name_or_path, "model.name_or_path")
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
