"""Hardware and memory: causal-LM evaluation without whole-batch logits, precision, threads, DDP on CPU."""
from __future__ import annotations

import math
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llmk_lab.tasks import causal_lm
from llmk_lab.tasks.causal_lm import ChunkedLMOutput, CausalLM


def tiny_llama(vocab: int = 97) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def lm_batch(vocab: int = 97, rows: int = 3, length: int = 20) -> dict:
    ids = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :5] = -100  # unscored positions must stay unscored
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def perplexity_of(task: CausalLM, model, batch: dict) -> float:
    metrics = task.metrics()
    with torch.no_grad():
        task.update_metrics(metrics, batch, task.eval_outputs(model, batch))
    return task.compute_metrics(metrics)["perplexity"]


@pytest.mark.parametrize("peft_kind", ["none", "lora", "prompt"])
def test_chunked_causal_lm_eval_matches_full_logits_and_never_holds_the_batch_logits(monkeypatch, peft_kind):
    model = tiny_llama()
    if peft_kind != "none":
        from peft import LoraConfig, PromptTuningConfig, get_peft_model

        config = (LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM") if peft_kind == "lora"
                  else PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
        model = get_peft_model(model, config).eval()
    batch, task = lm_batch(), CausalLM()
    with torch.no_grad():
        full = model(**batch)
    reference = task.metrics()
    reference["perplexity"].update(full.logits[:, -batch["labels"].shape[1]:], batch["labels"])
    expected = float(reference["perplexity"].compute())

    head = model.get_output_embeddings()
    monkeypatch.setattr(causal_lm, "EVAL_LOGITS_BYTES", 7 * 4 * head.weight.shape[0])  # 7 positions a call
    widest: list[int] = []
    # Real logits only (the placeholder the capture returns is 1 wide).
    handle = head.register_forward_hook(
        lambda module, args, out: widest.append(out.shape[:-1].numel()) if out.shape[-1] > 1 else None)
    try:
        with torch.no_grad():
            outputs = task.eval_outputs(model, batch)
        got = perplexity_of(task, model, batch)
    finally:
        handle.remove()
    assert isinstance(outputs, ChunkedLMOutput)
    assert got == pytest.approx(expected, rel=1e-5)
    # 3 rows x 19 predicted positions, 4 of them unscored (labels 1-4 of row 0): 53 tokens, 7 at a time.
    assert int(outputs.tokens) == 53 and max(widest) <= 7
    assert float(outputs.loss) == pytest.approx(math.log(expected), rel=1e-5)
    # The output layer is itself again afterwards: a normal forward still gives full logits.
    with torch.no_grad():
        assert model(**batch).logits.shape[-1] == 97


# ------------------------------------------------------------------ start-up: schemas without heavy imports

HEAVY = ("torch", "transformers", "peft", "pytorch_lightning", "lightning_fabric", "torchmetrics", "torchao")


def test_composing_imports_no_heavy_library_and_stores_every_schema():
    import subprocess
    import sys

    code = ("import sys, llmk_lab, llmk_lab.cli; from llmk_lab import light_schemas as registry; registry.register_all();"
            "from tests.conftest import compose_config; compose_config(['compression=wanda', 'peft=adalora']);"
            f"print([m for m in {HEAVY!r} if m in sys.modules], registry.light_fallbacks)")
    # conftest imports torch itself: compose the same way it does, without it
    code = code.replace("from tests.conftest import compose_config; compose_config(",
                        "from hydra import compose, initialize_config_dir;"
                        "initialize_config_dir(config_dir=llmk_lab.cli.config_dir(), version_base='1.3').__enter__();"
                        "compose(config_name='config', overrides=")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] []", out.stdout


def _schema_signature(schema: type) -> tuple:
    import dataclasses

    from omegaconf import OmegaConf

    return (schema.__name__, schema.__module__, [(f.name, str(f.type)) for f in dataclasses.fields(schema)],
            OmegaConf.to_yaml(OmegaConf.structured(schema)))


