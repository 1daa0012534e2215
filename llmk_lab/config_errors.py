"""Config mistakes as one line, and `--help` from the config files themselves.

Hydra reports a misspelt group option, a misspelt key or a value of the wrong
type in many lines of its own (listing the internal `schema_*` entries, or
suggesting `+key=value`, which then fails validation). Here each of those
becomes what a bad value already gets from `llmk_lab.errors`: one line on
stderr naming the key, what is allowed and the closest valid name, exit code 2.
`HYDRA_FULL_ERROR=1` keeps Hydra's own report with its traceback.

Only light imports here: this runs on the error path, before any model code.
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import re
import sys
import typing
from pathlib import Path
from typing import Any, Optional

from llmk_lab.paths import config_dir

HELP_FLAGS = {"--help", "-h"}
# Groups picked with `+group=option` because conf/config.yaml has no default for them.
ADDED_GROUPS = ("experiment", "hparams_search", "launcher")
EXIT_CODE = 2


def _config_dir() -> Path:
    return Path(config_dir())


def group_options(conf: Path, group: str) -> list[str]:
    """The options a user can pick for a group: its YAML files (not the `schema_*` ConfigStore entries)."""
    folder = conf / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def describe_option(path: Path) -> str:
    """First comment line of an option's YAML that says what it is (not `@package`, not the launch command)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text.startswith("#"):
            if text:  # past the header comments
                break
            continue
        text = text.lstrip("#").strip()
        if not text or text.startswith(("@package", "python ", "python3 ")):
            continue
        return text
    return ""


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return close[0] if close else ""


def _choices_text(choices: list[str]) -> str:
    return "[" + ", ".join(choices) + "]"


# ----------------------------------------------------------------------------- one-line messages

def missing_option_line(missing: str, conf: Path) -> str:
    """`peft=lorra`: Hydra could not find `peft/lorra`."""
    group, _, option = missing.rpartition("/")
    if not group:
        groups = sorted(p.name for p in conf.iterdir() if p.is_dir())
        return f"config {missing!r} does not exist: the config groups are {_choices_text(groups)}"
    key = group.replace("/", ".")
    choices = group_options(conf, group)
    if not choices:
        groups = sorted(p.name for p in conf.iterdir() if p.is_dir())
        guess = _did_you_mean(group, groups)
        hint = f"; did you mean {guess}={option}?" if guess else ""
        return f"{key}={option!r}: there is no config group {key!r} (groups: {_choices_text(groups)}){hint}"
    guess = _did_you_mean(option, choices)
    hint = f"; did you mean {key}={guess}?" if guess else ""
    return f"{key}={option!r} is not allowed: one of {_choices_text(choices)}{hint}"


def _schema_keys(node_type: Any, parent: Any) -> Optional[list[str]]:
    if dataclasses.is_dataclass(node_type):
        return [f.name for f in dataclasses.fields(node_type)]
    if parent is not None and hasattr(parent, "keys"):
        try:
            return [str(k) for k in parent.keys()]
        except Exception:  # a node that cannot list its keys: no suggestion
            return None
    return None


def closest_key_hint(full_key: str, keys: list[str]) -> str:
    """`no such key in train (keys: [...]); did you mean train.lr?` for a key the schema lacks."""
    parent_key, _, key = full_key.rpartition(".")
    guess = _did_you_mean(key, keys)
    hint = f"; did you mean {parent_key + '.' if parent_key else ''}{guess}?" if guess else ""
    return f"no such key in {parent_key or 'the top level'} (keys: {_choices_text(keys)}){hint}"


def unknown_key_line(cause: Any) -> str:
    """`train.lrr=0.1`: the key is not in the node's schema."""
    full_key = str(cause.full_key)
    parent_key, _, key = full_key.rpartition(".")
    if cause.object_type in (dict, None) or cause.object_type is typing.Any:
        # A free-form mapping (data.options, ...): adding keys is what `+` is for.
        return (f"{full_key}: {parent_key or 'the config'} has no key {key!r}; "
                f"{parent_key} takes any key: add one with +{full_key}=VALUE")
    keys = _schema_keys(cause.object_type, getattr(cause, "parent_node", None)) or []
    return f"{full_key}: {closest_key_hint(full_key, keys)}"


