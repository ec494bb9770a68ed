"""Quantizers on prepared models: 8-bit fake quantization and real int8 kernels with
``torch.ao.quantization``, and adapters to AIMET and Brevitas (optional extras, imported on use)."""

from .fake_quant import (
    FakeQuantReport, WEIGHT_FAKE_QUANT_MAPPING, attach_fake_quant, calibrate, fake_quant_modules, int8_qconfig,
    quiet_torch_ao,
)
from .convert import (
    KEEPS_INPUT_GRID, RUNS_ON_INT8, ConvertError, QuantizedAdd, QuantizedCat, QuantizedMatMul, QuantizedMul,
    convert_int8, fuse_modules, int8_mapping, prepare_int8, quantize_int8,
)

__all__ = [
    "prepare_int8", "convert_int8", "quantize_int8", "int8_mapping", "fuse_modules", "ConvertError",
    "QuantizedAdd", "QuantizedMul", "QuantizedCat", "QuantizedMatMul", "RUNS_ON_INT8", "KEEPS_INPUT_GRID",
    "int8_qconfig", "attach_fake_quant", "calibrate", "fake_quant_modules", "FakeQuantReport",
    "WEIGHT_FAKE_QUANT_MAPPING", "quiet_torch_ao",
]
