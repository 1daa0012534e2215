"""The command line: bad input gets one line and a non-zero exit, and leaves no run directory."""
import pytest

from tests.conftest import run_cli

BAD_INPUT = [
    (["compression.sparsity=1.5"], "compression.sparsity=1.5"),
    (["peft.r=0"], "peft.r=0"),
    (["train.lr=-0.001"], "train.lr=-0.001"),
    (["model.name_or_path=/no/such/model"], "model.name_or_path='/no/such/model'"),
]


def _outputs(tmp_path):
    root = tmp_path / "outputs"
    return [p for p in root.rglob("*") if p.is_dir() and (p / ".hydra").exists()] if root.exists() else []


@pytest.mark.parametrize("args, key", BAD_INPUT[:2])
def test_bad_value_gives_one_line_and_exit_2(tmp_path, args, key):
    result = run_cli(["logger=csv", *args], cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and key in lines[0] and "allowed" in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert _outputs(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("args, key", BAD_INPUT[2:])
def test_more_bad_values(tmp_path, args, key):
    result = run_cli(["logger=csv", *args], cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and key in lines[0], result.stderr[-2000:]
    assert _outputs(tmp_path) == []


def test_unknown_group_option_exits_non_zero_naming_the_choices(tmp_path):
    result = run_cli(["peft=lorra"], cwd=tmp_path)
    assert result.returncode != 0
    assert "lorra" in result.stderr and "lora" in result.stderr
    assert _outputs(tmp_path) == []


def test_tiny_run_from_the_command_line(tmp_path):
    """A saved checkpoint without a task head (a tiny BERT), output to a pipe: one run directory, and the console
    says each thing once in plain text (tests/test_console.py does the same with MiniLM and W&B)."""
    from transformers import BertConfig, BertModel

    from tests.test_console import ANSI

    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(tmp_path / "base")
    result = run_cli(["model=tiny_bert", f"model.name_or_path={tmp_path / 'base'}", "model.from_config=null",
                      "logger=csv", "data.limit_train=32", "data.limit_eval=16"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = _outputs(tmp_path)
    assert len(runs) == 1 and (runs[0] / "metrics.json").exists()
    out = result.stdout + result.stderr
    assert not ANSI.search(out), ANSI.findall(out)[:5]
    for chatter in ("LOAD REPORT", "Loading weights", "weights_only", "v_num", "Epoch 0/0", "litlogger"):
        assert chatter not in out, chatter
    assert out.count("newly initialised") == 1  # our one line about the new classifier head
    assert "Epoch 1/1 done" in out and "test/acc" in out
