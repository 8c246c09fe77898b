"""Export of compressed models to deployment formats: ONNX (``embfactor export OUT --onnx``).

The table stays compressed inside the exported graph (:mod:`embfactor.export.graph`); :func:`export_onnx` writes
``onnx/model.onnx`` (and ``onnx/model_qint8.onnx``) into the compressed folder.
"""

from embfactor.export.onnx import ExportError, OnnxExportReport, export_onnx
from embfactor.export.optimum_compat import enable_optimum

__all__ = ["ExportError", "OnnxExportReport", "enable_optimum", "export_onnx"]
