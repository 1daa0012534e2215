"""Strategies that train a subset of the model's own parameters: top layers, BitFit.

Both leave the architecture unchanged, so the trained model is already a plain
model (merging is the identity) and pruning masks are kept by MaskKeeper.
"""
from __future__ import annotations

from dataclasses import dataclass

from llmk_lab.architectures import architecture
from llmk_lab.errors import UserError, check
from llmk_lab.peft import (PEFT, TRAINED_TENSORS, PeftStrategy, head_parameter_names, save_trained_tensors,
                           train_only, transformer_layers)


class SubsetStrategy(PeftStrategy):
    # The trained tensors carry the plain model's own parameter names: `load_state_dict` puts them in place.
    adapter_format = TRAINED_TENSORS

    def save_adapter(self, model, directory):
        return save_trained_tensors(model, directory, {"peft_type": self.registered_name.upper(),
                                                       **vars(self.settings)})


@dataclass
class TopLayersConfig:
    method: str = "top_layers"
    # How many of the top transformer blocks train (with everything above them:
    # BERT's pooler, Llama's final norm, and the task head).
    num_layers: int = 2

    def __post_init__(self):
        check(self.num_layers >= 1, "num_layers", self.num_layers, "an integer >= 1")


@PEFT.register("top_layers", config=TopLayersConfig)
class TopLayers(SubsetStrategy):
    trains_base_weights = "some"
    finds_layers_by_role = True  # the block list, checked against the family's block roles

    def apply(self, model, ctx):
        layers = transformer_layers(model)
        k = self.settings.num_layers
        if k > len(layers):
            raise UserError(f"peft.num_layers={k} is not allowed: the model has {len(layers)} transformer layers")
        top = {id(p) for layer in layers[len(layers) - k:] for p in layer.parameters()}
        trainable = {n for n, p in model.named_parameters() if id(p) in top}
        trainable |= set(head_parameter_names(model, ctx.task)) | set(self._above_blocks(model))
        train_only(model, trainable)
        return model

    @staticmethod
    def _above_blocks(model):
        """Parameters between the last block and the head: BERT's pooler, a decoder's final norm."""
        above = tuple(architecture(model).above_blocks(model))
        return [n for n, _ in model.named_parameters() if n.startswith(tuple(f"{m}." for m in above))]


@dataclass
class BitFitConfig:
    method: str = "bitfit"


@PEFT.register("bitfit", config=BitFitConfig)
class BitFit(SubsetStrategy):
    """BitFit (Ben Zaken et al. 2022): every bias term of the model trains, with the task head."""

    def apply(self, model, ctx):
        head = set(head_parameter_names(model, ctx.task))
        biases = {n for n, _ in model.named_parameters() if n.endswith(".bias") and n not in head}
        if not biases:
            raise UserError(f"peft=bitfit: {type(model).__name__} has no bias terms to train "
                            "(Llama-style models have none); use peft=lora, ia3 or top_layers")
        train_only(model, biases | head)
        return model