def _type_text(annotation: Any) -> str:
    """What a value of this annotation looks like, in words."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        kinds = [_type_text(a) for a in args if a is not type(None)]
        nullable = type(None) in args
        return " or ".join(kinds) + (" or null" if nullable else "")
    if origin is typing.Literal:
        return f"one of {list(args)}"
    if origin in (list, tuple) or annotation in (list, tuple):
        return "a list, e.g. [a,b]"
    if origin is dict or annotation is dict:
        return "a mapping, e.g. {a: 1}"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if annotation in names:
        return names[annotation]
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return f"one of {[m.name for m in annotation]}"
    return "a value of type " + getattr(annotation, "__name__", str(annotation))


def wrong_type_line(cause: Any) -> str:
    """`train.lr=abc`: the value cannot be converted to the schema's type."""
    full_key = str(cause.full_key)
    key = full_key.rpartition(".")[2]
    allowed = ""
    if dataclasses.is_dataclass(cause.object_type):
        try:
            hints = typing.get_type_hints(cause.object_type)
        except Exception:  # unresolvable annotation: fall back to OmegaConf's wording below
            hints = {}
        if key in hints:
            allowed = _type_text(hints[key])
    if not allowed:
        allowed = str(cause.msg).splitlines()[0]
    return f"{full_key}={cause.value!r} is not allowed: {allowed}"


def config_error_line(err: BaseException, conf: Optional[Path] = None) -> Optional[str]:
    """One line for a config mistake Hydra or OmegaConf raised while composing; None for anything else."""
    from hydra.errors import CompactHydraException, MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    conf = conf or _config_dir()
    if isinstance(err, MissingConfigException) and getattr(err, "missing_cfg_file", None):
        return missing_option_line(str(err.missing_cfg_file), conf)
    cause = err.__cause__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and getattr(cause, "full_key", None):
        return unknown_key_line(cause)
    if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
        return wrong_type_line(cause)
    first = str(err).splitlines()[0] if str(err) else ""
    null_node = re.search(r"full_key: (\S+)", str(err)) if isinstance(err, AttributeError) else None
    if null_node and "'NoneType' object has no attribute" in first:
        return mapping_into_null_line(null_node.group(1), conf)
    if first.startswith("Ambiguous value for argument"):
        argument = first.removeprefix("Ambiguous value for argument").strip().strip("'")
        return (f"{argument}: comma-separated values are a sweep: add -m to run one job per value "
                "(a list is written key=[a,b]; a string with commas is quoted: key='a,b')")
    if isinstance(err, CompactHydraException):
        # Other composition errors (override syntax, a sweep without -m): Hydra's own words, on one line.
        parts = [line.strip() for line in str(err).splitlines() if line.strip()]
        return " ".join(parts)
    return None


def mapping_into_null_line(full_key: str, conf: Path) -> str:
    """`model.from_config={...}` where the chosen option has `from_config: null`: Hydra merges a mapping into the
    node and cannot merge into null. Name the options where the node is a mapping, whose keys can be set."""
    import yaml

    group, _, rest = full_key.partition(".")
    options = []
    for option in group_options(conf, group):
        node = yaml.safe_load((conf / group / f"{option}.yaml").read_text(encoding="utf-8")) or {}
        for part in rest.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            options.append(f"{group}={option}")
    where = f"one of {options}" if options else "a config where it is one"
    return (f"{full_key}: a mapping cannot be merged into this config's null {full_key}; start from {where} and set "
            f"its keys (e.g. {options[0] if options else group + '=...'} {full_key}.KEY=VALUE)")


def install() -> None:
    """Route Hydra's error report for config mistakes through `config_error_line` (exit code 2).

    Hydra prints whatever its entry point raises in `run_and_report`; wrapping it
    is the one place where composition errors of single runs and sweeps pass.
    """
    from hydra._internal import utils as hydra_utils

    original = hydra_utils.run_and_report
    if getattr(original, "_llmk_lab", False):
        return
    started = _now()

    def run_and_report(func):
        try:
            return func()
        except Exception as err:  # noqa: BLE001  (re-raised below unless it is a config mistake)
            line = None if os.environ.get("HYDRA_FULL_ERROR") else config_error_line(err)
            if line is None:
                error = err  # `err` is unbound once the except block ends; the closure keeps its own name

                def again():
                    raise error
                return original(again)
            _remove_empty_output_folders(Path("outputs"), started)
            print(f"error: {line}", file=sys.stderr)
            sys.exit(EXIT_CODE)

    run_and_report._llmk_lab = True  # type: ignore[attr-defined]
    hydra_utils.run_and_report = run_and_report