def test_schemas_read_from_the_files_equal_the_registered_ones():
    """The light reading of each method file gives the very schema the method registers."""
    import llmk_lab
    from llmk_lab import light_schemas as registry
    from llmk_lab.compression import COMPRESSION
    from llmk_lab.peft import PEFT

    registry._light_cache.clear()
    registry._light_modules.clear()
    real = {"COMPRESSION": COMPRESSION, "PEFT": PEFT}
    for package, name, group in llmk_lab.light_schemas.SCHEMA_REGISTRIES:
        # Read the files as a fresh process would: with the real modules hidden from the reader.
        import sys

        hidden = {m: sys.modules.pop(m) for m in list(sys.modules) if m.startswith(package + ".")}
        try:
            light = registry.store_schemas_lightly(package, name, group)
            with registry._stand_ins():
                signatures = {option: _schema_signature(schema) for option, schema in light.items()}
        finally:
            sys.modules.update(hidden)
        registry_ = real[name]
        assert sorted(light) == registry_.names()
        for option in registry_.names():
            assert signatures[option] == _schema_signature(registry_.get(option).config), option
    assert registry.light_fallbacks == []


def test_bad_values_are_refused_by_the_light_check_with_the_full_key():
    from llmk_lab.errors import UserError
    from llmk_lab.light_schemas import check_values_lightly
    from tests.conftest import compose_config

    check_values_lightly(compose_config([]))
    for override, key in (("compression.sparsity=1.5", "compression.sparsity=1.5"), ("peft.r=0", "peft.r=0"),
                          ("train.lr=-1", "train.lr=-1"), ("compression=wanda", None),
                          ("compression=chain", None)):
        cfg = compose_config([override])
        if key is None:
            check_values_lightly(cfg)
            continue
        with pytest.raises(UserError, match=key.replace(".", r"\.")):
            check_values_lightly(cfg)
    cfg = compose_config(["compression=chain", "+compression.steps=[{method: dynamic_int8}, "
                          "{method: magnitude, sparsity: 2.0}]"])
    with pytest.raises(UserError, match=r"compression\.steps\[1\]\.sparsity=2\.0"):
        check_values_lightly(cfg)
    # A model directory that does not exist (one another experiment writes, say): before torch is imported.
    for override, key in (("model.name_or_path=outputs/pretrain/merged", "model.name_or_path"),
                          ("model.tokenizer=./no/tokenizer", "model.tokenizer")):
        with pytest.raises(UserError, match=re.escape(f"{key}='{override.split('=')[1]}': no such directory")):
            check_values_lightly(compose_config([override]))
    check_values_lightly(compose_config(["model=tiny_bert"]))  # asset:NAME and from_config pass


# ------------------------------------------------------------------ hardware settings

def _settings(overrides):
    from llmk_lab.plan import plan
    from tests.conftest import compose_config

    return plan(compose_config(overrides)).settings


def test_hardware_presets_compose_and_validate():
    from llmk_lab.config import HardwareConfig
    from tests.conftest import ROOT

    names = sorted(p.stem for p in (ROOT / "conf" / "hardware").glob("*.yaml"))
    assert names == ["cpu", "fsdp", "gpu", "multi_gpu", "multi_node"]
    for name in names:
        hw = _settings([f"hardware={name}"]).hardware
        assert isinstance(hw, HardwareConfig)
    assert _settings(["hardware=multi_gpu"]).hardware.strategy == "ddp"
    assert _settings(["hardware=fsdp"]).hardware.strategy == "fsdp"


@pytest.mark.parametrize("override, key", [("hardware.precision=fp8", "hardware.precision='fp8'"),
                                           ("hardware.strategy=horovod", "hardware.strategy='horovod'"),
                                           ("hardware.threads=0", "hardware.threads=0"),
                                           ("hardware.devices=0", "hardware.devices=0")])
