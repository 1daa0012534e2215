"""A user's own data: table files (CSV, TSV, JSON lines, Parquet), CoNLL token files, plain text, hub datasets.

`data.path` is either one file, split with a fixed seed (`data.split_seed`,
`data.val_size` and `data.test_size` examples held out), or a directory
holding `train.*` and optionally `validation.*` (or `val.*`, `dev.*`) and
`test.*`; a directory with only `train.*` is split like a single file.
Table files are read with the `datasets` library. The task follows the
dataset (`local_table`: sequence classification; `local_conll`: token
classification; `local_text`: causal LM) or `data.task`:

- sequence_classification: `data.text_column`, optional `data.text_pair_column`, `data.label_column`;
- token_classification from a table: `data.text_column` holds the list of
  tokens and `data.label_column` the list of tags;
- causal_lm / masked_lm / masked_lm_nsp: `data.text_column` only.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from llmk_lab.data import SPLITS, RawData, register_dataset, seeded_split
from llmk_lab.data.wnut16 import read_conll
from llmk_lab.errors import UserError
from llmk_lab.tasks import TASKS

log = logging.getLogger(__name__)

TABLE_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "val", "dev", "valid"), "test": ("test",)}


def _chosen(cfg) -> str:
    """How the user picked this dataset: `data=local_csv` on the command line (several options share one
    loader, `local_table`), else `data.name=...`."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return f"data={HydraConfig.get().runtime.choices['data']}"
    except Exception:  # noqa: BLE001  (not under Hydra: composed in a test or the Python API)
        return f"data.name={cfg.name!r}"


def undecodable(path: Path, err: UnicodeDecodeError, encoding: str) -> UserError:
    """One line for a file that is not in `data.encoding`, with the way out."""
    byte = err.object[err.start:err.start + 1].hex() if isinstance(err.object, (bytes, bytearray)) else "?"
    return UserError(f"data.path={str(path)!r} is not {encoding} text (byte 0x{byte} at position {err.start}); "
                     "set data.encoding to the file's encoding, e.g. data.encoding=latin-1 (or cp1252, utf-16)")


