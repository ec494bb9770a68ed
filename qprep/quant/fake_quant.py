"""8-bit fake quantization on every module output, with torch's own quantization modules.

>>> fq = qprep.quant.attach_fake_quant(gm, example_inputs)      # a copy; gm is untouched
>>> qprep.quant.calibrate(fq, batches)                           # observe, then freeze
>>> accuracy(fq)                                                 # the int8 simulation

Everything numeric is ``torch.ao.quantization``'s: its ``FakeQuantize`` modules and observers,
its ``QConfig``, its eager-mode ``prepare`` (which hooks a ``FakeQuantize`` on the output of
every leaf module that has a qconfig) and its QAT modules (``torch.ao.nn.qat.Conv2d``/
``Linear``, which fake-quantize the weight they hold). qprep only decides *where*:

* **activations**: every leaf module whose output on the example inputs is one floating-point
  tensor gets a per-tensor affine 8-bit ``FakeQuantize`` (quint8; on the x86/fbgemm engines
  7 bits, torch's ``reduce_range`` for those kernels, as its own default qconfigs do).
  ``nn.Sigmoid``/``nn.Softmax``/``nn.Hardsigmoid`` get torch's fixed [0, 1] grid and
  ``nn.Tanh`` the fixed [-1, 1] grid (``FixedQParamsFakeQuantize``), as torch's int8 kernels
  for them produce. torch's ``prepare`` never observes ``nn.Dropout``; modules whose output
  is a tuple (``nn.LSTM``) or not a float tensor cannot carry one and are listed in
  :attr:`FakeQuantReport.skipped`.
* **weights**: every ``nn.Conv1d/2d/3d`` and ``nn.Linear`` becomes its ``torch.ao.nn.qat``
  twin holding the *same* Parameter (tied weights stay tied), with a per-channel symmetric
  qint8 ``FakeQuantize`` on the weight.

On a model prepared by :func:`qprep.prepare` that is every op; on the original model it is
only the ops that already were modules (see :func:`qprep.coverage`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.nn.qat as nnqat
import torch.ao.quantization as tq
import torch.nn as nn
from torch.ao.quantization.quantization_mappings import get_default_qat_module_mappings

from ..core.inputs import as_positional, keywords_of
from ..report.coverage import untouched

__all__ = [
    "int8_qconfig", "attach_fake_quant", "calibrate", "fake_quant_modules", "FakeQuantReport",
    "WEIGHT_FAKE_QUANT_MAPPING", "quiet_torch_ao",
]

#: float module -> the torch.ao QAT module that fake-quantizes its weight: torch's default QAT
#: mapping (Conv2d/3d, Linear and the fused conv/linear modules) plus ``nn.Conv1d``.
WEIGHT_FAKE_QUANT_MAPPING: dict[type, type] = {**get_default_qat_module_mappings(), nn.Conv1d: nnqat.Conv1d}

#: modules whose int8 kernels produce a fixed output grid; torch's fake-quant for each.
_FIXED_GRID: dict[type, Callable] = {
    nn.Sigmoid: tq.default_fixed_qparams_range_0to1_fake_quant,
    nn.Softmax: tq.default_fixed_qparams_range_0to1_fake_quant,
    nn.Hardsigmoid: tq.default_fixed_qparams_range_0to1_fake_quant,
    nn.Tanh: tq.default_fixed_qparams_range_neg1to1_fake_quant,
}


@contextlib.contextmanager
def quiet_torch_ao() -> Iterator[None]:
    """Silence torch.ao.quantization's deprecation notices (it points users to torchao;
    see the README for why qprep uses it anyway) for the length of one call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao")
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*reduce_range will be deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*deprecated.*")
        yield


