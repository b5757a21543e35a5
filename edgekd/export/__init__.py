"""``edgekd export``: the stage (``stage.export``) and what it is made of: the converters
(``convert``), the runtimes and parity rules that score every file (``score``), the ToMe
variants of a ViT student (``tome``) and the sidecars and export.json (``report``)."""

from edgekd.export.convert import (calibrate_int8, check_imports, convert_onnx2tf, export_onnx,
                                   export_tflite_fp32, export_tflite_int8, resolve_converter, zero_dead_channels)
from edgekd.export.score import check_onnx_parity, onnx_runner, parity, tflite_runner
from edgekd.export.stage import ExportResult, export

__all__ = ["ExportResult", "calibrate_int8", "check_imports", "check_onnx_parity", "convert_onnx2tf", "export",
           "export_onnx", "export_tflite_fp32", "export_tflite_int8", "onnx_runner", "parity", "resolve_converter",
           "tflite_runner", "zero_dead_channels"]
