"""Prefix tuning (Li and Liang 2021) and prompt tuning (Lester et al. 2021) through peft.

Prompt tuning learns `num_virtual_tokens` input embeddings (n x d trainable);
prefix tuning learns a key and a value vector per virtual token in every layer
(n x layers x 2 x d, without the reparametrisation MLP; with it, the MLP's
parameters instead). Plus the task head. Neither can be folded into the
weights: `export.merged=true` is refused before anything runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

from llmk_lab.errors import UserError, check
from llmk_lab.peft import PEFT
from llmk_lab.peft.lora import PeftLibraryStrategy


@dataclass
class PrefixConfig:
    method: str = "prefix"
    # Virtual key/value positions prepended in every layer.
    num_virtual_tokens: int = 20
    # Produce the prefix through a two-layer MLP (the paper's reparametrisation; trains more parameters).
    prefix_projection: bool = False
    # Hidden size of that MLP.
    encoder_hidden_size: int = 512

    def __post_init__(self):
        check(self.num_virtual_tokens >= 1, "num_virtual_tokens", self.num_virtual_tokens, "an integer >= 1")
        check(self.encoder_hidden_size >= 1, "encoder_hidden_size", self.encoder_hidden_size, "an integer >= 1")


@dataclass
class PromptConfig:
    method: str = "prompt"
    # Soft prompt embeddings prepended to the input.
    num_virtual_tokens: int = 20
    # random | sample_vocab (initialise from embeddings of random vocabulary tokens, as in the paper).
    init: str = "sample_vocab"

    def __post_init__(self):
        check(self.num_virtual_tokens >= 1, "num_virtual_tokens", self.num_virtual_tokens, "an integer >= 1")
        check(self.init in ("random", "sample_vocab"), "init", self.init, "one of ['random', 'sample_vocab']")


def wrap_and_try(model, config, ctx, method: str):
    """Wrap, then run one training example through: peft serves virtual tokens only for some
    architectures and tasks, and otherwise fails inside the first forward."""
    model_type = getattr(model.config, "model_type", None)
    problem = f"peft={method} cannot serve model type {model_type!r} with task {ctx.task.registered_name!r}"
    try:
        wrapped = get_peft_model(model, config)
        batch = ctx.datamodule.collate(ctx.datamodule.splits["train"][:2])
        was_training = wrapped.training
        wrapped.eval()
        with torch.no_grad():
            wrapped(**batch)
        wrapped.train(was_training)
    except (ValueError, TypeError, AttributeError, RuntimeError, NotImplementedError, KeyError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{problem} ({reason}); use peft=lora, ia3 or adapter") from None
    return wrapped


class VirtualTokens(PeftLibraryStrategy):
    mergeable = False
    finds_layers_by_role = False  # virtual tokens enter through the embeddings and the attention cache

    def no_decay_parameter_names(self, model):
        # Virtual tokens are embeddings (and, with prefix_projection, the MLP that produces them): decaying
        # them toward 0 pulls them toward the zero vector, which is no token at all.
        return {name for name, _ in model.named_parameters() if "prompt_encoder." in name}


@PEFT.register("prefix", config=PrefixConfig)
class PrefixTuning(VirtualTokens):
    shapes_keys_by_head_count = True

    def apply(self, model, ctx):
        s = self.settings
        config = PrefixTuningConfig(task_type=ctx.task.peft_task_type, num_virtual_tokens=s.num_virtual_tokens,
                                    prefix_projection=s.prefix_projection,
                                    encoder_hidden_size=s.encoder_hidden_size)
        return wrap_and_try(model, config, ctx, "prefix")


@PEFT.register("prompt", config=PromptConfig)
class PromptTuning(VirtualTokens):
    logits_align_with_input = False  # the virtual tokens' logits come first

    def apply(self, model, ctx):
        s = self.settings
        config = PromptTuningConfig(task_type=ctx.task.peft_task_type, num_virtual_tokens=s.num_virtual_tokens,
                                    prompt_tuning_init="SAMPLE_VOCAB" if s.init == "sample_vocab" else "RANDOM")
        return wrap_and_try(model, config, ctx, "prompt")
