"""AIMET QuantSim on a qprep-prepared model (optional extra: ``pip install aimet-torch``).

>>> from qprep.quant.adapters import aimet
>>> sim = aimet.quantsim(gm, example_inputs)          # aimet_torch.QuantizationSimModel
>>> sim.compute_encodings(lambda m: [m(b) for b in batches])
>>> aimet.unquantized_ops(sim.model)                  # [] : a quantizer on every op

QuantSim quantizes module calls: each module type needs a quantized definition in AIMET's
registry, and AIMET's own preparer (``aimet_torch.model_preparer.prepare_model``) turns tensor
ops into its elementwise modules (``aimet_torch.nn.modules.custom.Add``, ``Concat``, ...).
:func:`to_aimet` does the same for a prepared model: each qprep wrapper whose call is the one
an AIMET elementwise module makes (``x + y``, ``torch.cat``, ``x.mean(dim)``, ...) becomes an
:class:`AimetCall` around that AIMET module, so QuantSim uses AIMET's own quantized op (and
its config rules for it). The wrappers AIMET has no module for (``torch.stack``, ``clamp``,
reflected operators such as ``1 - x``, ...) get a generic quantized definition, registered in
AIMET's registry on first use: an output quantizer on the wrapper's exact call.
"""

from __future__ import annotations

import copy
import json
import operator
import os
import tempfile
from typing import Any

import torch
import torch.nn as nn

try:
    import aimet_torch.nn.modules.custom as aimet_ops
    from aimet_torch.nn import QuantizationMixin
    from aimet_torch.quantsim import QuantizationSimModel
except ImportError as exc:  # pragma: no cover - exercised where aimet-torch is absent
    raise ImportError("qprep.quant.adapters.aimet needs aimet-torch: pip install 'qprep[aimet]'") from exc

from ... import modules as qm
from ...core.inputs import as_positional
from ._template import arguments, plain_call, tensor_slots

__all__ = ["to_aimet", "quantsim", "unquantized_ops", "AimetCall", "AIMET_OPS", "EVERY_OP_CONFIG"]

_T = torch

#: qprep wrapper -> (AIMET elementwise module, the plain calls that compute what it computes:
#: ``aimet_module(*args, **kwargs)`` is ``call(*args, **kwargs)`` for each of them).
AIMET_OPS: dict[type, tuple[type, frozenset]] = {
    qm.Add: (aimet_ops.Add, frozenset({operator.add, _T.add, "add"})),
    qm.Sub: (aimet_ops.Subtract, frozenset({operator.sub, _T.sub, "sub"})),
    qm.Mul: (aimet_ops.Multiply, frozenset({operator.mul, _T.mul, "mul"})),
    qm.Div: (aimet_ops.Divide, frozenset({operator.truediv, _T.div, "div"})),
    qm.MatMul: (aimet_ops.MatMul, frozenset({operator.matmul, _T.matmul, "matmul"})),
    qm.BMM: (aimet_ops.Bmm, frozenset({_T.bmm, "bmm"})),
    qm.Baddbmm: (aimet_ops.Baddbmm, frozenset({_T.baddbmm, "baddbmm"})),
    qm.Addmm: (aimet_ops.Addmm, frozenset({_T.addmm, "addmm"})),
    qm.Cat: (aimet_ops.Concat, frozenset({_T.cat, _T.concat, _T.concatenate})),
    qm.Mean: (aimet_ops.Mean, frozenset({_T.mean, "mean"})),
    qm.Sum: (aimet_ops.Sum, frozenset({_T.sum, "sum"})),
    qm.Prod: (aimet_ops.Prod, frozenset({_T.prod, "prod"})),
    qm.Amax: (aimet_ops.AMax, frozenset({_T.amax, "amax"})),
    qm.Amin: (aimet_ops.AMin, frozenset({_T.amin, "amin"})),
    qm.Cumsum: (aimet_ops.CumSum, frozenset({_T.cumsum, "cumsum"})),
    qm.Norm: (aimet_ops.Norm, frozenset({_T.norm, "norm"})),
    qm.Exp: (aimet_ops.Exponential, frozenset({_T.exp, "exp"})),
    qm.Log: (aimet_ops.Log, frozenset({_T.log, "log"})),
    qm.Sqrt: (aimet_ops.Sqrt, frozenset({_T.sqrt, "sqrt"})),
    qm.Rsqrt: (aimet_ops.RSqrt, frozenset({_T.rsqrt, "rsqrt"})),
    qm.Abs: (aimet_ops.Abs, frozenset({_T.abs, "abs"})),
    qm.Square: (aimet_ops.Square, frozenset({_T.square, "square"})),
    qm.Erf: (aimet_ops.Erf, frozenset({_T.erf, "erf"})),
    qm.Sin: (aimet_ops.Sin, frozenset({_T.sin, "sin"})),
    qm.Cos: (aimet_ops.Cos, frozenset({_T.cos, "cos"})),
    qm.Round: (aimet_ops.Round, frozenset({_T.round, "round"})),
    qm.Floor: (aimet_ops.ElementwiseFloor, frozenset({_T.floor, "floor"})),
    qm.Ceil: (aimet_ops.ElementwiseCeil, frozenset({_T.ceil, "ceil"})),
    qm.Neg: (aimet_ops.Neg, frozenset({operator.neg, _T.neg, "neg"})),
    qm.Pow: (aimet_ops.Pow, frozenset({operator.pow})),
    qm.Where: (aimet_ops.Where, frozenset({_T.where})),
    qm.Maximum: (aimet_ops.Maximum, frozenset({_T.maximum, "maximum"})),
    qm.Minimum: (aimet_ops.Minimum, frozenset({_T.minimum, "minimum"})),
    qm.FloorDiv: (aimet_ops.FloorDivide, frozenset({operator.floordiv, _T.floor_divide, "floor_divide"})),
    qm.Remainder: (aimet_ops.Remainder, frozenset({operator.mod, _T.remainder, "remainder"})),
    qm.Fmod: (aimet_ops.Fmod, frozenset({_T.fmod, "fmod"})),
}
# Not mapped on purpose: AIMET's MaskedFill calls Tensor.masked_fill_ (in place), qprep's
# MaskedFill is out of place unless the user wrote masked_fill_; Max/Min with a dim return tuples.

