"""Full fine-tuning: every weight trains (the baseline PEFT methods are compared with)."""
from dataclasses import dataclass

from llmk_lab.peft import PEFT, PeftStrategy


@dataclass
class FullConfig:
    method: str = "full"


@PEFT.register("full", config=FullConfig)
class FullFineTuning(PeftStrategy):
    trains_base_weights = "all"

    def apply(self, model, ctx):
        for param in model.parameters():
            param.requires_grad_(True)
        return model
