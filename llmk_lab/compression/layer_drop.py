"""Layer dropping by block influence (ShortGPT: Men et al. 2024, "ShortGPT: Layers in Large Language Models
are More Redundant Than You Expect").

Block influence of decoder block i on calibration data: BI_i = 1 - E_t[cos(x_t, y_t)], where x_t is the
block's input hidden state at token t and y_t its output (mean over every non-padding calibration token, one
forward pass of the dense model). A block that barely turns its input changes little; the `count` blocks of
lowest influence are removed for good (`llmk_lab/surgery.drop_blocks`): the saved model has fewer
layers and reloads with `from_pretrained`. Recovery is then any PEFT strategy (LoRA) on the shorter model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from llmk_lab.architectures import architecture, has_decoder_blocks
from llmk_lab.compression import COMPRESSION, CompressionMethod
from llmk_lab.compression.calibration import _block_output, _hidden_states, model_inputs
from llmk_lab.surgery import drop_blocks
from llmk_lab.errors import UserError, check


@dataclass
class LayerDropConfig:
    method: str = "layer_drop"
    # Fraction of the decoder blocks to remove (rounded to a count), or `count` blocks when set.
    fraction: float = 0.25
    count: Optional[int] = None
    # Calibration sequences from the training split (the paper: a few hundred; their length is the data's).
    calibration_examples: int = 128
    # Sequences per forward pass (null: the evaluation batch size).
    calibration_batch_size: Optional[int] = None

    def __post_init__(self):
        check(0 < self.fraction < 1, "fraction", self.fraction, "a fraction of the blocks in (0, 1)")
        check(self.count is None or self.count >= 1, "count", self.count, "null (use fraction) or a count >= 1")
        check(self.calibration_examples >= 1, "calibration_examples", self.calibration_examples,
              "a number of sequences >= 1")
        check(self.calibration_batch_size is None or self.calibration_batch_size >= 1, "calibration_batch_size",
              self.calibration_batch_size, "null or a batch size >= 1")


@torch.no_grad()
def block_influence(model: nn.Module, blocks: nn.ModuleList, batches: list[dict]) -> list[float]:
    """BI_i = 1 - mean cosine similarity between block i's input and output hidden states, per token."""
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    tokens = torch.zeros((), dtype=torch.float64)
    current_mask: list[torch.Tensor] = []

    def make_hook(index: int):
        def hook(module, args, kwargs, output):
            x, y = _hidden_states(args, kwargs).float(), _block_output(output).float()
            cosine = torch.nn.functional.cosine_similarity(x, y, dim=-1)  # (batch, tokens)
            sums[index] += cosine[current_mask[0]].double().sum().cpu()
        return hook

    handles = [block.register_forward_hook(make_hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
            mask = inputs.get("attention_mask")
            current_mask[:] = [mask.bool() if mask is not None else torch.ones_like(inputs["input_ids"], dtype=torch.bool)]
            tokens += current_mask[0].sum().cpu()
            model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return (1 - sums / tokens.clamp(min=1)).tolist()


@COMPRESSION.register("layer_drop", config=LayerDropConfig)
class LayerDrop(CompressionMethod):
    """Removes the decoder blocks of lowest block influence before fine-tuning."""

    def blocks_to_drop(self, n_blocks: int) -> int:
        s = self.settings
        count = s.count if s.count is not None else round(s.fraction * n_blocks)
        key, value = ("count", s.count) if s.count is not None else ("fraction", s.fraction)
        if count >= n_blocks:
            raise UserError(f"compression.{key}={value} would remove {count} of the model's {n_blocks} blocks; "
                            f"allowed: fewer than {n_blocks}")
        if count == 0:
            raise UserError(f"compression.fraction={s.fraction} removes no block of {n_blocks} (rounds to 0); "
                            f"allowed: at least {0.5 / n_blocks:.3f}, or compression.count")
        return count

    def check_model(self, model) -> None:
        if not has_decoder_blocks(model):
            raise UserError(f"compression.method='layer_drop' needs decoder blocks (a causal LM such as Llama or "
                            f"GPT-2); {type(model).__name__} has an encoder stack (use compression=structured "
                            "compression.drop_layers=... there)")
        self.blocks_to_drop(len(architecture(model).blocks))

    def before_fit(self, ctx) -> None:
        s, model = self.settings, ctx.model
        blocks = architecture(model).blocks
        count = self.blocks_to_drop(len(blocks))
        batches = ctx.datamodule.calibration_batches(s.calibration_examples, s.calibration_batch_size)
        influence = block_influence(model, blocks, batches)
        drop = set(sorted(range(len(blocks)), key=lambda i: influence[i])[:count])
        params_before = sum(p.numel() for p in model.parameters())
        drop_blocks(model, blocks, drop)
        self.report = {"layers_before": len(influence), "layers_after": len(blocks), "layers_dropped": sorted(drop),
                       "block_influence": [round(v, 6) for v in influence], "params_before": params_before,
                       "params_after": sum(p.numel() for p in model.parameters()),
                       "calibration_sequences": sum(len(b["input_ids"]) for b in batches)}
