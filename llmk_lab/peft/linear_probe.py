"""`linear_probe`: the pretrained model stays frozen and only the task head trains (a linear probe)."""
from dataclasses import dataclass

from llmk_lab.peft import PEFT, head_parameter_names, train_only
from llmk_lab.peft.selective import SubsetStrategy


@dataclass
class LinearProbeConfig:
    method: str = "linear_probe"


@PEFT.register("linear_probe", config=LinearProbeConfig)
class LinearProbe(SubsetStrategy):
    def apply(self, model, ctx):
        train_only(model, set(head_parameter_names(model, ctx.task)))
        return model