def int8_qconfig(*, backend: str | None = None, observer: str = "minmax") -> tq.QConfig:
    """torch's 8-bit QConfig: per-tensor affine quint8 activations, per-channel symmetric
    qint8 weights, both as ``FakeQuantize`` modules.

    Args:
        backend: the quantized engine the int8 model will run on (default: the current
            ``torch.backends.quantized.engine``); on ``x86``/``fbgemm`` activations use
            ``reduce_range`` (7 bits), as torch's own default qconfigs do for those kernels.
        observer: ``"minmax"`` (post-training calibration: the range of everything seen) or
            ``"moving_average"`` (quantization-aware training).
    """
    backend = backend or torch.backends.quantized.engine
    if observer not in ("minmax", "moving_average"):
        raise ValueError(f"observer must be 'minmax' or 'moving_average', got {observer!r}")
    moving = observer == "moving_average"
    act_observer = tq.MovingAverageMinMaxObserver if moving else tq.MinMaxObserver
    weight_observer = tq.MovingAveragePerChannelMinMaxObserver if moving else tq.PerChannelMinMaxObserver
    reduce_range = backend in ("x86", "fbgemm")
    # reduce_range on x86/fbgemm: 7-bit activations, as torch's own default qconfigs for those
    # engines (their u8 x s8 kernels can overflow 16-bit intermediates with 8 bits).
    activation = tq.FakeQuantize.with_args(
        observer=act_observer, quant_min=0, quant_max=255, reduce_range=reduce_range,
        dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    weight = tq.FakeQuantize.with_args(
        observer=weight_observer, quant_min=-128, quant_max=127, dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric, ch_axis=0)
    return tq.QConfig(activation=activation, weight=weight)


@dataclasses.dataclass(frozen=True)
class FakeQuantReport:
    """Where :func:`attach_fake_quant` put quantizers, and which leaf modules it could not."""

    activations: tuple[str, ...]  # modules whose output is fake-quantized
    weights: tuple[str, ...]      # modules whose weight is fake-quantized (per channel)
    skipped: tuple[tuple[str, str], ...]  # (module, why) for leaf modules without one

    @property
    def count(self) -> int:
        """Fake-quantize modules attached (activations + weights)."""
        return len(self.activations) + len(self.weights)


def _output_kinds(model: nn.Module, args: tuple) -> dict[int, str]:
    """For each leaf module called on ``args``: ``"float"`` when its output is one float
    tensor, else a word for what it is. Buffers and random streams are left as they were."""
    kinds: dict[int, str] = {}

    def hook(module, _inputs, output):
        if isinstance(output, torch.Tensor):
            kind = "float" if output.is_floating_point() else f"a {output.dtype} tensor"
        else:
            kind = f"a {type(output).__name__}"
        kinds.setdefault(id(module), kind)

    handles = [m.register_forward_hook(hook) for _, m in _units(model)]
    try:
        with untouched(model), torch.no_grad():
            model(*args, **keywords_of(args))
    finally:
        for h in handles:
            h.remove()
    return kinds


def attach_fake_quant(model: nn.Module, example_inputs: Any, *, qconfig: tq.QConfig | None = None,
                      keep_input_grid: tuple[type, ...] = (), inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (``inplace=False``) with 8-bit fake quantization on every leaf
    module output and per-channel weight fake quantization on Conv and Linear.

    ``keep_input_grid``: module types whose output stays on its input's grid, as their int8
    kernels keep it (``nn.ReLU``, pooling; :data:`qprep.quant.convert.KEEPS_INPUT_GRID`):
    they get no quantizer of their own, so the simulation matches the converted model. The
    default, ``()``, quantizes every module output.

    The result holds ``_qprep_fake_quant``, a :class:`FakeQuantReport`. Observers and fake
    quantization are both enabled (ready for quantization-aware training); for post-training
    quantization run :func:`calibrate` next.
    """
    args = as_positional(example_inputs, model)
    qconfig = qconfig or int8_qconfig()
    model = model if inplace else copy.deepcopy(model)
    kinds = _output_kinds(model, args)
    activations, skipped = [], []
    for module in model.modules():
        module.qconfig = None
    for name, module in _units(model):
        kind = kinds.get(id(module), "not called on the example inputs")
        if keep_input_grid and isinstance(module, keep_input_grid):
            skipped.append((name, f"{type(module).__name__} keeps its input's grid (as its int8 kernel does)"))
        elif type(module) is nn.Dropout:
            skipped.append((name, "nn.Dropout: torch's prepare never observes it (identity in eval)"))
        elif kind != "float":
            skipped.append((name, f"{type(module).__name__} returns {kind}: no single float tensor to fake-quantize"))
        else:
            for part in module.modules():  # a fused module's parts carry it too, as torch's QAT swap reads them
                part.qconfig = _qconfig_for(module, qconfig)
            activations.append(name)
    weights = [name for name, m in model.named_modules() if type(m) in WEIGHT_FAKE_QUANT_MAPPING and m.qconfig is not None]
    with quiet_torch_ao():
        tq.convert(model, mapping=WEIGHT_FAKE_QUANT_MAPPING, inplace=True, remove_qconfig=False)
        allow = {type(m) for m in model.modules() if getattr(m, "qconfig", None) is not None}
        tq.prepare(model, inplace=True, allow_list=allow)
    model._qprep_fake_quant = FakeQuantReport(tuple(activations), tuple(weights), tuple(skipped))
    return model


def _units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that get one output quantizer: leaves, and torch.ao's fused modules
    (``ConvReLU2d``: one kernel) as a whole."""
    units = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if isinstance(child, nni._FusedModule) or next(child.children(), None) is None:
                units.append((path, child))
            else:
                walk(child, path + ".")

    walk(model, "")
    return units


def _qconfig_for(module: nn.Module, qconfig: tq.QConfig) -> tq.QConfig:
    fixed = _FIXED_GRID.get(type(module))
    return qconfig if fixed is None else tq.QConfig(activation=fixed, weight=qconfig.weight)


_SWITCHES = ("enable_observer", "disable_observer", "enable_fake_quant", "disable_fake_quant")


def _is_fake_quant(module: nn.Module) -> bool:
    """torch.ao's ``FakeQuantizeBase``, or a module with its switches (torchao's
    ``torchao.quantization.pt2e.FakeQuantize``, which does not subclass it)."""
    return isinstance(module, tq.FakeQuantizeBase) or all(callable(getattr(module, s, None)) for s in _SWITCHES)


def fake_quant_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every fake-quantize module in ``model`` (activation and weight), by name."""
    return [(n, m) for n, m in model.named_modules() if _is_fake_quant(m)]


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, *, forward: Callable[[nn.Module, Any], Any] | None = None) -> nn.Module:
    """Post-training calibration: run ``batches`` in eval mode with the observers on and
    fake quantization off (the observers see float values), then freeze the ranges and turn
    fake quantization on. ``forward(model, batch)`` defaults to ``model(batch)`` (or
    ``model(*batch)`` for a tuple)."""
    forward = forward or (lambda m, b: m(*b) if isinstance(b, tuple) else m(b))
    model.eval()
    fakes = [m for _, m in fake_quant_modules(model)]
    for fq in fakes:
        fq.enable_observer()
        fq.disable_fake_quant()
    for batch in batches:
        forward(model, batch)
    for fq in fakes:
        fq.disable_observer()
        fq.enable_fake_quant()
    return model
