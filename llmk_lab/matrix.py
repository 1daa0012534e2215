"""What composes with what: every registered compression method x every registered PEFT strategy x task.

The cells are generated from the registries, so a newly registered method joins
the matrix by being registered. A cell either runs end to end on a tiny model
built from a config (seconds), holding the invariants `check_cell` lists, or is
refused by `plan()` before anything is written, in one line naming both options
and why.

    python -m llmk_lab.matrix --markdown          # the README's table (from plan() alone, no training)
    python -m llmk_lab.matrix --run [--task T]    # run every cell and print passed / refused / failed

    python -m llmk_lab.matrix --run --quick       # only the quick tier's cells (`quick_cells`)

The quick tier (`tests/test_matrix.py`) runs `quick_cells`: for each task a few cells that between them
run every compression method and every PEFT strategy; the full suite runs the other cells too. Both check
the invariants; the README test checks that the README holds `--markdown`'s table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from llmk_lab import run as run_module
from llmk_lab.compression import COMPRESSION
from llmk_lab.compression.quantization import is_quantized
from llmk_lab.config import DataConfig, ModelConfig
from llmk_lab.data import load_data
from llmk_lab.errors import UserError
from llmk_lab.light_schemas import register_all
from llmk_lab.masks import MASK
from llmk_lab.models import load_model, load_tokenizer
from llmk_lab.paths import config_dir
from llmk_lab.peft import PEFT
from llmk_lab.plan import plan
from llmk_lab.registry import to_settings
from llmk_lab.tasks import TASKS as TASK_REGISTRY, get_task

# The tiny settings every cell runs with: a 2-layer, 32-wide model, a handful of optimiser steps,
# the cost measurements (latency, size, fidelity) off, both exports on where possible.
BASE = ["logger=none", "data.limit_train=16", "data.limit_eval=8", "train.batch_size=8", "train.eval_batch_size=8",
        "train.max_steps=2", "train.val_every_n_epochs=0", "export.checkpoint=false", "export.adapter=true",
        "measure.latency_batch_sizes=[]", "measure.size=false", "measure.fidelity=false", "sweep.checkpoint_every_minutes=0"]

# Task -> (the overrides that select it, whether it gets every compression x PEFT pair or the slice).
TASKS = {
    "sequence_classification": ["model=tiny_bert", "data=movie_reviews"],
    "token_classification": ["model=tiny_bert", "data=wnut16", "data.max_length=32"],
    # Review sentences as LM text: the composition is what is tested, and Shakespeare's 900k words cost
    # seconds per cell to read and window.
    # The LM tasks score every position over a 30k vocabulary: 16 positions per example keep that small.
    "causal_lm": ["model=tiny_llama", "data=movie_reviews", "data.task=causal_lm", "data.max_length=16"],
    "masked_lm": ["model=tiny_bert", "data=movie_reviews", "data.task=masked_lm", "data.max_length=16"],
}
FULL_TASK = "sequence_classification"
# The other tasks get a slice: every PEFT strategy over one pruning method, and every compression method
# under one PEFT strategy (the pairs whose interactions differ by task: heads, masks, merging).
SLICE_COMPRESSION, SLICE_PEFT = "magnitude", "lora"

# Settings that make an option's default cheap or meaningful on a 2-step, 16-example run; an option not
# listed runs with its YAML defaults (so a newly registered method needs nothing here to join). Calibration
# sets: the 16 training examples, and for the causal LM 16 of its windows (it would draw 128 from the stream).
TINY_SETTINGS = {
    "wanda": ["compression.calibration_examples=16"],
    "sparsegpt": ["compression.calibration_examples=16"],
    "structured": ["compression.calibration_examples=16"],
    "adalora": ["peft.tinit=0", "peft.tfinal=0", "peft.deltaT=1", "peft.init_r=4", "peft.target_r=2"],
    "prefix": ["peft.num_virtual_tokens=4"],
    "prompt": ["peft.num_virtual_tokens=4"],
    "adapter": ["peft.bottleneck=8"],
    "gradual_magnitude": ["compression.frequency=1"],
    "movement": ["compression.frequency=1"],
    # Random 32-wide weights have a flat spectrum: 90 % of the energy needs nearly full rank.
    "low_rank": ["compression.rank=4"],
    # A two-step chain: prune, then quantise.
    "chain": ["compression.steps=[{method:magnitude,sparsity:0.5},{method:dynamic_int8}]"],
    # Groups of 16 divide every block linear of the tiny models (32 and 64 inputs); the YAML default 128 does not.
    "rtn": ["compression.group_size=16"],
    "gptq": ["compression.group_size=16", "compression.calibration_examples=16"],
    "awq": ["compression.group_size=16", "compression.calibration_examples=16"],
    # The tiny models have 2 blocks: the default quarter rounds to none.
    "layer_drop": ["compression.count=1", "compression.calibration_examples=16"],
}


@dataclass(frozen=True)
class Cell:
    task: str
    compression: str
    peft: str

    @property
    def name(self) -> str:
        return f"{self.task}/{self.compression}+{self.peft}"

    def overrides(self, merged: bool) -> list[str]:
        return [*TASKS[self.task], f"compression={self.compression}", f"peft={self.peft}", *BASE,
                f"export.merged={str(merged).lower()}",
                *TINY_SETTINGS.get(self.compression, []), *TINY_SETTINGS.get(self.peft, [])]


def registered() -> tuple[list[str], list[str]]:
    return COMPRESSION.names(), PEFT.names()


def cells(tasks: Optional[list[str]] = None) -> list[Cell]:
    compressions, pefts = registered()
    out = []
    for task in tasks or list(TASKS):
        if task == FULL_TASK:
            out += [Cell(task, c, p) for c in compressions for p in pefts]
        else:
            pairs = [(SLICE_COMPRESSION, p) for p in pefts] + [(c, SLICE_PEFT) for c in compressions
                                                                if c != SLICE_COMPRESSION]
            out += [Cell(task, c, p) for c, p in pairs]
    return out


def quick_cells(tasks: Optional[list[str]] = None) -> list[Cell]:
    """The quick tier's cells. The full task: one cell for each compression method and one for each PEFT
    strategy; a method is paired with a strategy not yet picked, then with the least picked one, taking a pair
    that `plan()` refuses only when the method runs with nothing else (so every method that can run does). The
    sliced tasks share their slices out: each compression method (under the slice's PEFT strategy) and each
    PEFT strategy (over the slice's pruning method) runs on one of them, in turn."""
    tasks = tasks or list(TASKS)
    compressions, pefts = registered()
    chosen: list[Cell] = []
    if FULL_TASK in tasks:
        pool = cells([FULL_TASK])
        uses: dict[str, int] = {}

        def pick(options: list[Cell], partner) -> None:
            options = sorted(options, key=lambda c: uses.get(partner(c), 0))  # stable: registry order on ties
            cell = next((c for c in options if refusals(c)[1] is None), options[0])
            chosen.append(cell)
            for name in (cell.compression, cell.peft):
                uses[name] = uses.get(name, 0) + 1

        for compression in compressions:
            pick([c for c in pool if c.compression == compression], lambda c: c.peft)
        for peft in pefts:
            if not uses.get(peft):
                pick([c for c in pool if c.peft == peft and c not in chosen], lambda c: c.compression)
    sliced = [t for t in tasks if t != FULL_TASK]
    if sliced:
        shared = [Cell(sliced[i % len(sliced)], c, SLICE_PEFT) for i, c in enumerate(compressions)]
        shared += [Cell(sliced[(i + 1) % len(sliced)], SLICE_COMPRESSION, p) for i, p in enumerate(pefts)]
        chosen += list(dict.fromkeys(shared))
    return chosen


_HYDRA_OPEN = False


@contextlib.contextmanager
def hydra_session():
    """Hydra initialised once for many compositions (initialising it is most of a composition's cost)."""
    global _HYDRA_OPEN
    if _HYDRA_OPEN:
        yield
        return
    from hydra import initialize_config_dir

    register_all()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        _HYDRA_OPEN = True
        try:
            yield
        finally:
            _HYDRA_OPEN = False


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose

    with hydra_session():
        return hydra_compose(config_name="config", overrides=overrides)


def refusal(cell: Cell, merged: bool) -> Optional[str]:
    """plan()'s one-line refusal of the cell, or None when it is planned to run."""
    try:
        plan(compose(cell.overrides(merged)))
    except UserError as err:
        return str(err)
    return None


# Cell -> (its config with the exports it runs with, refusal with both exports, refusal with the adapter export
# only): composing a config is a good part of a small cell's cost, and choosing the quick cells, the README
# table and the run all ask for the same ones.
_PLANNED: dict[Cell, tuple[Any, Optional[str], Optional[str]]] = {}
_COMPOSED: dict[Cell, Any] = {}


def _composed(cell: Cell) -> Any:
    if cell not in _COMPOSED:
        _COMPOSED[cell] = compose(cell.overrides(True))
    return _COMPOSED[cell]


def cell_config(cell: Cell):
    """The cell's config (both exports on), as `compose(cell.overrides(True))` gives it, joined from three
    compositions: the task's (with the slice's pair), the compression method's and the PEFT strategy's (each on
    the full task). The two groups' files and tiny settings set only their own node, whatever the task, so
    the 209 cells take 27 compositions (`tests/test_matrix.py` checks the joined configs against composed ones)."""
    import copy

    from omegaconf import open_dict

    cfg = copy.deepcopy(_composed(Cell(cell.task, SLICE_COMPRESSION, SLICE_PEFT)))
    with open_dict(cfg):
        if cell.compression != SLICE_COMPRESSION:
            cfg.compression = copy.deepcopy(_composed(Cell(FULL_TASK, cell.compression, SLICE_PEFT)).compression)
        if cell.peft != SLICE_PEFT:
            cfg.peft = copy.deepcopy(_composed(Cell(FULL_TASK, SLICE_COMPRESSION, cell.peft)).peft)
    return cfg


def planned(cell: Cell) -> tuple[Any, Optional[str], Optional[str]]:
    """(config, refusal with both exports, refusal with the adapter export only), composing the cell once."""
    from omegaconf import open_dict

    if cell in _PLANNED:
        return _PLANNED[cell]
    cfg = cell_config(cell)
    found: list[Optional[str]] = []
    for merged in (True, False):
        with open_dict(cfg):
            cfg.export.merged = merged
        try:
            methods = plan(cfg).methods
        except UserError as err:
            found.append(str(err))
        else:
            try:
                for method in methods:
                    method.check_model(_task_model(cell.task, cfg))  # what the task's model cannot take (a decoder)
                found.append(None)
            except UserError as err:
                found.append(f"{err} (at model set-up)")
        if found[0] is None:
            with open_dict(cfg):
                cfg.export.merged = True
            found.append(None)
            break
    _PLANNED[cell] = (cfg, found[0], found[1])
    return _PLANNED[cell]


_TASK_MODELS: dict[str, Any] = {}


def _task_model(task: str, cfg) -> Any:
    """The task's tiny model as a run loads it (built once per task; `check_model` only reads it)."""
    if task not in _TASK_MODELS:
        from omegaconf import OmegaConf

        plain = OmegaConf.to_container(cfg, resolve=True)
        model_cfg, data_cfg = to_settings(ModelConfig, plain["model"], "model"), to_settings(DataConfig, plain["data"], "data")
        raw = load_data(data_cfg)
        _TASK_MODELS[task] = load_model(model_cfg, get_task(raw.task, raw.labels), load_tokenizer(model_cfg))[0]
    return _TASK_MODELS[task]


def refusals(cell: Cell) -> tuple[Optional[str], Optional[str]]:
    """(refusal with both exports, refusal with the adapter export only)."""
    return planned(cell)[1:]


@dataclass
class Outcome:
    cell: Cell
    # passed (both exports) | passed (adapter export) | refused | failed
    status: str
    detail: str = ""
    # The merged export's refusal, when the cell ran with the adapter export only.
    merged_refusal: Optional[str] = None
    checks: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        extra = f" [merged export refused: {self.merged_refusal}]" if self.merged_refusal else ""
        return f"{self.status:<24} {self.cell.name}  {self.detail}{extra}".rstrip()


class _Capture:
    """Records what a cell's invariants need from inside the run: the frozen weights when fit starts and
    ends, and the trained model at export time (for an independent check of the merged export)."""

    def __init__(self):
        self.ctx = None
        self.frozen_changed: list[str] = []
        self.frozen_count: Optional[int] = None  # set when fit starts

    @contextlib.contextmanager
    def installed(self):
        import pytorch_lightning as pl
        import torch

        capture = self

        class FrozenWeights(pl.Callback):
            def on_fit_start(self, trainer, pl_module):
                self.before = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()
                               if not p.requires_grad}
                capture.frozen_count = len(self.before)

            def on_fit_end(self, trainer, pl_module):
                now = dict(pl_module.model.named_parameters())
                capture.frozen_changed = [n for n, v in self.before.items()
                                          if n not in now or not torch.equal(now[n].detach(), v)]

        original_trainer, original_export = run_module.build_trainer, run_module.export

        def build_trainer(settings, loggers, callbacks, run_dir):
            return original_trainer(settings, loggers, [*callbacks, FrozenWeights()], run_dir)

        def export(ctx, strategy, trainer):
            capture.ctx = ctx
            return original_export(ctx, strategy, trainer)

        run_module.build_trainer, run_module.export = build_trainer, export
        try:
            yield self
        finally:
            run_module.build_trainer, run_module.export = original_trainer, original_export


def run_cell(cell: Cell, workdir: Path, reference_totals: Optional[dict] = None) -> Outcome:
    """Plan the cell with both exports (else with the adapter export only), run it, check its invariants."""
    try:
        cfg, merged_refusal, first = planned(cell)
    except Exception as err:  # noqa: BLE001 - a config that does not compose is the cell's result
        line = str(err).splitlines()[0] if str(err) else ""
        return Outcome(cell, "failed", f"does not compose: {type(err).__name__}: {line}")
    merged = merged_refusal is None
    if first is not None:
        return Outcome(cell, "refused", first)
    run_dir = workdir / cell.name.replace("/", "__")
    run_dir.mkdir(parents=True, exist_ok=True)
    capture = _Capture()
    try:
        with capture.installed():
            metrics = run_module.run(cfg, run_dir)
    except UserError as err:
        if capture.frozen_count is None and not (run_dir / "metrics.json").exists():
            # Refused while the model was set up, before training: a property of the model's architecture
            # (Llama has no biases for BitFit), which plan() cannot see without loading the model.
            return Outcome(cell, "refused", f"{err} (at model set-up)", merged_refusal)
        # Refused once training had started: plan() should have said so before anything ran.
        return Outcome(cell, "failed", f"refused after plan(): {err}", merged_refusal)
    except Exception as err:  # noqa: BLE001 - a cell's crash is its result
        line = str(err).splitlines()[0] if str(err) else ""
        return Outcome(cell, "failed", f"{type(err).__name__}: {line}", merged_refusal)
    problems, checks = check_cell(cell, run_dir, metrics, capture, merged, reference_totals)
    status = "passed (both exports)" if merged else "passed (adapter export)"
    return Outcome(cell, "failed" if problems else status, "; ".join(problems), merged_refusal, checks)


# Largest |logit difference| between the trained model and its merged export, relative to the logit scale.
LOGIT_TOLERANCE = 1e-4


def check_cell(cell: Cell, run_dir: Path, metrics: dict, capture: _Capture, merged: bool,
               reference_totals: Optional[dict]) -> tuple[list[str], dict]:
    """The invariants of a passing cell; returns (what is violated, what was measured)."""
    import torch
    from safetensors.torch import load_file

    problems: list[str] = []
    checks: dict[str, Any] = {}
    # 1. metrics.json exists, is complete, and holds the task metric.
    path = run_dir / "metrics.json"
    on_disk = json.loads(path.read_text()) if path.exists() else {}
    primary = TASK_REGISTRY.get(cell.task).cls.primary_metric
    for key in (f"val/{primary}", f"test/{primary}"):
        if key not in on_disk:
            problems.append(f"metrics.json lacks {key}")
    if "failed_stage" in on_disk:
        problems.append(f"metrics.json names a failed stage {on_disk['failed_stage']!r}")
    # 2. Frozen weights are bit-identical before and after training.
    checks["frozen_tensors"] = capture.frozen_count
    if capture.frozen_changed:
        problems.append(f"{len(capture.frozen_changed)} frozen tensors changed in training, e.g. "
                        f"{capture.frozen_changed[0]}")
    # 3. Parameter counts include quantised weights: a quantised model has as many weights as the float one.
    if reference_totals is not None and ctx_quantized(capture.ctx):
        expected = reference_totals.get((cell.task, cell.peft))
        if expected is not None and metrics.get("params/total") != expected:
            problems.append(f"params/total={metrics.get('params/total')} after quantisation, {expected} without")
    if merged:
        merged_dir = run_dir / "merged"
        state = load_file(str(merged_dir / "model.safetensors"))
        # 4. Sparsity after merging equals the zeros counted in the reloaded export.
        per_layer = metrics.get("sparsity_per_layer_after_merge") or {}
        for name, fraction in per_layer.items():
            weight = state.get(f"{name}.weight")
            if weight is None:
                problems.append(f"merged export has no {name}.weight")
                break
            counted = float((weight == 0).sum()) / weight.numel()
            if abs(counted - fraction) > 1e-9:
                problems.append(f"{name}: sparsity/after_merge says {fraction:.4f}, the export has {counted:.4f}")
                break
        checks["layers_checked_for_sparsity"] = len(per_layer)
        # 5. The merged export, reloaded with plain from_pretrained, predicts what the trained model predicts.
        gap, scale = merged_gap(capture.ctx, merged_dir)
        checks["merged_max_logit_gap"] = gap
        if not gap <= LOGIT_TOLERANCE * (1 + scale):
            problems.append(f"merged export's logits differ from the trained model's by {gap:.3g} "
                            f"(logit scale {scale:.3g})")
    # 6. Masks: every pruned layer of the trained model holds zeros where its mask says so.
    if capture.ctx is not None:
        for name, module in capture.ctx.model.named_modules():
            mask = getattr(module, MASK, None)
            weight = getattr(module, "weight", None)
            if isinstance(mask, torch.Tensor) and type(weight) in (torch.Tensor, torch.nn.Parameter) \
                    and weight.shape == mask.shape:
                if bool((weight.detach()[~mask] != 0).any()):
                    problems.append(f"{name}: pruned weights are non-zero after training")
                    break
    return problems, checks


def ctx_quantized(ctx) -> bool:
    return ctx is not None and is_quantized(ctx.model)


def merged_gap(ctx, merged_dir: Path) -> tuple[float, float]:
    """Independent of the run's own check: reload the merged folder with the task's Auto class (no llmk_lab
    code in the way), refuse missing or unexpected keys, compare logits on one validation batch."""
    import torch

    reloaded, info = ctx.task.auto_class.from_pretrained(merged_dir, dtype=torch.float32, output_loading_info=True)
    bad = [k for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)]
    if bad:
        return float("inf"), 0.0
    batch = next(iter(ctx.datamodule.val_dataloader()))
    with torch.no_grad():
        ctx.model.eval()
        trained = ctx.task.logits(ctx.model.cpu()(**batch)).float()
        exported = ctx.task.logits(reloaded.eval()(**batch)).float()
    return float((trained - exported).abs().max()), float(trained.abs().max())


