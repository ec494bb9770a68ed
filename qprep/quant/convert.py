"""Real int8 kernels for a prepared model: torch.ao eager-mode convert, with quantized twins
of qprep's wrapper modules.

torch's eager mode swaps each module for its quantized version (``nn.Conv2d`` ->
``torch.ao.nn.quantized.Conv2d``) and leaves tensor ops alone, which is why eager-mode users
rewrite ``out += identity`` as ``self.skip_add.add(out, identity)`` with a ``FloatFunctional``.
After :func:`qprep.prepare` every op is a module, so the swap covers it: qprep's
:class:`~qprep.modules.Add`, :class:`~qprep.modules.Mul`, :class:`~qprep.modules.Cat` and
:class:`~qprep.modules.MatMul` get quantized twins here (the kernels ``QFunctional`` calls:
``quantized::add``, ``mul``, ``cat``, ``matmul``, ``add_scalar``, ``mul_scalar``).

Three steps, each torch's own machinery::

    q = prepare_int8(gm, example_inputs)       # fuse conv+bn(+relu), place Quant/DeQuantStubs
    q = calibrate(attach_fake_quant(q, example_inputs), batches)
    int8 = convert_int8(q)                     # torch.ao.quantization.convert with the twins

:func:`prepare_int8` puts a ``QuantStub`` after every float input and a ``DeQuantStub`` before
every float output; a module or op with no int8 kernel (no twin, not in torch's mapping, not
one that runs on quantized tensors as it is) becomes a float island: ``DeQuantStub`` on its
inputs, ``QuantStub`` on its output.
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.quantization as tq
import torch.fx
import torch.nn as nn
from torch.ao.quantization.quantization_mappings import get_default_static_quant_module_mappings

from .. import modules as qm
from ..core.errors import QprepError
from ..core.inputs import as_positional
from ..core.provenance import source_location
from ..report.coverage import untouched, moves_data
from ..modules import Input
from .fake_quant import attach_fake_quant, calibrate, quiet_torch_ao

__all__ = [
    "prepare_int8", "convert_int8", "quantize_int8", "int8_mapping", "fuse_modules", "ConvertError",
    "QuantizedAdd", "QuantizedMul", "QuantizedCat", "QuantizedMatMul", "RUNS_ON_INT8", "KEEPS_INPUT_GRID",
]


class ConvertError(QprepError):
    """A module or graph that the int8 conversion cannot handle, with the reason."""


# ----------------------------------------------------------------------------- twins
def _slots_and_constants(mod: qm.TensorOp) -> tuple[list[int], list[Any], dict]:
    """The wrapper's call as (input slot order, positional constants, keyword constants)."""
    if mod.args is None:
        return [], [], dict(mod.kwargs)
    slots = [a.index for a in mod.args if isinstance(a, Input)]
    constants = [a for a in mod.args if not isinstance(a, Input)]
    return slots, constants, dict(mod.kwargs)


def _qparams(mod: nn.Module) -> tuple[float, int]:
    post = getattr(mod, "activation_post_process", None)
    if post is None:
        raise ConvertError(f"{type(mod).__name__} has no activation_post_process: attach fake quantization and "
                           "calibrate before convert_int8")
    scale, zero_point = post.calculate_qparams()
    return float(scale), int(zero_point)


class _QuantizedBinary(nn.Module):
    """A quantized elementwise op on two tensors, or on a tensor and a Python number."""

    _float_cls: type
    _calls: frozenset
    _tensor_op: str
    _scalar_op: str

    def __init__(self, scale: float = 1.0, zero_point: int = 0, scalar: float | None = None):
        super().__init__()
        self.scale, self.zero_point, self.scalar = scale, zero_point, scalar

    @classmethod
    def from_float(cls, mod: qm.TensorOp, use_precomputed_fake_quant: bool = False):
        name = cls._float_cls.__name__
        if mod.call not in cls._calls:
            raise ConvertError(f"{name}(call={mod.call!r}) has no int8 kernel")
        slots, constants, kwargs = _slots_and_constants(mod)
        if kwargs:
            raise ConvertError(f"{name} with keyword arguments {sorted(kwargs)} has no int8 kernel")
        scale, zero_point = _qparams(mod)
        if mod.args is None or (len(slots) == 2 and not constants):
            return cls(scale, zero_point)
        if len(slots) == 1 and len(constants) == 1 and isinstance(constants[0], (int, float)) \
                and not isinstance(constants[0], bool):
            return cls(scale, zero_point, scalar=float(constants[0]))
        raise ConvertError(f"{name}{mod.args} has no int8 kernel (two tensors, or a tensor and a number)")

    def forward(self, x, y=None):
        if self.scalar is not None:
            return getattr(torch.ops.quantized, self._scalar_op)(x, self.scalar)
        return getattr(torch.ops.quantized, self._tensor_op)(x, y, scale=self.scale, zero_point=self.zero_point)

    def extra_repr(self) -> str:
        if self.scalar is not None:
            return f"scalar={self.scalar}"
        return f"scale={self.scale}, zero_point={self.zero_point}"


