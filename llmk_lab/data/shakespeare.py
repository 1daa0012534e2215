"""Shakespeare: 42 modern-spelling works (Project Gutenberg texts), for causal-LM perplexity and calibration.

The split is by work, fixed here (not drawn at random) so that every run, and
every compression paper reproduced on this data, scores the same held-out
plays: evaluation text never overlaps the text that fine-tuning or the
compression methods' calibration windows come from. Override with
`data.options.validation_works` / `data.options.test_works` (lists of file stems).
"""
from __future__ import annotations

from llmk_lab import assets
from llmk_lab.data import RawData, register_dataset
from llmk_lab.errors import UserError

# Two short, well-known plays held out; each is about 25-30k SmolLM2 tokens,
# so perplexity at length 512 takes a couple of minutes on a 2-core CPU.
VALIDATION_WORKS = ("tempest",)
TEST_WORKS = ("macbeth",)


@register_dataset("shakespeare", task="causal_lm")
def load_shakespeare(cfg) -> RawData:
    root = assets.fetch("shakespeare")
    works = {p.name.removesuffix("_gut.txt"): p for p in sorted(root.glob("*_gut.txt"))}
    validation = list(cfg.options.get("validation_works", VALIDATION_WORKS))
    test = list(cfg.options.get("test_works", TEST_WORKS))
    for key, chosen in (("validation_works", validation), ("test_works", test)):
        unknown = [w for w in chosen if w not in works]
        if unknown or not chosen:
            raise UserError(f"data.options.{key}={chosen!r} is not allowed: a non-empty list of works from "
                            f"{sorted(works)}")
    if set(validation) & set(test):
        raise UserError(f"data.options.validation_works and data.options.test_works share {sorted(set(validation) & set(test))}")
    train = [w for w in works if w not in validation and w not in test]

    def documents(names):
        return [{"text": works[n].read_text(encoding="utf-8").strip(), "work": n} for n in names]

    return RawData(
        splits={"train": documents(train), "validation": documents(validation), "test": documents(test)},
        task="causal_lm",
        source={"asset": "shakespeare", "sha256": assets.checksum("shakespeare"), "split_unit": "work",
                "train_and_calibration_works": train, "validation_works": validation, "test_works": test},
    )
