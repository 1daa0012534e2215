"""A run's final model as folders anyone can load, each checked against what the run predicted.

At the end of a run (`export.model=true`, the default) three things go into the run directory:

- `model/`: the final model as a plain Hugging Face folder (`from_pretrained`, no llmk_lab needed):
  the adapter merged where it can be, pruned structure and zeros kept, with the tokenizer and
  `llmk_lab.json` (task, labels, the run's `data.max_length`, the folder's `format`). Written only
  when reloading it reproduces the run's predictions; otherwise the reason goes to `metrics.json`
  (`export/model`), e.g. adapters that transformers cannot rebuild. int8 models keep their int8 form:
  torchao's tensors (`weight_only_int8`, `dynamic_int8` with `backend: torchao`) as transformers'
  torchao format (`from_pretrained` with torchao installed); torch.ao's dynamic int8 modules
  (`dynamic_int8`'s default backend), which transformers' format cannot hold, as their state dict
  (`int8_state_dict.pt`) beside config.json, loaded by `load_exported` (three lines of plain torch
  and transformers, in the README). Low-bit models (`rtn`, `gptq`, `awq`) keep their packed codes:
  symmetric grids as compressed-tensors' `pack-quantized` format (`from_pretrained` with
  compressed-tensors installed, which unpacks them into float layers); asymmetric ones, which
  transformers' compressed-tensors loader does not read back (its zero-point layout differs), as
  their state dict (`low_bit_state_dict.safetensors`) loaded by `load_exported`.
- `reference/test.safetensors`: the run's own outputs on (up to the task's `reference_size` of) its test
  split and the token ids they came from, so any later export (ONNX) or comparison is checked
  against the run with nothing but the run directory.
- in `metrics.json`: `export/model_agreement` (share of identical predictions after reloading),
  `export/model_max_abs_diff`, and the zero fraction of the linear layers before and after.

With `export.adapter=true` (the default), `adapter/` holds the adapter alone, for the base the run started
from, where loading it that way without llmk_lab reproduces the run (`export_adapter`; `export/adapter`,
`export/adapter_agreement`), and `export/adapter` says why not otherwise.

`python -m llmk_lab.export RUN_DIR [--onnx]` checks `model/` again, and writes and checks
`onnx/model.onnx` for classification runs (onnxruntime, the `onnx` extra).
"""
from __future__ import annotations

# The package's parts: formats (what model/ holds and how it loads), model (model/ and its check), adapter
# (adapter/ alone), onnx, and the command line (cli). Their public names, importable from here:
from llmk_lab.export.adapter import adapter_refusal, export_adapter, load_adapter_folder  # noqa: F401
from llmk_lab.export.cli import main  # noqa: F401
from llmk_lab.export.formats import (ADAPTER_DIR, ADAPTER_WEIGHTS, COMPRESSED_TENSORS, INFO_FILE,  # noqa: F401
                                     INT8_STATE_FILE, LOW_BIT_STATE, LOW_BIT_STATE_FILE, MODEL_DIR, ONNX_DIR,
                                     OUTPUT_TOLERANCE, PLAIN, TORCH_AO_INT8, TORCHAO_INT8, finished_model_dir,
                                     linear_sparsity, load_exported, model_format, read_info, save_model, task_info)
from llmk_lab.export.model import check_model_dir, compare_outputs, export_model  # noqa: F401
from llmk_lab.export.onnx import check_onnx, export_onnx  # noqa: F401
from llmk_lab.reference import agreement, load_reference, model_outputs  # noqa: F401  (what a run kept)
