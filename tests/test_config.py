"""The config composes, every experiment composes, and schema errors name the key."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf.errors import OmegaConfBaseException

from llmk_lab.errors import UserError
from llmk_lab.plan import plan
from tests.conftest import ROOT, compose_config

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


def test_default_composes_to_the_embedded_default():
    cfg = compose_config()
    assert cfg.model.name_or_path == "asset:minilm-l6"
    assert cfg.data.name == "movie_reviews"
    assert cfg.peft.method == "lora" and cfg.compression.method == "magnitude"
    assert cfg.hardware.accelerator == "cpu"
    p = plan(cfg)
    assert p.strategy.registered_name == "lora"
    assert [m.registered_name for m in p.methods] == ["magnitude"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_validates(name):
    cfg = compose_config([f"+experiment={name}"])
    plan(cfg)


def test_experiment_files_start_with_their_command():
    for name in EXPERIMENTS:
        # Hydra needs the package line first; the launch command comes right after it.
        package, command = (ROOT / "conf" / "experiment" / f"{name}.yaml").read_text().splitlines()[:2]
        assert package == "# @package _global_", name
        assert command.startswith("# python -m llmk_lab") and f"+experiment={name}" in command, name


@pytest.mark.parametrize("override, key", [
    ("compression.sparsty=0.5", "sparsty"),
    ("peft.rank=4", "rank"),
    ("train.epochs=2", "epochs"),
    ("peft.r=four", "peft.r"),
])
def test_misspelt_key_or_wrong_type_fails_at_compose_time(override, key):
    with pytest.raises((ConfigCompositionException, HydraException, OmegaConfBaseException)) as err:
        compose_config([override])
    assert key in str(err.value) or key in str(err.value.__cause__)


def test_unknown_group_option_names_the_choices():
    with pytest.raises((ConfigCompositionException, HydraException)) as err:
        compose_config(["peft=lorra"])
    assert "lorra" in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("compression.sparsity=1.5", "compression.sparsity=1.5"),
    ("compression.sparsity=-0.1", "compression.sparsity=-0.1"),
    ("peft.r=0", "peft.r=0"),
    ("train.lr=-0.001", "train.lr=-0.001"),
    ("data.max_length=2", "data.max_length=2"),
    ("logger.kind=tensorboardx", "logger.kind='tensorboardx'"),
    ("compression.scope=row", "compression.scope='row'"),
])
def test_out_of_range_values_fail_with_the_key_and_what_is_allowed(override, message):
    with pytest.raises(UserError) as err:
        plan(compose_config([override]))
    text = str(err.value)
    assert message in text and "allowed" in text and "\n" not in text


def test_chain_steps_are_validated_with_their_index():
    cfg = compose_config(["compression=chain", "+compression.steps=[{method: magnitude, sparsity: 2.0}]"])
    with pytest.raises(UserError, match=r"compression.steps\[0\].sparsity=2.0"):
        plan(cfg)
    cfg = compose_config(["compression=chain", "+compression.steps=[{method: magnitud}]"])
    with pytest.raises(UserError, match=r"compression.steps\[0\].method='magnitud'"):
        plan(cfg)


# An experiment that starts from another run's output points at the embedded model instead.
STANDALONE = {"mlm_then_classify": ["model.name_or_path=asset:minilm-l6"],
              # the smoke test of the loop, not of its cost: few calibration windows and lm-eval documents, and
              # short windows (a training step on 4 x 512 tokens of a 49k vocabulary holds ~6 GB on CPU)
              "smollm2_recovery": ["compression.calibration_examples=4", "eval.lm_eval.limit=4",
                                   "data.max_length=128", "train.batch_size=2"]}


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_runs_with_fast_dev_run(tmp_path, name):
    from tests.conftest import run_config

    metrics = run_config([f"+experiment={name}", "train.fast_dev_run=true", "logger=csv", "export.checkpoint=false",
                          "data.limit_train=32", "data.limit_eval=4", *STANDALONE.get(name, [])], tmp_path)
    assert (tmp_path / "metrics.json").exists()
    assert any(key.startswith("test/") for key in metrics)


def test_every_group_option_passes_the_light_value_check_with_its_defaults():
    """The light check runs each schema's `__post_init__` without its module (before torch is imported):
    a check that reads a module global would refuse every run of that option."""
    from llmk_lab.cli import config_dir
    from llmk_lab.light_schemas import check_values_lightly

    conf = Path(config_dir())
    for group in ("peft", "compression"):
        for option in sorted(p.stem for p in (conf / group).glob("*.yaml")):
            check_values_lightly(compose_config([f"{group}={option}"]))


def test_light_value_check_refuses_a_bad_adapter_activation_in_one_line():
    from llmk_lab.errors import UserError
    from llmk_lab.light_schemas import check_values_lightly

    with pytest.raises(UserError, match="activation.*swish.*gelu"):
        check_values_lightly(compose_config(["peft=adapter", "peft.activation=swish"]))
