"""`onnx/model.onnx` of a classification run's `model/`, and its check under onnxruntime.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from llmk_lab.errors import UserError
from llmk_lab.export.formats import ONNX_DIR, PLAIN, finished_model_dir, read_info
from llmk_lab.reference import agreement, load_reference
from llmk_lab.tasks import INPUT_KEYS, TASKS, task_class



def export_onnx(run_dir: Path, opset: int = 17) -> Path:
    """`onnx/model.onnx` of a classification run's `model/`, with its tokenizer and `llmk_lab.json`."""
    import torch
    import transformers

    folder = finished_model_dir(run_dir)
    info = read_info(folder)
    if not task_class(info["task"]).onnx_export:
        exported = [name for name in TASKS.names() if TASKS.get(name).cls.onnx_export]
        raise UserError(f"{run_dir}: ONNX export is for {', '.join(exported)} runs; this one is {info['task']}")
    if info.get("format", PLAIN) != PLAIN:
        raise UserError(f"{run_dir}: ONNX export is of float models; this run's model/ is int8 ({info['format']}): "
                        "export its float parent and quantise the graph with onnxruntime.quantization instead")
    model = getattr(transformers, info["auto_class"]).from_pretrained(folder, dtype=torch.float32).eval()
    model.config.return_dict = False  # a tuple output traces to a plain ONNX graph
    inputs, _ = load_reference(folder.parent)
    names = [k for k in INPUT_KEYS if k in inputs]
    example = tuple(inputs[k][:2] for k in names)
    dest = folder.parent / ONNX_DIR
    dest.mkdir(parents=True, exist_ok=True)
    dynamic = {k: {0: "batch", 1: "sequence"} for k in names}
    dynamic["logits"] = {0: "batch"}
    # The TorchScript exporter (dynamo=False) needs no extra package beyond onnx and handles BERT/Llama heads.
    import warnings

    with warnings.catch_warnings():  # torch calls this exporter legacy; it is the one that needs no onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        # Tracing notes on shape checks that are constant for these models; check_onnx runs other lengths.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*aten::index.*")
        torch.onnx.export(model, example, str(dest / "model.onnx"), input_names=names, output_names=["logits"],
                          dynamic_axes=dynamic, opset_version=opset, dynamo=False)
    for item in folder.iterdir():  # tokenizer files and llmk_lab.json, so the folder stands alone
        if item.is_file() and not item.name.endswith((".safetensors", ".bin")) and item.name != "config.json":
            shutil.copy2(item, dest / item.name)
    shutil.copy2(folder / "config.json", dest / "config.json")
    return dest / "model.onnx"

def check_onnx(run_dir: Path) -> dict[str, float]:
    """Labels of the ONNX model under onnxruntime against the run's own, on the reference test inputs."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError("checking the ONNX export needs onnxruntime: pip install 'llmk_lab[onnx]'") from None
    import numpy as np
    import torch

    folder = finished_model_dir(run_dir)
    session = onnxruntime.InferenceSession(str(folder.parent / ONNX_DIR / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    inputs, reference = load_reference(folder.parent)
    wanted = [i.name for i in session.get_inputs()]
    logits = []
    for start in range(0, len(inputs["input_ids"]), 64):
        feed = {k: inputs[k][start:start + 64].numpy().astype(np.int64) for k in wanted}
        logits.append(torch.from_numpy(session.run(["logits"], feed)[0]))
    figures = agreement(read_info(folder)["task"], reference, torch.cat(logits))
    # The graph was traced at one shape: single unpadded examples, each at its own length, must match too.
    import transformers

    info = read_info(folder)
    model = getattr(transformers, info["auto_class"]).from_pretrained(folder, dtype=torch.float32).eval()
    gaps, same = [], []
    with torch.inference_mode():
        for i in range(min(8, len(inputs["input_ids"]))):
            length = int(inputs["attention_mask"][i].sum())
            one = {k: inputs[k][i:i + 1, :length] for k in wanted}
            theirs = torch.from_numpy(session.run(["logits"], {k: v.numpy().astype(np.int64) for k, v in one.items()})[0])
            ours = model(**one).logits.float()
            gaps.append(float((ours - theirs).abs().max()))
            same.append(bool(ours.argmax(-1) == theirs.argmax(-1)))
    figures["unpadded_agreement"] = sum(same) / len(same)
    figures["unpadded_max_abs_diff"] = max(gaps)
    return figures