def test_bad_hardware_values_name_the_key(override, key):
    from llmk_lab.errors import UserError

    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        _settings([override])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
@pytest.mark.parametrize("override, says", [("hardware=gpu", "no CUDA GPU is visible"),
                                            ("hardware=multi_gpu", "no CUDA GPU is visible"),
                                            ("hardware.precision=16-mixed", "needs a GPU"),
                                            ("hardware.strategy=fsdp", "needs CUDA GPUs"),
                                            ("hardware.devices=-1", "on CPU: give the number of processes")])
def test_hardware_that_is_not_there_is_one_line(override, says):
    from llmk_lab import hardware
    from llmk_lab.errors import UserError

    with pytest.raises(UserError, match=says) as err:
        hardware.check_available(_settings([override]).hardware)
    assert "\n" not in str(err.value)


def test_threads_auto_divides_the_cores_among_parallel_jobs_and_processes(monkeypatch):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from llmk_lab import hardware
    from llmk_lab.cli import config_dir

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    hw = _settings(["hardware.threads=auto"]).hardware
    assert hardware.resolve_threads(hw, cores=8)[0] == 8  # one job alone gets every core
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # an explicit limit of the environment is kept
    assert hardware.resolve_threads(hw, cores=8) == (3, hardware.resolve_threads(hw, cores=8)[1])
    assert "capped by OMP_NUM_THREADS=3" in hardware.resolve_threads(hw, cores=8)[1]
    monkeypatch.delenv("OMP_NUM_THREADS")
    ddp = _settings(["hardware.threads=auto", "hardware.strategy=ddp", "hardware.devices=2"]).hardware
    assert hardware.resolve_threads(ddp, cores=8)[0] == 4
    assert hardware.resolve_threads(_settings(["hardware.threads=3"]).hardware, cores=8) == (3, "hardware.threads")
    def as_joblib_job(n_jobs: int) -> None:  # what a job of `-m +launcher=parallel` sees
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(config_name="config", overrides=["+launcher=parallel", f"hydra.launcher.n_jobs={n_jobs}"],
                          return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)

    try:
        as_joblib_job(2)
        assert hardware.parallel_jobs(8) == (2, "joblib launcher n_jobs=2")
        threads, rule = hardware.resolve_threads(hw, cores=8)
        assert threads == 4 and "2 parallel jobs" in rule
        assert hardware.resolve_threads(ddp, cores=8)[0] == 2
        as_joblib_job(-1)  # joblib: every core, one job per core
        assert hardware.resolve_threads(hw, cores=8)[0] == 1
    finally:
        HydraConfig.instance().cfg = None


def test_fast_dev_run_of_an_evaluation_only_run_does_not_train(tmp_path):
    from llmk_lab.run import build_trainer

    settings = _settings(["train.fast_dev_run=true", "train.max_steps=0", "logger=csv"])
    trainer = build_trainer(settings, [], [], tmp_path)
    assert trainer.max_steps == 0 and not trainer.fast_dev_run
    assert trainer.limit_val_batches == 1 and trainer.limit_test_batches == 1
    trainer = build_trainer(_settings(["train.fast_dev_run=true"]), [], [], tmp_path)
    assert trainer.fast_dev_run  # a run that trains keeps Lightning's one training step


