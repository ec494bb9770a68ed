"""Brevitas layerwise quantization of a qprep-prepared model (optional extra: ``pip install brevitas``).

>>> from qprep.quant.adapters import brevitas as qb
>>> qmodel = qb.quantize(gm)                              # a copy; gm is untouched
>>> with brevitas.graph.calibrate.calibration_mode(qmodel):
...     for b in batches: qmodel(b)
>>> qb.unquantized_ops(qmodel)                            # [] : a quantizer on every op

Brevitas quantizes by swapping modules for its quant layers
(``brevitas.graph.quantize.layerwise_quantize`` swaps the compute layers by type). qprep's
wrappers are modules, so the same swap reaches every op; :data:`BREVITAS_MAP` says what each
becomes:

* ``nn.Conv1d/2d/3d`` and ``nn.Linear`` -> ``QuantConvNd``/``QuantLinear`` with Brevitas's
  layerwise quantizers (8-bit input and weight, 32-bit bias) plus an 8-bit output quantizer,
  holding the *same* Parameter objects (tied weights stay tied; Brevitas's own swap copies
  the state dict, which unties them);
* ``nn.ReLU``/``Sigmoid``/``Tanh``/``Hardtanh`` -> ``QuantReLU``/``QuantSigmoid``/``QuantTanh``/
  ``QuantHardTanh``;
* qprep's ``Add`` (two tensors) -> ``QuantEltwiseAdd``, called with the wrapper's arguments
  (an in-place add writes its result back, as the wrapper does);
* any other module with a float output (batch norm, pooling, embeddings, qprep's other
  wrappers: ``Mul``, ``MatMul``, ``Cat``, ...) -> :class:`QuantOutput`: the module itself,
  then a ``QuantIdentity`` (8-bit per-tensor) on its output. (``QuantCat`` is not used:
  in Brevitas 0.13.4 its ``forward`` calls ``QuantTensor.cat``, which does not exist.)
"""

from __future__ import annotations

import copy
import operator
from typing import Any, Callable

import torch
import torch.nn as nn

try:
    import brevitas.nn as qnn
    from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerTensorFloat, Int32Bias, Uint8ActPerTensorFloat
except ImportError as exc:  # pragma: no cover - exercised where brevitas is absent
    raise ImportError("qprep.quant.adapters.brevitas needs brevitas: pip install 'qprep[brevitas]'") from exc

from ... import modules as qm
from ...core.inputs import as_positional
from ...report.coverage import untouched
from ._template import arguments, plain_call

__all__ = ["quantize", "unquantized_ops", "QuantOutput", "BrevitasCall", "BREVITAS_MAP"]

_LAYERWISE = {"input_quant": Int8ActPerTensorFloat, "weight_quant": Int8WeightPerTensorFloat,
              "bias_quant": Int32Bias, "output_quant": Int8ActPerTensorFloat, "return_quant_tensor": False}