def split_files(cfg, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """{split: file} from `data.path` (a file, or a directory of train/validation/test files)."""
    if not cfg.path:
        raise UserError(f"data.path is required for {_chosen(cfg)}: set data.path=/path/to/your/file "
                        f"(one of {', '.join(suffixes)}) or a directory with train/validation/test files")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise UserError(f"data.path={cfg.path!r}: no such file or directory")
    if path.is_file():
        if path.suffix.lower() not in suffixes:
            raise UserError(f"data.path={cfg.path!r}: data.name={cfg.name!r} reads {', '.join(suffixes)} files")
        return {"train": path}
    found = {}
    for split, names in SPLIT_NAMES.items():
        for candidate in sorted(path.iterdir()):
            if candidate.stem.lower() in names and candidate.suffix.lower() in suffixes:
                found.setdefault(split, candidate)
    if "train" not in found:
        raise UserError(f"data.path={cfg.path!r}: the directory has no train file (expected train with one of "
                        f"{', '.join(suffixes)})")
    return found


def complete_splits(loaded: dict[str, list], cfg) -> tuple[dict[str, list], dict[str, Any]]:
    """Fill missing validation/test splits with a seeded split of the training file."""
    if "validation" in loaded and "test" in loaded:
        return loaded, {"split": "from files"}
    for split, examples in loaded.items():
        if not examples:
            raise UserError(f"data.path={cfg.path!r}: the {split} file is empty")
    pool = loaded["train"]
    held_out = (0 if "validation" in loaded else cfg.val_size) + (0 if "test" in loaded else cfg.test_size)
    if held_out >= len(pool):
        raise UserError(f"data.path={cfg.path!r}: {len(pool)} examples cannot give data.val_size={cfg.val_size} "
                        f"and data.test_size={cfg.test_size} held-out examples and leave any for training; "
                        "lower them or provide validation/test files")
    split = seeded_split(pool, cfg.split_seed, cfg.val_size if "validation" not in loaded else 1,
                         cfg.test_size if "test" not in loaded else 1)
    if "validation" in loaded:  # only test was drawn: give the other held-out example back to training
        split["train"] += split["validation"]
    if "test" in loaded:
        split["train"] += split["test"]
    result = {s: split[s] if s == "train" else loaded.get(s, split[s]) for s in SPLITS}
    return result, {"split": "seeded", "split_seed": cfg.split_seed, "val_size": cfg.val_size,
                    "test_size": cfg.test_size}


def _is_text(feature) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")


def _is_text_list(feature) -> bool:
    inner = getattr(feature, "feature", None)
    if inner is None and isinstance(feature, list) and feature:
        inner = feature[0]
    return inner is not None and _is_text(inner)


def _require_column(dataset, column: str, setting: str, where: str) -> None:
    if column not in dataset.column_names:
        raise UserError(f"data.{setting}={column!r} is not a column of {where} (columns: {dataset.column_names})")


def examples_from_dataset(dataset, cfg, task: str, where: str) -> list[dict]:
    """Rows of a `datasets.Dataset` as the plain examples the task reads (its `example_format`), checking
    columns and types."""
    features = dataset.features
    example_format = TASKS.get(task, "data.task").cls.example_format
    _require_column(dataset, cfg.text_column, "text_column", where)
    if example_format == "tagged_tokens":
        _require_column(dataset, cfg.label_column, "label_column", where)
        if not _is_text_list(features[cfg.text_column]):
            raise UserError(f"data.text_column={cfg.text_column!r} of {where} holds {features[cfg.text_column]}, "
                            "not a list of tokens (strings)")
        tags = dataset[cfg.label_column]
        names = getattr(getattr(features[cfg.label_column], "feature", None), "names", None)
        if names:  # integer tags with declared names (hub datasets)
            tags = [[names[t] for t in row] for row in tags]
        return [{"tokens": list(tokens), "tags": list(row)} for tokens, row in zip(dataset[cfg.text_column], tags)]
    if not _is_text(features[cfg.text_column]):
        raise UserError(f"data.text_column={cfg.text_column!r} of {where} holds "
                        f"{getattr(features[cfg.text_column], 'dtype', features[cfg.text_column])} values, not text")
    columns = {"text": cfg.text_column}
    if example_format == "labelled_text":
        _require_column(dataset, cfg.label_column, "label_column", where)
        columns["label"] = cfg.label_column
        if cfg.text_pair_column:
            _require_column(dataset, cfg.text_pair_column, "text_pair_column", where)
            if not _is_text(features[cfg.text_pair_column]):
                raise UserError(f"data.text_pair_column={cfg.text_pair_column!r} of {where} holds "
                                f"{features[cfg.text_pair_column].dtype} values, not text")
            columns["text_pair"] = cfg.text_pair_column
    examples = [{key: row[column] for key, column in columns.items()} for row in dataset.select_columns(
        list(dict.fromkeys(columns.values())))]
    for number, example in enumerate(examples):
        for key in ("text", "text_pair"):
            if key in example and example[key] is None:
                raise UserError(f"data.{'text_column' if key == 'text' else 'text_pair_column'}="
                                f"{columns[key]!r} of {where}: row {number} is empty")
        if "label" in example and example["label"] is None:
            raise UserError(f"data.label_column={cfg.label_column!r} of {where}: row {number} has no label")
    names = getattr(features.get(cfg.label_column), "names", None) if example_format == "labelled_text" else None
    if names:
        for example in examples:
            example["label"] = names[example["label"]]
    return examples


def finish(splits: dict[str, list], cfg, task: str, source: dict) -> RawData:
    """The loaded splits with their labels checked and indexed the task's way."""
    labels = TASKS.get(task, "data.task").cls.label_names(splits, f"data.label_column={cfg.label_column!r}")
    return RawData(splits=splits, task=task, labels=labels, source=source)


def _load_table(path: Path, cfg, split: str):
    import datasets

    builder = TABLE_FORMATS[path.suffix.lower()]
    kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    if builder in ("csv", "json"):
        kwargs["encoding"] = cfg.encoding
    if path.stat().st_size == 0:
        raise UserError(f"data.path={str(path)!r}: the file is empty, so the {split} split is empty")
    datasets.disable_progress_bars()
    # The reader logs a failure itself before raising it (twice: its own handler and the run's log);
    # the one line below says it once, with what to do.
    reader_log = logging.getLogger("datasets")
    level = reader_log.level
    reader_log.setLevel(logging.CRITICAL)
    try:
        return datasets.load_dataset(builder, data_files={"rows": str(path)}, split="rows", **kwargs)
    except Exception as err:  # noqa: BLE001  (any parser error is the file's fault)
        cause = err.__cause__ or err
        decode = next((e for e in (err, err.__cause__, err.__context__, getattr(cause, "__context__", None))
                       if isinstance(e, UnicodeDecodeError)), None)
        if decode is not None:
            raise undecodable(path, decode, cfg.encoding) from None
        if isinstance(cause, LookupError) and "encoding" in str(cause):
            raise UserError(f"data.encoding={cfg.encoding!r} is not allowed: a Python codec name, e.g. utf-8, "
                            "latin-1, cp1252") from None
        if "corresponds to no data" in str(err):
            raise UserError(f"data.path={str(path)!r}: the file has no rows, so the {split} split is empty") from None
        raise UserError(f"data.path={str(path)!r}: cannot read it as {builder} "
                        f"({str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__})") from None
    finally:
        reader_log.setLevel(level)


@register_dataset("local_table", task="sequence_classification")
def load_local_table(cfg) -> RawData:
    task = cfg.task or "sequence_classification"
    files = split_files(cfg, tuple(TABLE_FORMATS))
    loaded = {split: examples_from_dataset(_load_table(f, cfg, split), cfg, task, f"{f.name}") for split, f in files.items()}
    splits, how = complete_splits(loaded, cfg)
    return finish(splits, cfg, task, {"files": {s: str(f) for s, f in files.items()}, **how})


@register_dataset("local_conll", task="token_classification")
def load_local_conll(cfg) -> RawData:
    files = split_files(cfg, (".conll", ".txt", ".tsv", ".bio", ".iob", ".iob2"))
    loaded = {split: read_conll(f, "data.path") for split, f in files.items()}
    splits, how = complete_splits(loaded, cfg)
    return finish(splits, cfg, "token_classification", {"files": {s: str(f) for s, f in files.items()}, **how})


def _documents_of(path: Path, cfg) -> list[dict]:
    try:
        text = path.read_text(encoding=cfg.encoding)
    except UnicodeDecodeError as err:
        raise undecodable(path, err, cfg.encoding) from None
    except LookupError:
        raise UserError(f"data.encoding={cfg.encoding!r} is not allowed: a Python codec name, e.g. utf-8, "
                        "latin-1, cp1252") from None
    if cfg.options.get("document_per_file", False):
        return [{"text": text.strip()}] if text.strip() else []
    # Blank lines separate documents (paragraphs); one file of one document is split by blank lines too.
    return [{"text": part.strip()} for part in text.split("\n\n") if part.strip()]


@register_dataset("local_text", task="causal_lm")
def load_local_text(cfg) -> RawData:
    task = cfg.task or "causal_lm"
    text_tasks = [name for name in TASKS.names() if TASKS.get(name).cls.example_format == "text"]
    if task not in text_tasks:
        raise UserError(f"data.task={task!r} is not allowed for data.name='local_text': one of {text_tasks}")
    files = split_files(cfg, (".txt", ".text", ".md"))
    loaded = {split: _documents_of(f, cfg) for split, f in files.items()}
    splits, how = complete_splits(loaded, cfg)
    return finish(splits, cfg, task, {"files": {s: str(f) for s, f in files.items()}, "documents": "blank-line "
                                      "separated paragraphs", **how})


@register_dataset("hub", task="sequence_classification")
def load_hub(cfg) -> RawData:
    """A dataset from the Hugging Face hub by name (`data.path`, e.g. `imdb`; `data.options.config` for a subset)."""
    import datasets

    task = cfg.task or "sequence_classification"
    if not cfg.path:
        raise UserError("data.path is required for data.name='hub': the hub dataset name, e.g. data.path=imdb")
    try:
        loaded_dict = datasets.load_dataset(cfg.path, cfg.options.get("config"),
                                            revision=cfg.options.get("revision"))
    except Exception as err:  # noqa: BLE001  (offline, unknown name, gated...)
        raise UserError(f"data.path={cfg.path!r}: cannot load the hub dataset "
                        f"({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})") from None
    loaded = {}
    for split, names in SPLIT_NAMES.items():
        for name in names:
            if name in loaded_dict:
                loaded[split] = examples_from_dataset(loaded_dict[name], cfg, task, f"{cfg.path}[{name}]")
                break
    if "train" not in loaded:
        raise UserError(f"data.path={cfg.path!r}: the hub dataset has no train split (splits: {list(loaded_dict)})")
    splits, how = complete_splits(loaded, cfg)
    return finish(splits, cfg, task, {"hub": cfg.path, "config": cfg.options.get("config"), **how})
