"""Writing torch modules as ONNX graphs for deploy bundles (one exporter, one opset, recorded)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

OPSET = 17
EXPORTER = "torch.onnx.export (TorchScript-based, dynamo=False)"


def write_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str,
               dynamic: dict[int, str]) -> dict[str, Any]:
    """Export ``module(example)`` to ``path`` with the axes ``dynamic`` (index -> name) free on the
    input and the output; returns the graph's description for the manifest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(module, (example,), str(path), input_names=[input_name], output_names=[output_name],
                          dynamic_axes={input_name: dict(dynamic), output_name: dict(dynamic)},
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    return {"input": input_name, "output": output_name, "opset": OPSET, "exporter": EXPORTER,
            "torch": torch.__version__, "dynamic_axes": {str(k): v for k, v in dynamic.items()}}
