"""WNUT-16 Twitter NER: 2,394 tweets, `token<TAB>BIO-tag` per line, a blank line between tweets.

The packaged file is one pool without an official split, so a fixed seeded
split is made (`data.split_seed`, `data.val_size`, `data.test_size` tweets)
and recorded in the manifest.
"""
from __future__ import annotations

from pathlib import Path

from llmk_lab import assets
from llmk_lab.data import RawData, register_dataset, seeded_split
from llmk_lab.tasks import check_token_tags, index_labels
from llmk_lab.errors import UserError


def read_conll(path: Path, where: str) -> list[dict]:
    """Sentences of a CoNLL-style file: first column the token, last column the tag, blank lines between.

    `-DOCSTART-` lines (CoNLL-2003) are skipped.
    """
    if not path.is_file():
        raise UserError(f"{where}={str(path)!r}: no such file")
    sentences, tokens, tags = [], [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            if tokens:
                sentences.append({"tokens": tokens, "tags": tags})
                tokens, tags = [], []
            continue
        columns = line.split("\t") if "\t" in line else line.split()
        if columns[0].startswith("-DOCSTART-"):
            continue
        if len(columns) < 2 or not columns[-1].strip():
            raise UserError(f"{where}={str(path)!r}: line {number} ({line.strip()[:40]!r}) has a token but no tag; "
                            "expected `token<TAB or space>tag`")
        tokens.append(columns[0].strip())
        tags.append(columns[-1].strip())
    if tokens:
        sentences.append({"tokens": tokens, "tags": tags})
    return sentences


def bio_order(labels: list[str]) -> list[str]:
    """`O` first, then tags grouped by entity type, B before I: a stable, readable label order."""
    def key(tag: str):
        if tag == "O":
            return ("", "")
        prefix, _, kind = tag.partition("-")
        return (kind, prefix)
    return sorted(labels, key=key)


@register_dataset("wnut16", task="token_classification")
def load_wnut16(cfg) -> RawData:
    path = assets.fetch("wnut16") / "ner.txt"
    sentences = read_conll(path, "asset wnut16")
    splits = seeded_split(sentences, cfg.split_seed, cfg.val_size, cfg.test_size)
    check_token_tags(splits, "data.name='wnut16'")
    all_tags = sorted({t for s in sentences for t in s["tags"]})
    labels = index_labels(splits, "tags", "data.name='wnut16'", sequence=True, known=bio_order(all_tags))
    return RawData(
        splits=splits, task="token_classification", labels=labels,
        source={"asset": "wnut16", "sha256": assets.checksum("wnut16"), "file": path.name,
                "split_seed": cfg.split_seed, "split_unit": "tweet", "tweets": len(sentences)},
    )
