"""IA3 (Liu et al. 2022, "Few-shot PEFT is better and cheaper than in-context learning") through peft.

Learned vectors rescale the attention keys and values and the feed-forward
activations entering the down-projection, as in the paper. Trainable
parameters: d_out per attention target + d_in per feed-forward target, plus
the task head. Merging multiplies rows/columns of W, so pruned zeros stay zero.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from peft import IA3Config as PeftIA3Config

from llmk_lab.architectures import architecture
from llmk_lab.errors import UserError
from llmk_lab.peft import PEFT, name_matcher, resolve_targets
from llmk_lab.peft.lora import PeftLibraryStrategy, wrap


@dataclass
class IA3Config:
    method: str = "ia3"
    # Regex over module names or a list of name suffixes (null: keys, values and the
    # feed-forward down-projection of every block).
    target_modules: Optional[Any] = None
    # Targets whose input (not output) is scaled; must be among the targets
    # (null: the architecture's feed-forward down-projection when targets are
    # the default, none otherwise).
    feedforward_modules: Optional[Any] = None


@PEFT.register("ia3", config=IA3Config)
class IA3(PeftLibraryStrategy):
    def apply(self, model, ctx):
        s = self.settings
        # Keys, values and the feed-forward down-projection of every block, from the architecture map.
        default_targets, default_ff = architecture(model).ia3_targets() if s.target_modules is None else (None, None)
        targets = resolve_targets(model, s.target_modules, default=default_targets)
        if s.feedforward_modules is not None:
            feedforward = s.feedforward_modules if isinstance(s.feedforward_modules, str) \
                else [str(m) for m in s.feedforward_modules]
            in_targets, in_ff = name_matcher(targets), name_matcher(feedforward)
            outside = [n for n, _ in model.named_modules() if in_ff(n) and not in_targets(n)]
            if outside:
                raise UserError(f"peft.feedforward_modules={s.feedforward_modules!r} matches {outside[0]!r}, "
                                "which is not among peft.target_modules; it must be a subset of the targets")
        else:
            feedforward = default_ff if s.target_modules is None else []
        config = PeftIA3Config(task_type=ctx.task.peft_task_type, target_modules=targets,
                           feedforward_modules=feedforward)
        return wrap(model, config)


    @property
    def target_modules(self) -> Optional[Any]:
        return self.settings.target_modules

    def no_decay_parameter_names(self, model):
        # The scaling vectors start at 1 (identity); AdamW's decay would pull them toward 0, i.e. toward
        # switching the scaled keys, values and activations off.
        return {name for name, _ in model.named_parameters() if ".ia3_l." in name or name.endswith(".ia3_l")}