def test_bf16_mixed_runs_on_cpu_and_changes_the_numbers(tmp_path, tiny):
    from tests.conftest import run_config

    fp32 = run_config([*tiny, "compression=none"], tmp_path / "fp32")
    bf16 = run_config([*tiny, "compression=none", "hardware.precision=bf16-mixed"], tmp_path / "bf16")
    assert math.isfinite(bf16["test/loss"])
    # bf16 autocast rounds the matmuls: a precision setting that was ignored would give fp32's exact loss.
    assert bf16["test/loss"] != fp32["test/loss"]
    assert bf16["test/loss"] == pytest.approx(fp32["test/loss"], abs=0.05)
    assert bf16["train/effective_batch_size"] == 16 and bf16["train/world_size"] == 1


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients():
    from types import SimpleNamespace

    from llmk_lab import hardware

    batch = lm_batch()
    grads = []
    for checkpointing in (False, True):
        model = tiny_llama().train()
        if checkpointing:
            hardware.gradient_checkpointing_callback().setup(None, SimpleNamespace(model=model), "fit")
            assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
        model(**batch).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_replica_digest_sees_a_different_mask_and_the_check_refuses_it():
    from llmk_lab import hardware
    from llmk_lab.masks import set_mask

    a, b = tiny_llama(), tiny_llama()
    assert hardware.replica_digest(a) == hardware.replica_digest(b)
    layer_a, layer_b = a.model.layers[0].mlp.up_proj, b.model.layers[0].mlp.up_proj
    keep = torch.ones_like(layer_a.weight, dtype=torch.bool)
    set_mask(layer_a, keep)
    keep = keep.clone()
    keep[0, 0] = False
    with torch.no_grad():
        layer_b.weight[0, 0] = layer_a.weight[0, 0]  # same weights, only the mask differs
    layer_b.register_buffer("llmk_mask", keep, persistent=False)
    assert hardware.replica_digest(a) != hardware.replica_digest(b)
    hardware.check_replicas([hardware.replica_digest(a)] * 2)
    with pytest.raises(RuntimeError, match="different models"):
        hardware.check_replicas([hardware.replica_digest(a), hardware.replica_digest(b)])


def test_only_rank_zero_writes_the_run_dir(tmp_path, monkeypatch):
    from llmk_lab import hardware

    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    assert hardware.run_dir_for_rank(tmp_path) == tmp_path
    monkeypatch.setenv("LOCAL_RANK", "1")
    scratch = hardware.run_dir_for_rank(tmp_path)
    assert scratch != tmp_path and scratch.is_dir() and not scratch.is_relative_to(tmp_path)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert not hardware.is_rank_zero()
    monkeypatch.setenv("SLURM_NTASKS", "1")  # one task: SLURM_PROCID says nothing about ranks
    assert hardware.is_rank_zero()


def test_every_rank_decides_resuming_from_rank_zeros_run_dir_and_config_hash(tmp_path, monkeypatch):
    """A rank that rank zero started works in a scratch folder and runs with logger=none (another config hash):
    it must still find rank zero's checkpoint and accept it, and leave rank zero's files alone."""
    from types import SimpleNamespace

    from llmk_lab import hardware, jobs

    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "SLURM_NTASKS", hardware.CONFIG_HASH_ENV):
        monkeypatch.delenv(key, raising=False)
    settings = SimpleNamespace(sweep=SimpleNamespace(resume=True, force=False, checkpoint_every_n_steps=1,
                                                     checkpoint_every_minutes=0),
                               train=SimpleNamespace(fast_dev_run=False))
    checkpoint = jobs.resume_checkpoint_path(tmp_path)
    checkpoint.parent.mkdir(parents=True)
    torch.save({"state": 1}, checkpoint)
    checkpoint.with_suffix(".config").write_text("rank-zero-hash")
    assert jobs.checkpoint_to_resume(settings, tmp_path, "rank-zero-hash") == str(checkpoint)  # rank zero
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv(hardware.CONFIG_HASH_ENV, "rank-zero-hash")
    scratch = hardware.run_dir_for_rank(tmp_path)
    assert hardware.job_dir(scratch) == tmp_path
    assert jobs.checkpoint_to_resume(settings, scratch, "its-own-hash") == str(checkpoint)
    monkeypatch.setenv(hardware.CONFIG_HASH_ENV, "another-config")  # rank zero would not resume: nor does it
    assert jobs.checkpoint_to_resume(settings, scratch, "its-own-hash") is None
    assert checkpoint.exists() and checkpoint.with_suffix(".config").read_text() == "rank-zero-hash"