_ADD_CALLS = frozenset({operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__radd__", "__iadd__"})
_MUL_CALLS = frozenset({operator.mul, operator.imul, torch.mul, torch.multiply, "mul", "mul_", "multiply",
                        "__mul__", "__rmul__", "__imul__"})


class QuantizedAdd(_QuantizedBinary):
    """int8 twin of :class:`qprep.modules.Add` (``quantized::add`` / ``add_scalar``)."""

    _float_cls, _calls, _tensor_op, _scalar_op = qm.Add, _ADD_CALLS, "add", "add_scalar"


class QuantizedMul(_QuantizedBinary):
    """int8 twin of :class:`qprep.modules.Mul` (``quantized::mul`` / ``mul_scalar``)."""

    _float_cls, _calls, _tensor_op, _scalar_op = qm.Mul, _MUL_CALLS, "mul", "mul_scalar"


class QuantizedMatMul(nn.Module):
    """int8 twin of :class:`qprep.modules.MatMul` (``quantized::matmul``)."""

    def __init__(self, scale: float = 1.0, zero_point: int = 0):
        super().__init__()
        self.scale, self.zero_point = scale, zero_point

    @classmethod
    def from_float(cls, mod: qm.TensorOp, use_precomputed_fake_quant: bool = False):
        slots, constants, kwargs = _slots_and_constants(mod)
        if mod.call not in (operator.matmul, torch.matmul, "matmul", "__matmul__") or constants or kwargs:
            raise ConvertError(f"MatMul(call={mod.call!r}, args={mod.args}) has no int8 kernel")
        return cls(*_qparams(mod))

    def forward(self, x, y):
        return torch.ops.quantized.matmul(x, y, self.scale, self.zero_point)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, zero_point={self.zero_point}"


class QuantizedCat(nn.Module):
    """int8 twin of :class:`qprep.modules.Cat` (``quantized::cat``, requantizing every input
    to the output's grid)."""

    def __init__(self, dim: int = 0, scale: float = 1.0, zero_point: int = 0):
        super().__init__()
        self.dim, self.scale, self.zero_point = dim, scale, zero_point

    @classmethod
    def from_float(cls, mod: qm.TensorOp, use_precomputed_fake_quant: bool = False):
        if mod.call not in (torch.cat, torch.concat, torch.concatenate):
            raise ConvertError(f"Cat(call={mod.call!r}) has no int8 kernel")
        dim = mod.kwargs.get("dim", 0)
        if mod.args is not None:
            tensors, *rest = mod.args
            if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, Input) for t in tensors):
                raise ConvertError(f"Cat{mod.args}: the tensors must all be inputs")
            if [t.index for t in tensors] != list(range(len(tensors))):
                raise ConvertError(f"Cat{mod.args}: the inputs must come in order")
            dim = rest[0] if rest else dim
            if set(mod.kwargs) - {"dim"}:
                raise ConvertError(f"Cat with keyword arguments {sorted(mod.kwargs)} has no int8 kernel")
        return cls(dim, *_qparams(mod))

    def forward(self, *tensors):
        return torch.ops.quantized.cat(list(tensors), self.dim, self.scale, self.zero_point)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, scale={self.scale}, zero_point={self.zero_point}"


#: qprep wrapper -> its int8 twin.
TWINS: dict[type, type] = {qm.Add: QuantizedAdd, qm.Mul: QuantizedMul, qm.Cat: QuantizedCat, qm.MatMul: QuantizedMatMul}

#: modules that run on quantized tensors as they are (same grid out, or the kernel's fixed grid).
RUNS_ON_INT8: tuple[type, ...] = (
    nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.Flatten, nn.Unflatten, nn.Identity,
    nn.Sigmoid, nn.Tanh, nn.Hardsigmoid, nn.Hardtanh, nn.Upsample, nn.PixelShuffle, nn.ZeroPad2d,
)