_BINARY_ONLY = (aimet_ops.Add, aimet_ops.Multiply, aimet_ops.Pow)  # forward(x, y): no keywords


class AimetCall(nn.Module):
    """Makes a qprep wrapper's exact call through an AIMET elementwise module ``op``, which
    QuantSim quantizes with AIMET's own quantized op. In-place calls (``out += identity``)
    write the result back into their first input, as the wrapper does."""

    def __init__(self, wrapper: qm.TensorOp, op: nn.Module):
        super().__init__()
        self.op = op
        self.args, self.kwargs = wrapper.args, dict(wrapper.kwargs)
        self.pack_inputs, self.inplace = wrapper.pack_inputs, wrapper.inplace
        self.concat = isinstance(op, aimet_ops.Concat)

    def forward(self, *inputs):
        if self.concat:
            out = self.op(*inputs)
        else:
            args, kwargs = arguments(self, inputs)
            out = self.op(*args, **kwargs)
        if self.inplace:
            return inputs[0].copy_(out)
        return out

    def extra_repr(self) -> str:
        constants = [repr(a) for a in (self.args or ()) if not isinstance(a, (qm.Input, list, tuple))]
        return ", ".join(constants + [f"{k}={v!r}" for k, v in self.kwargs.items()] + (["inplace=True"] if self.inplace else []))


def _aimet_twin(wrapper: qm.TensorOp) -> nn.Module | None:
    entry = AIMET_OPS.get(type(wrapper))
    if entry is None or wrapper.mode_arg is not None:
        return None
    cls, calls = entry
    call = plain_call(wrapper.call)
    if call not in calls:
        return None
    if cls is aimet_ops.Concat:
        return _concat(wrapper)
    if cls in _BINARY_ONLY and (wrapper.kwargs or (wrapper.args is not None and len(wrapper.args) != 2)):
        return None
    return cls()


def _concat(wrapper: qm.TensorOp) -> nn.Module | None:
    dim = wrapper.kwargs.get("dim", 0)
    if wrapper.args is not None:
        tensors, *rest = wrapper.args
        if not isinstance(tensors, (list, tuple)) or [getattr(t, "index", None) for t in tensors] != list(range(len(tensors))):
            return None
        dim = rest[0] if rest else dim
    if set(wrapper.kwargs) - {"dim"}:
        return None
    return aimet_ops.Concat(axis=dim)


_GENERIC: dict[type, type] = {}


def _register_generic(cls: type) -> None:
    """A quantized definition for a qprep class AIMET has none for: an output quantizer on
    the module's exact call (float tensor outputs only). Registered once per class."""
    if cls in QuantizationMixin.cls_to_qcls or cls in _GENERIC:
        return

    def __quant_init__(self):
        QuantizationMixin.__quant_init__(self)
        self.input_quantizers = nn.ModuleList([None] * max(1, tensor_slots(self) if isinstance(self, qm.TensorOp) else 1))
        self.output_quantizers = nn.ModuleList([None])

    def forward(self, *inputs, **kwargs):
        inputs = tuple(q(x) if q is not None and isinstance(x, torch.Tensor) else x
                       for q, x in zip(list(self.input_quantizers) + [None] * len(inputs), inputs))
        with self._patch_quantized_parameters():
            out = cls.forward(self, *inputs, **kwargs)
        quantizer = self.output_quantizers[0]
        if quantizer is not None and isinstance(out, torch.Tensor) and out.is_floating_point():
            out = quantizer(out)
        return out

    qcls = type(f"Quantized{cls.__name__}", (QuantizationMixin, cls), {
        "__quant_init__": __quant_init__, "forward": forward, "__module__": __name__,
        "__doc__": f"AIMET quantized definition of qprep's {cls.__name__} (output quantizer)."})
    QuantizationMixin.implements(cls)(qcls)
    _GENERIC[cls] = qcls