def test_ddp_outside_the_command_line_is_refused_not_relaunched(tmp_path, monkeypatch):
    """In-process (a notebook, pytest) Lightning would re-run this program's argv in each extra process."""
    from llmk_lab.errors import UserError
    from llmk_lab.run import build_trainer

    for key in ("LOCAL_RANK", "RANK", "SLURM_NTASKS", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(key, raising=False)
    settings = _settings(["hardware.strategy=ddp", "hardware.devices=2"])
    with pytest.raises(UserError, match="needs the command line"):
        build_trainer(settings, [], [], tmp_path)


def test_the_other_processes_of_a_sweep_job_run_that_job_alone():
    """Their command is one run of this job's overrides: no `-m`, no sweep values, no tracking."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from llmk_lab import hardware
    from llmk_lab.cli import config_dir

    job = ["compression.sparsity=0.5", "logger=wandb", "hardware.strategy=ddp", "hardware.devices=2"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=job, return_hydra_config=True)
    cfg.hydra.overrides.task = job  # what Hydra puts there for the job
    cfg.hydra.runtime.output_dir = "/sweeps/it's/3"
    cfg.hydra.job.config_name = "config"
    HydraConfig.instance().set_config(cfg)
    try:
        command = hardware.child_command(1)
    finally:
        HydraConfig.instance().cfg = None
    assert command[1:5] == ["-m", "llmk_lab", "--config-name", "config"] and "-m" not in command[2:]
    assert command[5:8] == job[:1] + job[2:] and "logger=wandb" not in command and "logger=none" in command
    assert "hydra.run.dir='/sweeps/it\\'s/3'" in command and "hydra.output_subdir=null" in command


# ------------------------------------------------------------------ DDP on 2 CPU processes (gloo)

# One optimiser step per epoch over all 16 training examples and no dropout: one process with batch 16
# and two with batch 8 each compute the same mean gradient, so they must end with the same model.
DDP_RUN = ["model=tiny_bert", "+model.from_config.hidden_dropout_prob=0.0",
           "+model.from_config.attention_probs_dropout_prob=0.0", "logger=csv", "data.limit_train=16",
           "data.limit_eval=32", "train.max_epochs=3", "train.lr=5e-3", "train.warmup_ratio=0",
           "export.checkpoint=false", "peft=lora", "peft.dropout=0.0", "measure.latency_batch_sizes=[]"]


def _cli_run(args: list[str], cwd, scratch, extra_env: dict | None = None) -> dict:
    import json

    from tests.conftest import run_cli

    out = run_cli([*args, "hydra.run.dir=run"], cwd, env={"TMPDIR": str(scratch), "OMP_NUM_THREADS": "1",
                                                          **(extra_env or {})})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((cwd / "run" / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("compression", ["none", "wanda"])
def test_ddp_on_two_cpu_processes_matches_one_process_with_the_same_effective_batch(tmp_path, compression):
    extra = [f"compression={compression}"] + (["compression.calibration_examples=8"] if compression == "wanda" else [])
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    (tmp_path / "scratch").mkdir()
    one = _cli_run([*DDP_RUN, *extra, "train.batch_size=16"], tmp_path / "one", tmp_path / "scratch")
    two = _cli_run([*DDP_RUN, *extra, "train.batch_size=8", "hardware.strategy=ddp", "hardware.devices=2"],
                   tmp_path / "two", tmp_path / "scratch")
    assert (one["train/world_size"], two["train/world_size"]) == (1, 2)
    assert one["train/effective_batch_size"] == two["train/effective_batch_size"] == 16
    assert one["train/steps"] == two["train/steps"] == 3
    for key in ("val/acc", "test/acc", "test/macro_f1"):
        assert two[key] == one[key], key
    for key in ("val/loss", "test/loss"):  # aggregated over both processes' halves of the split
        assert two[key] == pytest.approx(one[key], abs=1e-4), key
    if compression == "wanda":
        assert two["sparsity/pruned_layers"] == one["sparsity/pruned_layers"]
    run_dir = tmp_path / "two" / "run"
    # One run directory holding everything once; the other rank wrote only its log there.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["run"]
    assert (run_dir / "model" / "llmk_lab.json").exists() and (run_dir / "rank_1.log").exists()
    assert list((tmp_path / "scratch").glob("llmk_lab-rank*")) == []  # its scratch folder is gone
    log = (run_dir / "llmk_lab.log").read_text()
    assert "all 2 processes hold the same model" in log  # masks and adapters identical before training
    assert json_manifest(run_dir)["hardware"]["processes_per_job"] == 2


def json_manifest(run_dir):
    import json

    return json.loads((run_dir / "manifest.json").read_text())


@pytest.mark.slow
def test_a_multirun_of_ddp_jobs_runs_each_job_once(tmp_path):
    from tests.conftest import run_cli

    (tmp_path / "scratch").mkdir()
    out = run_cli(["-m", *DDP_RUN, "train.max_epochs=1", "compression=none", "hardware.strategy=ddp",
                   "hardware.devices=2", "train.batch_size=8", "seed=1,2", "hydra.sweep.dir=sweep"], tmp_path,
                  env={"TMPDIR": str(tmp_path / "scratch"), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name.isdigit())
    assert jobs == ["0", "1"]
    for job in jobs:
        metrics = (tmp_path / "sweep" / job / "metrics.json")
        assert metrics.exists() and (tmp_path / "sweep" / job / "rank_1.log").exists()
    # Lightning's own launcher re-runs the command line, `-m` included, in each extra process: that
    # process would launch the sweep again (its console is this one's).
    console = out.stdout + out.stderr
    assert console.count("Launching 2 jobs locally") == 1, console[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scratch", "sweep"]
    for job in jobs:
        assert (tmp_path / "sweep" / job / "llmk_lab.log").read_text().count("starting rank 1") == 1


@pytest.mark.slow
def test_an_interrupted_ddp_job_resumes_from_its_checkpoint_on_every_rank(tmp_path):
    """Only rank zero writes the run directory; the rank it starts must still continue from that directory's
    checkpoint (a rank that started afresh would train while rank zero evaluates, and the run would hang or fail)."""
    import json

    from tests.conftest import run_cli

    job = [*DDP_RUN, "compression=none", "train.batch_size=8", "hardware.strategy=ddp", "hardware.devices=2",
           "sweep.checkpoint_every_n_steps=1", "hydra.run.dir=run"]
    env = {"TMPDIR": str(tmp_path / "scratch"), "OMP_NUM_THREADS": "1"}
    (tmp_path / "scratch").mkdir()
    run_dir = tmp_path / "run"
    (run_dir / "metrics.json").mkdir(parents=True)  # no metrics can be written: the attempt fails after training
    first = run_cli(job, tmp_path, env=env)
    assert first.returncode != 0 and (run_dir / "checkpoints" / "resume.ckpt").exists(), first.stderr[-3000:]
    (run_dir / "metrics.json").rmdir()
    for log in ("llmk_lab.log", "rank_1.log"):
        (run_dir / log).unlink()
    second = run_cli([*job, "sweep.resume=true"], tmp_path, env=env, timeout=180)  # a rank left behind hangs
    assert second.returncode == 0, second.stderr[-3000:]
    for log in ("llmk_lab.log", "rank_1.log"):  # rank zero and the rank it started
        assert "resuming from" in (run_dir / log).read_text(), log
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert "failed_stage" not in resumed and resumed["train/steps"] == 3  # nothing trained twice
    assert resumed["train/world_size"] == 2 and 0 <= resumed["test/acc"] <= 1
    assert not (run_dir / "checkpoints" / "resume.ckpt").exists()  # the job completed


@pytest.mark.parametrize("overrides, says", [
    (["compression=gradual_magnitude", "peft=full"], "compression.method='gradual_magnitude': it prunes weights while"),
    (["compression=dynamic_int8"], "compression.method='dynamic_int8': it compresses the trained model"),
    (["compression=magnitude", "peft=full"], "compression.method='magnitude' and peft.method='full'"),
    (["compression=wanda", "peft=top_layers"], "compression.method='wanda' and peft.method='top_layers'"),
    (["peft=adalora"], "peft.method='adalora': it scores its updates from their whole gradients"),
    (["train.monitor=val/acc"], "train.monitor='val/acc': the selected checkpoint is loaded back")])
def test_fsdp_refuses_what_its_sharded_parameters_rule_out_in_one_line(overrides, says):
    from llmk_lab.errors import UserError

    with pytest.raises(UserError, match="hardware.strategy='fsdp' cannot be combined with " + re.escape(says)) as err:
        _settings(["hardware=fsdp", *overrides])
    assert "\n" not in str(err.value) and "hardware.strategy=ddp" in str(err.value)
    _settings(overrides)  # the same without FSDP plans
    # What FSDP serves: one-shot compression under a strategy that keeps the pruned weights frozen, full
    # fine-tuning of an unpruned model.
    for allowed in (["compression=wanda", "peft=lora"], ["compression=structured", "peft=full"],
                    ["compression=none", "peft=full"], ["compression=distillation", "peft=ia3"]):
        assert _settings(["hardware=fsdp", *allowed]).hardware.strategy == "fsdp"


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_matches_one_process_and_exports_the_whole_model(tmp_path):
    """Rank zero measures and exports alone, after FSDP's shards are gathered into its model: the counts,
    exports and checkpoint are of the whole model, and the metrics those of one process with the same
    effective batch. Lightning's FSDP is for GPUs; `tests/fsdp_on_cpu` lifts its CPU-only obstacles."""
    import json
    import os

    from tests.conftest import ROOT

    job = [o for o in DDP_RUN if o != "export.checkpoint=false"] + ["compression=magnitude", "export.checkpoint=true"]
    for name in ("one", "two", "scratch"):
        (tmp_path / name).mkdir()
    one = _cli_run([*job, "train.batch_size=16"], tmp_path / "one", tmp_path / "scratch")
    shim = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests" / "fsdp_on_cpu"),
                                                         os.environ.get("PYTHONPATH")])),
            "LLMK_LAB_TEST_FSDP_ON_CPU": "1"}
    two = _cli_run([*job, "train.batch_size=8", "hardware.strategy=fsdp", "hardware.devices=2"], tmp_path / "two",
                   tmp_path / "scratch", extra_env=shim)
    assert (one["train/world_size"], two["train/world_size"]) == (1, 2) and two["train/steps"] == 3
    assert json_manifest(tmp_path / "two" / "run")["hardware"]["processes_per_job"] == 2
    for key in ("val/acc", "test/acc", "test/macro_f1", "params/total", "params/nonzero", "params/trainable",
                "sparsity/pruned_layers", "sparsity/after_merge", "export/model_agreement"):
        assert two[key] == one[key], key
    for key in ("val/loss", "test/loss"):
        assert two[key] == pytest.approx(one[key], abs=1e-4), key
    # The checkpoint all processes saved holds every weight whole, as one process's does.
    states = [torch.load(tmp_path / name / "run" / "checkpoints" / "last.ckpt", map_location="cpu",
                         weights_only=False)["state_dict"] for name in ("one", "two")]
    assert {k: v.shape for k, v in states[0].items()} == {k: v.shape for k, v in states[1].items()}
    assert max(float((states[0][k].float() - states[1][k].float()).abs().max()) for k in states[0]) < 1e-3
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["run"]
    assert json.loads((tmp_path / "two" / "run" / "model" / "config.json").read_text())["hidden_size"] == 32