class _ReferenceTotals(dict):
    """params/total of each (task, PEFT strategy) without compression, which a quantised cell's count must
    equal; a reference that is not among the cells being run (a subset of the matrix) is run when asked for."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def record(self, outcome: Outcome, root: Path) -> None:
        cell = outcome.cell
        if cell.compression == "none" and outcome.status.startswith("passed"):
            metrics = json.loads((root / cell.name.replace("/", "__") / "metrics.json").read_text())
            self[(cell.task, cell.peft)] = metrics.get("params/total")

    def get(self, key, default=None):
        if key not in self:
            self[key] = None  # asked once: a reference that fails gives no figure to compare with
            self.record(run_cell(Cell(key[0], "none", key[1]), self.root), self.root)
        return super().get(key, default)


def run_matrix(tasks: Optional[list[str]] = None, workdir: Optional[Path] = None, echo=None,
               selection: Optional[list[Cell]] = None) -> list[Outcome]:
    """Every cell of `tasks` (or the cells in `selection`), in order; the compression=none cells run first so
    quantised cells have their reference."""
    import logging

    for name in ("pytorch_lightning", "lightning_fabric", "llmk_lab", "transformers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    chosen = selection if selection is not None else cells(tasks)
    order = sorted(chosen, key=lambda c: (list(TASKS).index(c.task), c.compression != "none"))
    outcomes = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(hydra_session())
        root = Path(workdir) if workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        totals = _ReferenceTotals(root / "references")
        for cell in order:
            outcome = run_cell(cell, root, totals)
            totals.record(outcome, root)
            outcomes.append(outcome)
            if echo:
                echo(outcome.line())
    return outcomes


# --- The README table: from plan() alone ----------------------------------------------------------------------

def markdown(task: str = FULL_TASK) -> str:
    """compression x PEFT for `task`: `yes` (adapter and merged exports), `adapter (n)` (the merged export is
    refused, note n says why), or `no (n)`; the notes follow the table."""
    compressions, pefts = registered()
    reasons: list[str] = []
    rows = []

    def note(why: str) -> str:
        # One note per reason, whichever row and column it was refused for.
        generic = why.replace(f"compression.method={c!r}", "compression.method=(row)").replace(
            f"peft.method={p!r}", "peft.method=(column)")
        if generic not in reasons:
            reasons.append(generic)
        return str(reasons.index(generic) + 1)

    with hydra_session():
        for c in compressions:
            row = []
            for p in pefts:
                merged_why, why = refusals(Cell(task, c, p))
                row.append("yes" if merged_why is None else f"adapter ({note(merged_why)})" if why is None
                           else f"no ({note(why)})")
            rows.append(f"| `{c}` | " + " | ".join(row) + " |")
    header = "| compression \\ peft | " + " | ".join(f"`{p}`" for p in pefts) + " |"
    rule = "|---|" + "---|" * len(pefts)
    notes = [f"{i}. {r}" for i, r in enumerate(reasons, 1)]
    return "\n".join([header, rule, *rows, "", *notes]).rstrip() + "\n"


README_BEGIN = "<!-- composition matrix: generated by `python -m llmk_lab.matrix --markdown`; do not edit -->"
README_END = "<!-- end of composition matrix -->"


def readme_section(readme_text: str) -> str:
    start, end = readme_text.index(README_BEGIN) + len(README_BEGIN), readme_text.index(README_END)
    return readme_text[start:end].strip("\n") + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmk_lab.matrix", description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the README's compression x PEFT table")
    parser.add_argument("--write-readme", type=Path, help="replace the table in this README")
    parser.add_argument("--run", action="store_true", help="run every cell and print its outcome")
    parser.add_argument("--task", action="append", choices=list(TASKS), help="only this task (repeatable)")
    parser.add_argument("--quick", action="store_true", help="with --run: only the quick tier's cells")
    args = parser.parse_args(argv)
    if args.write_readme:
        table = markdown()  # first: it takes a while, and the README may change meanwhile
        text = args.write_readme.read_text()
        start, end = text.index(README_BEGIN) + len(README_BEGIN), text.index(README_END)
        args.write_readme.write_text(text[:start] + "\n" + table + text[end:])
    if args.markdown:
        sys.stdout.write(markdown())
    if args.run:
        with hydra_session():
            selection = quick_cells(args.task) if args.quick else None
            outcomes = run_matrix(args.task, echo=print, selection=selection)
        failed = [o for o in outcomes if o.status == "failed"]
        print(f"{len(outcomes)} cells: {len(outcomes) - len(failed)} passed or refused, {len(failed)} failed")
        return 1 if failed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