def to_aimet(gm: nn.Module) -> nn.Module:
    """A copy of the prepared model with qprep's wrappers mapped to AIMET's elementwise
    modules (:class:`AimetCall`), and a quantized definition registered for the rest."""
    model = copy.deepcopy(gm)
    for name, module in list(model.named_modules()):
        if not isinstance(module, qm.TensorOp):
            if type(module).__module__.startswith("qprep.") and next(module.children(), None) is None:
                _register_generic(type(module))
            continue
        twin = _aimet_twin(module)
        if twin is None:
            _register_generic(type(module))
            continue
        parent, _, attr = name.rpartition(".")
        call = AimetCall(module, twin)
        call.train(module.training)
        setattr(model.get_submodule(parent) if parent else model, attr, call)
    return model


#: QuantSim configuration that puts an output quantizer on every op (no supergroups, which
#: leave the inner ops of conv+relu & co unquantized to simulate fused kernels), 8-bit
#: per-channel symmetric weights, biases in float, the model input quantized.
EVERY_OP_CONFIG: dict = {
    "defaults": {"ops": {"is_output_quantized": "True"},
                 "params": {"is_quantized": "True", "is_symmetric": "True"},
                 "strict_symmetric": "False", "per_channel_quantization": "True"},
    "params": {"bias": {"is_quantized": "False"}},
    "op_type": {},
    "supergroups": [],
    "model_input": {"is_input_quantized": "True"},
    "model_output": {},
}


def quantsim(gm: nn.Module, example_inputs: Any, *, config_file: str | None = None, every_op: bool = True,
             **kwargs) -> QuantizationSimModel:
    """``aimet_torch.QuantizationSimModel`` of :func:`to_aimet` of ``gm``; ``kwargs`` go to
    QuantSim (``quant_scheme``, ``default_output_bw``, ``default_param_bw``, ...).

    With ``every_op`` (the default) the configuration is :data:`EVERY_OP_CONFIG` (unless a
    ``config_file`` is given) and, after QuantSim has placed its quantizers, every quantized
    op it left without an output quantizer gets one (a copy of one QuantSim made, same bit
    width and scheme), listed in ``sim.qprep_enabled`` with AIMET's reason. AIMET leaves
    them off on purpose for deployment: a conv followed by batch norm (folded), max pooling
    and embedding lookups (their input's grid), and *every module called more than once*,
    which includes qprep's recurrent cells, re-used over time steps by design (one grid per
    gate for all steps, as ``torch.ao``'s quantizable LSTM has it). ``every_op=False`` keeps
    AIMET's choices.
    """
    args = as_positional(example_inputs, gm)
    dummy = args if len(args) != 1 else args[0]
    model = to_aimet(gm)
    if config_file is not None or not every_op:
        sim = QuantizationSimModel(model, dummy, config_file=config_file, **kwargs)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "qprep_every_op.json")
            with open(path, "w") as f:
                json.dump(EVERY_OP_CONFIG, f)
            sim = QuantizationSimModel(model, dummy, config_file=path, **kwargs)
    sim.qprep_enabled = _enable_output_quantizers(sim.model) if every_op else []
    return sim


def _enable_output_quantizers(model: nn.Module) -> list[str]:
    """Give every quantized op without an output quantizer a fresh copy of one QuantSim made."""
    ops = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizationMixin)]
    reference = next((q for _, m in ops for q in m.output_quantizers if q is not None), None)
    if reference is None:
        return []
    enabled = []
    for name, module in ops:
        if not _is_compute(module) or len(module.output_quantizers) != 1 or module.output_quantizers[0] is not None:
            continue
        module.output_quantizers[0] = copy.deepcopy(reference)
        if hasattr(module.output_quantizers[0], "reset_parameters"):
            module.output_quantizers[0].reset_parameters()  # no encoding until compute_encodings
        enabled.append(name)
    return enabled


def unquantized_ops(model: nn.Module) -> list[str]:
    """Leaf compute modules of a QuantSim model (``sim.model``) whose output has no
    quantizer: AIMET has no quantized definition for them, or its config left their output
    quantizer off. Data movement (``nn.Identity``, ``nn.Flatten``) and dropouts are not
    compute ops. Empty when every op is quantized."""
    missing = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = prefix + name
            if isinstance(child, QuantizationMixin):
                if not any(q is not None for q in child.output_quantizers) and _is_compute(child):
                    missing.append(f"{path} ({type(child).__name__}: no output quantizer)")
            elif next(child.children(), None) is None:
                if _is_compute(child):
                    missing.append(f"{path} ({type(child).__name__}: no quantized definition)")
            else:
                walk(child, path + ".")

    walk(model, "")
    return missing


def _is_compute(module: nn.Module) -> bool:
    return not isinstance(module, (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout))