#: the :data:`RUNS_ON_INT8` modules whose int8 output is on their input's grid (not a fixed
#: one): :func:`attach_fake_quant` ``keep_input_grid`` for a simulation that matches the kernels.
KEEPS_INPUT_GRID: tuple[type, ...] = tuple(t for t in RUNS_ON_INT8 if t not in (nn.Sigmoid, nn.Tanh, nn.Hardsigmoid)) + (
    nn.Dropout,)

# Embeddings take integer indices and need float_qparams weights: they stay float islands.
_NOT_STATIC = (nn.Embedding, nn.EmbeddingBag)


def int8_mapping() -> dict[type, type]:
    """torch's static quantization mapping (float and QAT modules -> quantized kernels)
    plus qprep's twins, minus the embeddings (float islands here)."""
    mapping = {k: v for k, v in get_default_static_quant_module_mappings().items() if k not in _NOT_STATIC}
    mapping.update(TWINS)
    return mapping


# ----------------------------------------------------------------------------- the graph
def _values(gm: torch.fx.GraphModule, args: tuple) -> dict[torch.fx.Node, Any]:
    """What each node produced on ``args`` (buffers and random streams left as they were)."""
    values: dict[torch.fx.Node, Any] = {}

    class _Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            values[n] = result
            return result

    with untouched(gm), torch.no_grad():
        _Recorder(gm).run(*args)
    return values