class QuantOutput(nn.Module):
    """``module``, then an 8-bit ``QuantIdentity`` on its output (float tensor outputs)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.output_quant = qnn.QuantIdentity(act_quant=Int8ActPerTensorFloat, return_quant_tensor=False)

    def forward(self, *args, **kwargs):
        out = self.module(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            return self.output_quant(out)
        return out


class BrevitasCall(nn.Module):
    """A qprep wrapper's call made by a Brevitas quant layer (``QuantEltwiseAdd``); an
    in-place call writes the result back into its first input."""

    def __init__(self, wrapper: qm.TensorOp, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.args, self.kwargs = wrapper.args, dict(wrapper.kwargs)
        self.pack_inputs, self.inplace = wrapper.pack_inputs, wrapper.inplace

    def forward(self, *inputs):
        args, _ = arguments(self, inputs)
        out = self.layer(*args)
        if self.inplace:
            return inputs[0].copy_(out)
        return out


def _weighted(cls: type) -> Callable[[nn.Module], nn.Module]:
    def build(module: nn.Module) -> nn.Module:
        if isinstance(module, nn.Linear):
            layer = cls(module.in_features, module.out_features, bias=module.bias is not None, **_LAYERWISE)
        else:
            layer = cls(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                        padding=module.padding, dilation=module.dilation, groups=module.groups,
                        padding_mode=module.padding_mode, bias=module.bias is not None, **_LAYERWISE)
        layer.weight = module.weight  # the same Parameter objects: ties and optimizers keep working
        if module.bias is not None:
            layer.bias = module.bias
        return layer
    return build


def _add(module: qm.TensorOp) -> nn.Module | None:
    plain_two = module.args is None or (len(module.args) == 2 and all(isinstance(a, qm.Input) for a in module.args))
    if plain_call(module.call) not in (operator.add, torch.add, "add") or module.kwargs or not plain_two:
        return None
    return BrevitasCall(module, qnn.QuantEltwiseAdd(return_quant_tensor=False))


#: module type -> builder of its Brevitas replacement (``None`` from a builder: use
#: :class:`QuantOutput`). Types not listed with a float output get :class:`QuantOutput`.
BREVITAS_MAP: dict[type, Callable[[nn.Module], nn.Module | None]] = {
    nn.Conv1d: _weighted(qnn.QuantConv1d), nn.Conv2d: _weighted(qnn.QuantConv2d),
    nn.Conv3d: _weighted(qnn.QuantConv3d), nn.Linear: _weighted(qnn.QuantLinear),
    nn.ReLU: lambda m: qnn.QuantReLU(act_quant=Uint8ActPerTensorFloat, return_quant_tensor=False),
    nn.Sigmoid: lambda m: qnn.QuantSigmoid(act_quant=Uint8ActPerTensorFloat, return_quant_tensor=False),
    nn.Tanh: lambda m: qnn.QuantTanh(act_quant=Int8ActPerTensorFloat, return_quant_tensor=False),
    nn.Hardtanh: lambda m: qnn.QuantHardTanh(min_val=m.min_val, max_val=m.max_val, return_quant_tensor=False),
    qm.Add: _add,
}

_NOT_COMPUTE = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def _float_outputs(model: nn.Module, example_inputs: Any) -> set[int] | None:
    if example_inputs is None:
        return None
    seen: set[int] = set()
    handles = [m.register_forward_hook(lambda mod, i, o: seen.add(id(mod)) if isinstance(o, torch.Tensor)
                                       and o.is_floating_point() else None)
               for m in model.modules() if next(m.children(), None) is None]
    try:
        with untouched(model), torch.no_grad():
            model(*as_positional(example_inputs, model))
    finally:
        for h in handles:
            h.remove()
    return seen


def quantize(gm: nn.Module, example_inputs: Any = None) -> nn.Module:
    """A copy of the prepared model with every leaf module replaced per :data:`BREVITAS_MAP`.
    With ``example_inputs``, modules whose output is not a float tensor (comparisons,
    ``argmax``) or that were not called are left alone; without, every leaf is wrapped and
    :class:`QuantOutput` passes non-float outputs through."""
    model = copy.deepcopy(gm)
    floats = _float_outputs(model, example_inputs)
    for name, module in list(model.named_modules()):
        if not name or next(module.children(), None) is not None or isinstance(module, _NOT_COMPUTE):
            continue
        if floats is not None and id(module) not in floats:
            continue
        build = BREVITAS_MAP.get(type(module))
        new = build(module) if build is not None else None
        if new is None:
            new = QuantOutput(module)
        new.train(module.training)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    return model


def _has_output_quant(module: nn.Module) -> bool:
    if isinstance(module, (QuantOutput, BrevitasCall)):
        return True
    proxy = getattr(module, "output_quant", None) or getattr(module, "act_quant", None)
    return proxy is not None and getattr(proxy, "is_quant_enabled", False)


def unquantized_ops(model: nn.Module) -> list[str]:
    """Leaf compute modules of a :func:`quantize`\\ d model with no quantizer on their output."""
    missing = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = prefix + name
            if _has_output_quant(child):
                continue
            if isinstance(child, qnn.QuantIdentity) or type(child).__module__.startswith("brevitas."):
                continue  # Brevitas's own quantizer internals
            if next(child.children(), None) is None:
                if not isinstance(child, _NOT_COMPUTE):
                    missing.append(f"{path} ({type(child).__name__})")
            else:
                walk(child, path + ".")

    walk(model, "")
    return missing
