"""`python -m llmk_lab.export RUN_DIR [--onnx]`: check a finished run's `model/` again, and write and check ONNX.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from llmk_lab.console import quiet_libraries
from llmk_lab.errors import UserError
from llmk_lab.export.model import check_model_dir
from llmk_lab.export.onnx import check_onnx, export_onnx



def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmk_lab.export",
                                     description="Check a finished run's model/ export against the run's own test "
                                                 "predictions; --onnx also writes and checks onnx/model.onnx.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--onnx", action="store_true", help="write onnx/model.onnx (classification runs)")
    args = parser.parse_args(argv)
    quiet_libraries()  # no per-load progress bars or load reports
    try:
        figures = check_model_dir(args.run_dir)
        print(f"model/: agreement {figures['agreement']:.4f}, max |difference| {figures['max_abs_diff']:.3g}, "
              f"linear-layer sparsity {figures['sparsity']:.4f} (recorded {figures['sparsity_recorded']})")
        if args.onnx:
            path = export_onnx(args.run_dir)
            onnx_figures = check_onnx(args.run_dir)
            print(f"{path}: label agreement with the run {onnx_figures['agreement']:.4f}, "
                  f"max |logit difference| {onnx_figures['max_abs_diff']:.3g}; unpadded at other lengths: "
                  f"agreement {onnx_figures['unpadded_agreement']:.4f}, max |difference| "
                  f"{onnx_figures['unpadded_max_abs_diff']:.3g}")
            figures = {**figures, **{f"onnx_{k}": v for k, v in onnx_figures.items()}}
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if all(v == 1.0 for k, v in figures.items() if k.endswith("agreement")) else 1

