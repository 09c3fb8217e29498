"""The IR version pm-export writes ONNX files with."""

from __future__ import annotations

import onnx
from onnx import helper


def oldest_ir_version(model: onnx.ModelProto) -> onnx.ModelProto:
    """Mark `model` with the oldest IR version its opsets allow (8 for opset 17), not the installed
    onnx package's newest: onnx 1.23 writes IR 14 by default, which onnxruntime 1.30 refuses
    ("Unsupported model IR version: 14, max supported IR version: 13"; seen on a GPU machine), and
    bundles are meant to run on older runtimes (Jetson images, TensorRT's parser) too."""
    model.ir_version = min(model.ir_version, helper.find_min_ir_version_for(model.opset_import, ignore_unknown=True))
    return model
