"""Hardware and memory: causal-LM evaluation without whole-batch logits, precision, threads, DDP on CPU."""
from __future__ import annotations

import math

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

    monkeypatch.setattr(causal_lm, "EVAL_CHUNK_TOKENS", 7)
    widest: list[int] = []
    head = model.get_output_embeddings()
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

    code = ("import sys, llmk_lab, llmk_lab.cli; from llmk_lab import registry; llmk_lab.register_all();"
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
    from llmk_lab import registry
    from llmk_lab.compression import COMPRESSION
    from llmk_lab.peft import PEFT

    registry._light_cache.clear()
    registry._light_modules.clear()
    real = {"COMPRESSION": COMPRESSION, "PEFT": PEFT}
    for package, name, group in llmk_lab.SCHEMA_REGISTRIES:
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
    from llmk_lab.registry import check_values_lightly
    from tests.conftest import compose_config

    check_values_lightly(compose_config([]))
    for override, key in (("compression.sparsity=1.5", "compression.sparsity=1.5"), ("peft.r=0", "peft.r=0"),
                          ("train.lr=-1", "train.lr=-1"), ("compression=wanda", None)):
        cfg = compose_config([override])
        if key is None:
            check_values_lightly(cfg)
            continue
        with pytest.raises(UserError, match=key.replace(".", r"\.")):
            check_values_lightly(cfg)