def _is_float(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


_FUSIONS = {
    (nn.Conv1d, nn.BatchNorm1d, nn.ReLU), (nn.Conv2d, nn.BatchNorm2d, nn.ReLU), (nn.Conv3d, nn.BatchNorm3d, nn.ReLU),
    (nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, nn.BatchNorm3d),
    (nn.Conv1d, nn.ReLU), (nn.Conv2d, nn.ReLU), (nn.Conv3d, nn.ReLU), (nn.Linear, nn.ReLU),
    (nn.BatchNorm2d, nn.ReLU), (nn.BatchNorm3d, nn.ReLU),
}


def _next_module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.Node | None:
    """The one user of ``node`` if it is a module call taking ``node`` as its only input."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.op != "call_module" or user.all_input_nodes != [node] or user.kwargs:
        return None
    return user


def fuse_modules(gm: torch.fx.GraphModule) -> list[list[str]]:
    """Fuse conv+bn(+relu), conv+relu, linear+relu and bn+relu chains of ``gm`` (in eval
    mode: batch norm folded into the conv), with ``torch.ao.quantization.fuse_modules``;
    the calls of the fused-away modules (now ``nn.Identity``) are removed from the graph.
    Returns the fused groups. ``gm`` is modified."""
    groups, taken = [], set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or node in taken:
            continue
        chain = [node]
        while len(chain) < 3:
            nxt = _next_module(gm, chain[-1])
            if nxt is None:
                break
            chain.append(nxt)
        types = [type(gm.get_submodule(n.target)) for n in chain]
        for length in (3, 2):
            if tuple(types[:length]) in _FUSIONS and len(chain) >= length:
                if any(len([n for n in gm.graph.nodes if n.op == "call_module" and n.target == c.target]) > 1
                       for c in chain[:length]):
                    break  # a module called at several sites cannot be fused into one
                groups.append(chain[:length])
                taken.update(chain[:length])
                break
    if not groups:
        return []
    with quiet_torch_ao():
        tq.fuse_modules(gm, [[n.target for n in g] for g in groups], inplace=True)
    for group in groups:
        for node in group[1:]:
            node.replace_all_uses_with(node.all_input_nodes[0])
            gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return [[n.target for n in g] for g in groups]


def _runs_on_int8(gm: torch.fx.GraphModule, node: torch.fx.Node, mapping: dict) -> bool:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nni._FusedModule) or type(module) in mapping:
            return True
        return isinstance(module, RUNS_ON_INT8) and not isinstance(module, _NOT_STATIC)
    if node.op in ("call_function", "call_method"):
        return moves_data(node.target)
    return True


def _check_inplace(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    """An in-place wrapper (``out += identity``) becomes an out-of-place int8 op: fine unless
    the tensor it mutated is read again after it."""
    module = gm.get_submodule(node.target)
    if not getattr(module, "inplace", False) or not node.args:
        return
    target = node.args[0]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    later = [u for u in target.users if u is not node and order[u] > order[node]]
    if later:
        raise ConvertError(
            f"{node.target} ({type(module).__name__}, in place, {source_location(node) or 'unknown source'}) mutates "
            f"{target.name}, which {', '.join(u.name for u in later)} read(s) afterwards; the int8 op is out of place")


def _insert_module(gm: torch.fx.GraphModule, name: str, module: nn.Module, node_before: torch.fx.Node,
                   arg: torch.fx.Node) -> torch.fx.Node:
    base, i = name, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node_before):
        return gm.graph.call_module(name, (arg,))


def prepare_int8(gm: torch.fx.GraphModule, example_inputs: Any, *, fuse: bool = True) -> torch.fx.GraphModule:
    """A copy of the prepared model ``gm`` ready for :func:`attach_fake_quant`,
    :func:`calibrate` and :func:`convert_int8`: conv/bn/relu fused (eval mode), a ``QuantStub``
    after every float input, a ``DeQuantStub`` before every float output, and float islands
    (``DeQuantStub`` in, ``QuantStub`` out) around ops with no int8 kernel.

    Raises :class:`ConvertError` for an in-place op whose mutated tensor is read afterwards.
    """
    if not isinstance(gm, torch.fx.GraphModule):
        raise ConvertError(f"prepare_int8 takes the GraphModule qprep.prepare returns, got {type(gm).__name__}")
    args = as_positional(example_inputs, gm)
    gm = copy.deepcopy(gm).eval()
    if fuse:
        fuse_modules(gm)
    values = _values(gm, args)
    mapping = int8_mapping()
    quantized: set[torch.fx.Node] = set()  # nodes whose value is a quantized tensor after convert
    graph = gm.graph
    for node in list(graph.nodes):
        value = values.get(node)
        if node.op == "placeholder":
            if _is_float(value):
                stub = _insert_module(gm, f"quant_{node.name}", tq.QuantStub(), node, node)
                node.replace_all_uses_with(stub, delete_user_cb=lambda u, s=stub: u is not s)
                quantized.add(stub)
            continue
        if node.op == "output" or node in quantized:
            continue
        q_inputs = [n for n in node.all_input_nodes if n in quantized]
        if not q_inputs:
            continue  # runs on float values (integer inputs, constants): stays as it is
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), qm.TensorOp):
            _check_inplace(gm, node)
        if node.op != "call_module" and not isinstance(value, torch.Tensor):
            continue  # shape arithmetic (x.size(0)) reads quantized tensors as they are
        if _runs_on_int8(gm, node, mapping):
            if _is_float(value) or isinstance(value, torch.Tensor):
                quantized.add(node)
            continue
        # a float island: dequantize what comes in, quantize what goes out
        for inp in q_inputs:
            deq = _insert_module(gm, f"dequant_{node.name}", tq.DeQuantStub(), inp, inp)
            node.replace_input_with(inp, deq)
        if _is_float(value):
            requant = _insert_module(gm, f"quant_{node.name}", tq.QuantStub(), node, node)
            node.replace_all_uses_with(requant, delete_user_cb=lambda u, s=requant: u is not s)
            quantized.add(requant)
    output = next(n for n in graph.nodes if n.op == "output")
    for inp in [n for n in output.all_input_nodes if n in quantized]:
        deq = _insert_module(gm, f"dequant_{inp.name}", tq.DeQuantStub(), inp, inp)
        output.replace_input_with(inp, deq)
    graph.lint()
    gm.recompile()
    return gm


def quantize_int8(gm: torch.fx.GraphModule, example_inputs: Any, batches, *,
                  forward=None) -> tuple[nn.Module, nn.Module]:
    """The three steps in one call: :func:`prepare_int8`, :func:`attach_fake_quant` (with
    :data:`KEEPS_INPUT_GRID`) and :func:`calibrate` on ``batches``, then :func:`convert_int8`.
    Returns ``(simulation, int8)``: the calibrated fake-quantized model and the int8 one."""
    prepared = prepare_int8(gm, example_inputs)
    simulation = calibrate(attach_fake_quant(prepared, example_inputs, keep_input_grid=KEEPS_INPUT_GRID),
                           batches, forward=forward)
    return simulation, convert_int8(simulation)


def convert_int8(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Swap every fake-quantized module of ``model`` (from :func:`prepare_int8`,
    :func:`attach_fake_quant` and :func:`calibrate`) for its int8 kernel:
    ``torch.ao.quantization.convert`` with :func:`int8_mapping`."""
    with quiet_torch_ao():
        return tq.convert(model.eval(), mapping=int8_mapping(), inplace=inplace)