def _now() -> float:
    import time

    return time.time()


# What a sweep writes into its folder before composing its first job.
SWEEP_PREAMBLE = {"multirun.yaml", "sweep.json"}


def _remove_empty_output_folders(root: Path, since: float) -> None:
    """A sweep creates its folder before composing its jobs: leave no folder behind a refused command."""
    if not root.is_dir():
        return
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            if folder.stat().st_mtime < since - 1:
                continue
            entries = list(folder.iterdir())
            if entries and all(e.name in SWEEP_PREAMBLE and e.is_file() for e in entries):
                for entry in entries:  # a sweep folder with no job in it
                    entry.unlink()
            folder.rmdir()  # only empty folders go; anything with content stays
        except OSError:
            pass


def producer_hint(line: str, conf: Optional[Path] = None) -> str:
    """For an error about a path that does not exist: which experiment writes it (its `hydra.run.dir`
    holds it), as `; ... run that first`; empty when none does."""
    import re

    import yaml

    if "no such" not in line:
        return ""
    conf = conf or _config_dir()
    paths = [Path(p) for p in re.findall(r"'([^']+)'", line)]
    for yaml_file in sorted((conf / "experiment").glob("*.yaml")):
        try:
            run_dir = ((yaml.safe_load(yaml_file.read_text(encoding="utf-8")) or {}).get("hydra") or {}) \
                .get("run", {}).get("dir")
        except yaml.YAMLError:
            continue
        if not run_dir or "${" in str(run_dir):
            continue
        for path in paths:
            if path == Path(run_dir) or Path(run_dir) in path.parents:
                return (f"; {path} is written by `python -m llmk_lab +experiment={yaml_file.stem}`: run that first")
    return ""


# ----------------------------------------------------------------------------- --help

def _defaults(conf: Path) -> dict[str, str]:
    import yaml

    data = yaml.safe_load((conf / "config.yaml").read_text(encoding="utf-8")) or {}
    chosen = {}
    for entry in data.get("defaults", []):
        if isinstance(entry, dict):
            chosen.update({str(k): str(v) for k, v in entry.items()})
    return chosen


def help_text(conf: Optional[Path] = None) -> str:
    conf = conf or _config_dir()
    defaults = _defaults(conf)
    lines = [
        "usage: python -m llmk_lab [GROUP=OPTION ...] [KEY=VALUE ...] [+experiment=NAME] [-m]",
        "",
        "One run: a model, data (the task follows it), a PEFT strategy, a compression method and a",
        "hardware setting, composed from conf/. Every run writes outputs/<date>/<time>/ (config, manifest,",
        "metrics.json, checkpoint, adapter). -m runs a sweep: one job per combination of comma-separated values.",
        "",
        "Config groups (GROUP=OPTION; * marks the default):",
    ]
    groups = sorted(p.name for p in conf.iterdir() if p.is_dir())
    order = [g for g in defaults if g in groups] + [g for g in groups if g not in defaults]
    for group in order:
        options = group_options(conf, group)
        if not options:
            continue
        prefix = "+" if group not in defaults else ""
        lines.append(f"  {prefix}{group}=")
        width = max(len(o) for o in options) + 1
        for option in options:
            mark = "*" if defaults.get(group) == option else " "
            lines.append(f"    {option + mark:<{width}}  {describe_option(conf / group / f'{option}.yaml')}")
    lines += [
        "",
        "Keys (KEY=VALUE): model.*, data.*, train.*, hardware.*, logger.*, export.*, measure.*, sweep.*, seed,",
        "and the chosen method's keys under peft.* and compression.*; each is documented in its schema",
        "(llmk_lab/config.py and next to each method).",
        "  python -m llmk_lab --cfg job [OVERRIDES]   print the composed config (every key and its value)",
        "  python -m llmk_lab --hydra-help            Hydra's own options (--multirun, --cfg, --info, ...)",
        "Use a finished run: python -m llmk_lab.predict RUN_DIR \"text\"; python -m llmk_lab.export RUN_DIR;",
        "python -m llmk_lab.compare RUN_A RUN_B.",
    ]
    return "\n".join(lines)
