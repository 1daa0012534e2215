"""Predict with a finished run: a small Python API and a command line.

    from llmk_lab.predict import load
    predictor = load("outputs/2026-11-23/17-34-50-123456")        # a run directory or its model/ folder
    predictor.predict(["a gripping, beautifully acted film"])
    # classification: [{"label": "positive", "score": 0.93, "probabilities": {"negative": 0.07, "positive": 0.93}}]
    # NER:            [{"entities": [{"type": "person", "text": "Alice", "start": 0, "end": 5, "score": 0.88}]}]
    # causal LM:      [{"perplexity": 41.2, "tokens": 57}]; predictor.generate("To be", max_new_tokens=20)
    # masked LM:      predictor.predict(["the film was [MASK]."]) -> [{"masks": [[{"token": "good", "score": 0.2},
    #                 ...top_k]], "filled": "the film was good."}]

Everything comes from the run directory's `model/` export (weights, tokenizer, `llmk_lab.json` with
the task, labels and the run's `data.max_length`): no config files, no Hydra. A text longer than the
run's `data.max_length` tokens is truncated to it with a warning, as the run itself truncated
(`max_length=` raises the limit up to what the model's positions allow); causal-LM perplexity
scores a long text in windows of that length instead, the run's protocol.

    python -m llmk_lab.predict RUN_DIR "some text" ["more text" ...]
    python -m llmk_lab.predict RUN_DIR --input texts.txt [--output predictions.jsonl]   # one text per line
    python -m llmk_lab.predict RUN_DIR "To be" --generate 20 [--sample --temperature 0.8 --seed 0]
    python -m llmk_lab.predict RUN_DIR "the film was [MASK]." [--top-k 5]             # masked LM: fill-mask

int8 folders (`format` in llmk_lab.json) load on CPU: their kernels are CPU kernels.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

from llmk_lab.console import quiet_libraries
from llmk_lab.errors import UserError
from llmk_lab.export import PLAIN, finished_model_dir, load_exported, read_info

log = logging.getLogger(__name__)


class TruncationWarning(UserWarning):
    """A text had more tokens than the model takes and was cut."""


def _device(requested: Optional[str]) -> str:
    import torch

    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


class Predictor:
    """The final model of a run with its tokenizer; subclasses know how to read their task's outputs."""

    def __init__(self, model, tokenizer, info: dict[str, Any], device: str, max_length: Optional[int] = None):
        self.model, self.tokenizer, self.info, self.device = model.to(device).eval(), tokenizer, info, device
        limit = getattr(model.config, "max_position_embeddings", None) or 10**9
        self.max_length = int(max_length or info.get("max_length") or limit)
        if self.max_length > limit:
            raise UserError(f"max_length={self.max_length} is not allowed: the model has {limit} positions")
        self.labels = info.get("labels")

    @property
    def task(self) -> str:
        return self.info["task"]

    def _encode(self, texts: list[str], **kwargs):
        """Tokenise a batch, warning once per text that is longer than `max_length` tokens."""
        full = self.tokenizer(texts, truncation=False, add_special_tokens=True, **kwargs)["input_ids"]
        for text, ids in zip(texts, full):
            if len(ids) > self.max_length:
                warnings.warn(f"text of {len(ids)} tokens truncated to max_length={self.max_length} "
                              f"({text[:40]!r}...)", TruncationWarning, stacklevel=3)
        return self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True,
                              return_tensors="pt", **kwargs)

    def _forward(self, batch: dict):
        import torch

        with torch.inference_mode():
            return self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits.float().cpu()

    def predict_batch(self, texts: list[str]) -> list[dict]:
        raise NotImplementedError

    def predict(self, texts: Iterable[str] | str, batch_size: int = 32, progress: bool = False) -> list[dict]:
        """One result per text, in order; `progress` shows a bar on stderr (on a terminal)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        results: list[dict] = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), unit="text", desc="predicting", file=sys.stderr, disable=None)
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            results.extend(self.predict_batch(chunk))
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        return results


class ClassificationPredictor(Predictor):
    def predict_batch(self, texts):
        probabilities = self._forward(self._encode(texts)).softmax(-1)
        out = []
        for row in probabilities:
            best = int(row.argmax())
            out.append({"label": self.labels[best], "score": float(row[best]),
                        "probabilities": {label: float(p) for label, p in zip(self.labels, row)}})
        return out


def bio_spans(tags: list[str], scores: list[float]) -> list[tuple[int, int, str, float]]:
    """(first word, last word + 1, type, mean score) of each entity in a BIO tag sequence (CoNLL's reading:
    an I- tag that does not continue an entity of its type starts one)."""
    spans, start, kind = [], None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, name = tag.partition("-")
        continues = prefix == "I" and kind == name
        if start is not None and not continues:
            spans.append((start, i, kind, sum(scores[start:i]) / (i - start)))
            start, kind = None, None
        if prefix in ("B", "I") and not continues:
            start, kind = i, name
    return spans


class TokenClassificationPredictor(Predictor):
    """Entity spans with their types and character offsets; words are whitespace-separated, as in training."""

    def predict_batch(self, texts):
        words_per_text, offsets_per_text = [], []
        for text in texts:
            words, offsets, at = [], [], 0
            for word in text.split():
                begin = text.index(word, at)
                words.append(word)
                offsets.append((begin, begin + len(word)))
                at = begin + len(word)
            words_per_text.append(words)
            offsets_per_text.append(offsets)
        encoded = self._encode_words(words_per_text)
        probabilities = self._forward({k: v for k, v in encoded.items()}).softmax(-1)
        out = []
        for i, (text, offsets) in enumerate(zip(texts, offsets_per_text)):
            tags, scores, previous = [], [], None
            for position, word in enumerate(encoded.word_ids(i)):
                if word is not None and word != previous:  # the first sub-token carries the word's tag
                    best = int(probabilities[i, position].argmax())
                    tags.append(self.labels[best])
                    scores.append(float(probabilities[i, position, best]))
                previous = word
            entities = []
            for first, last, kind, score in bio_spans(tags, scores):
                begin, end = offsets[first][0], offsets[last - 1][1]
                entities.append({"type": kind, "text": text[begin:end], "start": begin, "end": end, "score": score})
            out.append({"entities": entities, "words_tagged": len(tags), "words": len(offsets)})
        return out

    def _encode_words(self, words_per_text):
        full = self.tokenizer(words_per_text, is_split_into_words=True, truncation=False)["input_ids"]
        for words, ids in zip(words_per_text, full):
            if len(ids) > self.max_length:
                warnings.warn(f"text of {len(ids)} tokens truncated to max_length={self.max_length}: words past "
                              "the limit get no tag", TruncationWarning, stacklevel=4)
        return self.tokenizer(words_per_text, is_split_into_words=True, truncation=True,
                              max_length=self.max_length, padding=True, return_tensors="pt")


class FillMaskPredictor(Predictor):
    """The `top_k` likeliest tokens at every mask token of a text, and the text with the best ones filled in."""

    top_k = 5

    def predict_batch(self, texts):
        import torch

        mask = self.tokenizer.mask_token
        for text in texts:
            if mask not in text:
                raise UserError(f"a masked-LM run fills {mask} tokens: {text[:40]!r} has none "
                                f"(e.g. 'the film was {mask}.')")
        batch = self._encode(texts)
        with torch.inference_mode():
            out = self.model(**{k: v.to(self.device) for k, v in batch.items()})
        # BERT's pretraining heads (masked LM + NSP) call the token scores prediction_logits.
        probabilities = (out.logits if "logits" in out else out["prediction_logits"]).float().cpu().softmax(-1)
        results = []
        for i, text in enumerate(texts):
            positions = (batch["input_ids"][i] == self.tokenizer.mask_token_id).nonzero().flatten().tolist()
            masks, filled = [], text
            for position in positions:
                scores, ids = probabilities[i, position].topk(self.top_k)
                candidates = [{"token": self.tokenizer.decode([int(t)]).strip(), "score": float(p)}
                              for p, t in zip(scores, ids)]
                masks.append(candidates)
                filled = filled.replace(mask, candidates[0]["token"], 1)
            results.append({"masks": masks, "filled": filled})
        return results


class CausalLMPredictor(Predictor):
    def predict_batch(self, texts):
        return [self.perplexity(text) for text in texts]

    def perplexity(self, text: str) -> dict[str, float]:
        """exp(mean next-token NLL), a long text scored in non-overlapping windows of `max_length` tokens."""
        ids = self.tokenizer(text, verbose=False)["input_ids"]
        if len(ids) < 2:
            raise UserError(f"perplexity needs a text of at least 2 tokens; {text!r} has {len(ids)}")
        return self.perplexity_of_ids(ids)

    def perplexity_of_ids(self, ids: list[int]) -> dict[str, float]:
        import torch

        total, count = 0.0, 0
        with torch.inference_mode():
            for start in range(0, len(ids) - 1, self.max_length):
                window = torch.tensor([ids[start:start + self.max_length]], device=self.device)
                if window.shape[1] < 2:
                    break
                logits = self.model(input_ids=window).logits.float()
                nll = torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
                total, count = total + float(nll), count + window.shape[1] - 1
        return {"perplexity": math.exp(total / count), "nll": total / count, "tokens": count}

    def generate(self, prompt: str, max_new_tokens: int = 32, sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, seed: Optional[int] = None) -> dict[str, Any]:
        """Greedy (default) or sampled continuation of `prompt`."""
        import torch

        room = getattr(self.model.config, "max_position_embeddings", 10**9) - max_new_tokens
        if room < 1:
            raise UserError(f"max_new_tokens={max_new_tokens} is not allowed: the model has "
                            f"{self.model.config.max_position_embeddings} positions")
        ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
        if ids.shape[1] > room:
            warnings.warn(f"prompt of {ids.shape[1]} tokens cut to its last {room} to leave room for "
                          f"{max_new_tokens} new tokens", TruncationWarning, stacklevel=2)
            ids = ids[:, -room:]
        if seed is not None:
            torch.manual_seed(seed)
        kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p) if sample else dict(do_sample=False)
        with torch.inference_mode():
            out = self.model.generate(ids.to(self.device), attention_mask=torch.ones_like(ids).to(self.device),
                                      max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                      **kwargs)
        new = out[0, ids.shape[1]:]
        return {"prompt": prompt, "continuation": self.tokenizer.decode(new, skip_special_tokens=True),
                "new_tokens": int(new.numel())}


PREDICTORS = {"sequence_classification": ClassificationPredictor,
              "token_classification": TokenClassificationPredictor, "causal_lm": CausalLMPredictor,
              "masked_lm": FillMaskPredictor, "masked_lm_nsp": FillMaskPredictor}


def load(path: str | Path, device: Optional[str] = None, max_length: Optional[int] = None,
         top_k: Optional[int] = None) -> Predictor:
    """The predictor of a finished run directory or of its exported `model/` folder (`top_k`: masked LM's
    candidates per mask, default 5)."""
    from transformers import AutoTokenizer

    folder = finished_model_dir(Path(path))
    info = read_info(folder)
    if info["task"] not in PREDICTORS:
        raise UserError(f"{path}: prediction supports {sorted(PREDICTORS)}; this run's task is {info['task']!r}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k={top_k} is not allowed: a positive integer")
    int8 = info.get("format", PLAIN) != PLAIN
    if int8 and device not in (None, "cpu"):
        raise UserError(f"device={device!r} is not allowed for this run: its model/ is int8 ({info['format']}), "
                        "which runs on cpu")
    model = load_exported(folder, info)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    predictor = PREDICTORS[info["task"]](model, tokenizer, info, "cpu" if int8 else _device(device), max_length)
    if top_k is not None:
        predictor.top_k = top_k
    return predictor


# ----------------------------------------------------------------------------- command line

def _read_lines(path: Path) -> list[str]:
    if not path.exists():
        raise UserError(f"--input {str(path)!r}: no such file")
    if path.is_dir():
        raise UserError(f"--input {str(path)!r} is a directory; give a text file with one text per line")
    try:
        lines = [line.rstrip("\r\n") for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as err:
        raise UserError(f"--input {str(path)!r} is not UTF-8 text (byte {err.start}); convert it, e.g. "
                        "iconv -f latin1 -t utf-8") from None
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise UserError(f"--input {str(path)!r} is empty: one text per line expected")
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmk_lab.predict",
                                     description="Predict with a finished run: one JSON line per text.")
    parser.add_argument("run_dir", type=Path, help="a finished run directory, or its model/ folder")
    parser.add_argument("texts", nargs="*", help="texts to predict")
    parser.add_argument("--input", type=Path, help="a UTF-8 file with one text per line")
    parser.add_argument("--output", type=Path, help="write JSON lines here instead of stdout")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--max-length", type=int, help="tokens per text (default: the run's data.max_length)")
    parser.add_argument("--generate", type=int, metavar="N", help="causal LM: continue each text by N tokens")
    parser.add_argument("--sample", action="store_true", help="sample the continuation instead of greedy")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--top-k", type=int, help="masked LM: candidates per mask token (default 5)")
    args = parser.parse_args(argv)
    quiet_libraries()  # no per-load progress bars or load reports
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    warnings.simplefilter("default", TruncationWarning)
    warnings.formatwarning = lambda message, category, *rest: f"warning: {message}\n"
    try:
        if args.batch_size < 1:
            raise UserError(f"--batch-size={args.batch_size} is not allowed: a positive integer")
        texts = list(args.texts) + (_read_lines(args.input) if args.input else [])
        if not texts:
            raise UserError("nothing to predict: give texts after RUN_DIR or --input FILE")
        predictor = load(args.run_dir, args.device, args.max_length, args.top_k)
        if args.generate is not None and not isinstance(predictor, CausalLMPredictor):
            raise UserError(f"--generate is for causal-LM runs; this run's task is {predictor.task!r}")
        if args.generate is not None:
            results = [predictor.generate(t, args.generate, args.sample, args.temperature, args.top_p, args.seed)
                       for t in texts]
        else:
            results = predictor.predict(texts, args.batch_size, progress=len(texts) > 1)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    lines = "".join(json.dumps({"text": t, **r}, ensure_ascii=False) + "\n" for t, r in zip(texts, results))
    if args.output:
        args.output.write_text(lines, encoding="utf-8")
    else:
        sys.stdout.write(lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
