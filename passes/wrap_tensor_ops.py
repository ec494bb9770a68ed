"""Pass: tensor ops (operators, ``torch.*`` functions, ``Tensor`` methods) -> wrapper modules.

Before::

    def forward(self, x):
        identity = x
        out = self.bn2(self.conv2(x))
        out += identity                      # operator.iadd
        return torch.cat([identity, out], dim=1)

After::

    def forward(self, x):
        bn2 = self.bn2(self.conv2(x))
        iadd = self.add(bn2, x)              # qprep.modules.Add(call=operator.iadd, inplace=True)
        return self.cat(x, iadd)             # qprep.modules.Cat(dim=1)

Each wrapper makes exactly the call the user made (same callable, same constants, same
in-place form), so outputs stay bitwise identical and aliasing behaves as in eager mode.
Only tensor-producing nodes are wrapped: ``x.size(0) // 2`` stays plain Python. Data
movement (views, reshapes, indexing, dtype conversion) stays as graph nodes; see
``passes/README.md`` for the exact policy.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from qprep import modules as qm
from qprep._provenance import module_scope, record_change
from qprep.config import PrepareConfig
from qprep.errors import RewriteError
from qprep.graph_utils import ModuleNamer, call_template, produces_tensor, replace_with_module, target_text, type_name
from qprep.passes.convert_functionals import handles as handles_functional
from qprep.records import REWRITTEN, SKIPPED, PassResult

__all__ = ["wrap_tensor_ops", "FUNCTION_TABLE", "METHOD_TABLE", "DATA_MOVEMENT"]

PASS_NAME = "wrap_tensor_ops"
REASON_DATA_MOVEMENT = "data movement: stays a graph node by policy"
REASON_SHAPE = "shape arithmetic: not a tensor, stays plain Python"

#: callable -> wrapper class. Operators include their in-place forms.
FUNCTION_TABLE: dict = {
    operator.add: qm.Add, operator.iadd: qm.Add, torch.add: qm.Add,
    operator.sub: qm.Sub, operator.isub: qm.Sub, torch.sub: qm.Sub, torch.subtract: qm.Sub, torch.rsub: qm.Sub,
    operator.mul: qm.Mul, operator.imul: qm.Mul, torch.mul: qm.Mul, torch.multiply: qm.Mul,
    operator.truediv: qm.Div, operator.itruediv: qm.Div, torch.div: qm.Div, torch.divide: qm.Div,
    torch.true_divide: qm.Div,
    operator.floordiv: qm.FloorDiv, operator.ifloordiv: qm.FloorDiv, torch.floor_divide: qm.FloorDiv,
    operator.mod: qm.Remainder, operator.imod: qm.Remainder, torch.remainder: qm.Remainder,
    torch.fmod: qm.Fmod,
    operator.pow: qm.Pow, operator.ipow: qm.Pow, torch.pow: qm.Pow, torch.float_power: qm.Pow,
    operator.neg: qm.Neg, torch.neg: qm.Neg, torch.negative: qm.Neg,
    torch.reciprocal: qm.Reciprocal,
    operator.matmul: qm.MatMul, torch.matmul: qm.MatMul, torch.mm: qm.MM, torch.bmm: qm.BMM,
    torch.baddbmm: qm.Baddbmm, torch.addmm: qm.Addmm, torch.addbmm: qm.Addbmm,
    torch.addcmul: qm.Addcmul, torch.addcdiv: qm.Addcdiv, torch.einsum: qm.Einsum, torch.lerp: qm.Lerp,
    torch.cat: qm.Cat, torch.concat: qm.Cat, torch.concatenate: qm.Cat, torch.stack: qm.Stack,
    torch.where: qm.Where, torch.clamp: qm.Clamp, torch.clip: qm.Clamp,
    torch.maximum: qm.Maximum, torch.minimum: qm.Minimum, torch.atan2: qm.Atan2,
    torch.masked_fill: qm.MaskedFill,
    torch.exp: qm.Exp, torch.log: qm.Log, torch.log2: qm.Log2, torch.log1p: qm.Log1p,
    torch.sqrt: qm.Sqrt, torch.rsqrt: qm.Rsqrt, torch.abs: qm.Abs, torch.sign: qm.Sign,
    torch.square: qm.Square, torch.floor: qm.Floor, torch.ceil: qm.Ceil, torch.round: qm.Round,
    torch.trunc: qm.Trunc, torch.erf: qm.Erf, torch.sin: qm.Sin, torch.cos: qm.Cos,
    torch.expm1: qm.Expm1, torch.exp_: qm.Exp, torch.sqrt_: qm.Sqrt, torch.abs_: qm.Abs,
    torch.mean: qm.Mean, torch.sum: qm.Sum, torch.prod: qm.Prod, torch.amax: qm.Amax,
    torch.amin: qm.Amin, torch.max: qm.Max, torch.min: qm.Min, torch.norm: qm.Norm,
    torch.cumsum: qm.Cumsum, torch.cumprod: qm.Cumprod, torch.var: qm.Var, torch.std: qm.Std,
    torch.logsumexp: qm.LogSumExp,
    operator.eq: qm.Eq, torch.eq: qm.Eq, operator.ne: qm.Ne, torch.ne: qm.Ne,
    operator.lt: qm.Lt, torch.lt: qm.Lt, operator.le: qm.Le, torch.le: qm.Le,
    operator.gt: qm.Gt, torch.gt: qm.Gt, operator.ge: qm.Ge, torch.ge: qm.Ge,
    torch.logical_not: qm.LogicalNot, torch.logical_and: qm.LogicalAnd, torch.logical_or: qm.LogicalOr,
    operator.and_: qm.BitwiseAnd, operator.iand: qm.BitwiseAnd, operator.or_: qm.BitwiseOr,
    operator.ior: qm.BitwiseOr, operator.xor: qm.BitwiseXor, operator.ixor: qm.BitwiseXor,
    operator.invert: qm.BitwiseNot, torch.bitwise_not: qm.BitwiseNot,
}


def _methods(cls, *names):
    return {name: cls for name in names}


#: Tensor method name -> wrapper class (in-place ``*_`` forms included).
METHOD_TABLE: dict = {
    **_methods(qm.Add, "add", "add_", "__add__", "__radd__", "__iadd__"),
    **_methods(qm.Sub, "sub", "sub_", "subtract", "subtract_", "__sub__", "__rsub__", "__isub__"),
    **_methods(qm.Mul, "mul", "mul_", "multiply", "multiply_", "__mul__", "__rmul__", "__imul__"),
    **_methods(qm.Div, "div", "div_", "divide", "divide_", "true_divide", "true_divide_", "__truediv__", "__rtruediv__"),
    **_methods(qm.FloorDiv, "floor_divide", "floor_divide_"),
    **_methods(qm.Remainder, "remainder", "remainder_"),
    **_methods(qm.Fmod, "fmod", "fmod_"),
    **_methods(qm.Pow, "pow", "pow_", "float_power", "__pow__", "__rpow__"),
    **_methods(qm.Neg, "neg", "neg_", "negative", "__neg__"),
    **_methods(qm.Reciprocal, "reciprocal", "reciprocal_"),
    **_methods(qm.MatMul, "matmul", "__matmul__"),
    **_methods(qm.MM, "mm"), **_methods(qm.BMM, "bmm"), **_methods(qm.Baddbmm, "baddbmm", "baddbmm_"),
    **_methods(qm.Addmm, "addmm", "addmm_"), **_methods(qm.Addcmul, "addcmul", "addcmul_"),
    **_methods(qm.Addcdiv, "addcdiv", "addcdiv_"), **_methods(qm.Lerp, "lerp", "lerp_"),
    **_methods(qm.Where, "where"), **_methods(qm.Clamp, "clamp", "clamp_", "clip", "clip_"),
    **_methods(qm.Maximum, "maximum"), **_methods(qm.Minimum, "minimum"),
    **_methods(qm.MaskedFill, "masked_fill", "masked_fill_"),
    **_methods(qm.Exp, "exp", "exp_"), **_methods(qm.Log, "log", "log_"), **_methods(qm.Log2, "log2"),
    **_methods(qm.Log1p, "log1p"), **_methods(qm.Sqrt, "sqrt", "sqrt_"), **_methods(qm.Rsqrt, "rsqrt", "rsqrt_"),
    **_methods(qm.Abs, "abs", "abs_"), **_methods(qm.Sign, "sign"), **_methods(qm.Square, "square", "square_"),
    **_methods(qm.Floor, "floor"), **_methods(qm.Ceil, "ceil"), **_methods(qm.Round, "round"),
    **_methods(qm.Trunc, "trunc"), **_methods(qm.Erf, "erf"), **_methods(qm.Sin, "sin"), **_methods(qm.Cos, "cos"),
    **_methods(qm.Expm1, "expm1"),
    **_methods(qm.Mean, "mean"), **_methods(qm.Sum, "sum"), **_methods(qm.Prod, "prod"),
    **_methods(qm.Amax, "amax"), **_methods(qm.Amin, "amin"), **_methods(qm.Max, "max"), **_methods(qm.Min, "min"),
    **_methods(qm.Norm, "norm"), **_methods(qm.Cumsum, "cumsum"), **_methods(qm.Cumprod, "cumprod"),
    **_methods(qm.Var, "var"), **_methods(qm.Std, "std"), **_methods(qm.LogSumExp, "logsumexp"),
    **_methods(qm.Eq, "eq", "__eq__"), **_methods(qm.Ne, "ne", "__ne__"), **_methods(qm.Lt, "lt", "__lt__"),
    **_methods(qm.Le, "le", "__le__"), **_methods(qm.Gt, "gt", "__gt__"), **_methods(qm.Ge, "ge", "__ge__"),
    **_methods(qm.LogicalNot, "logical_not"), **_methods(qm.LogicalAnd, "logical_and"),
    **_methods(qm.LogicalOr, "logical_or"), **_methods(qm.BitwiseNot, "bitwise_not"),
}

#: Left as graph nodes by policy: they move or reinterpret data and compute nothing.
DATA_MOVEMENT: frozenset = frozenset({
    # Tensor methods
    "view", "view_as", "reshape", "reshape_as", "permute", "transpose", "transpose_", "t", "contiguous",
    "chunk", "split", "split_with_sizes", "unbind", "flatten", "unflatten", "squeeze", "squeeze_",
    "unsqueeze", "unsqueeze_", "expand", "expand_as", "repeat", "repeat_interleave", "narrow", "select",
    "index_select", "gather", "movedim", "moveaxis", "flip", "roll", "tile", "to", "type", "type_as",
    "float", "double", "half", "bfloat16", "int", "long", "short", "bool", "byte", "char", "detach",
    "detach_", "clone", "cpu", "cuda", "masked_select", "tril", "triu", "diagonal", "unfold", "swapaxes",
    "new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "zero_", "fill_", "copy_",
    "requires_grad_", "as_strided",
    # torch functions / builtins (by name)
    "getitem", "setitem", "getattr", "flatten", "reshape", "permute", "transpose", "squeeze", "unsqueeze",
    "chunk", "split", "unbind", "narrow", "select", "index_select", "gather", "movedim", "flip",
    "roll", "tile", "zeros", "ones", "full", "empty", "arange", "linspace", "zeros_like",
    "ones_like", "full_like", "empty_like", "rand", "randn", "rand_like", "randn_like", "tensor",
    "as_tensor", "tril", "triu", "diagonal", "broadcast_to", "masked_select", "t", "swapaxes",
    "meshgrid", "repeat_interleave", "scalar_tensor", "eye", "clone", "detach", "_assert",
    "_assert_is_none",
})


def _wrapper_for(node: torch.fx.Node):
    if node.op == "call_function":
        return FUNCTION_TABLE.get(node.target) if _hashable(node.target) else None
    if node.op == "call_method":
        return METHOD_TABLE.get(node.target)
    return None


def _hashable(target) -> bool:
    try:
        hash(target)
    except TypeError:
        return False
    return True


def wrap_tensor_ops(gm: torch.fx.GraphModule, config: PrepareConfig) -> PassResult:
    """Replace each tensor-producing op of the tables by a call of its own wrapper module."""
    namer = ModuleNamer(gm)
    changes = []
    tensors: dict = {}  # produces_tensor's memo, shared across the nodes in graph order
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method"):
            continue
        cls = _wrapper_for(node)
        op_text = target_text(node)
        if cls is None:
            changes.extend(_skip_record(node, op_text, config, tensors))
            continue
        if not produces_tensor(node, tensors):
            changes.append(record_change(node, PASS_NAME, SKIPPED, op_text, op_text, reason=REASON_SHAPE))
            continue
        args, kwargs, inputs = call_template(node)
        module = cls(node.target, args, kwargs)  # the callable, or the Tensor method's name
        name = namer.name(module_scope(node), cls.__name__.lower())
        change = record_change(
            node, PASS_NAME, REWRITTEN, op_text, op_text,
            module_name=name, module_type=type_name(module),
        )
        replace_with_module(gm, node, name, module, inputs, PASS_NAME)
        changes.append(change)
    changed = any(c.action == REWRITTEN for c in changes)
    return PassResult(gm, changed, tuple(changes))


def _short_name(node: torch.fx.Node) -> str:
    return node.target if node.op == "call_method" else getattr(node.target, "__name__", "")


def _skip_record(node: torch.fx.Node, op_text: str, config: PrepareConfig, tensors: dict) -> list:
    if handles_functional(node):
        return []  # convert_functionals ran first and reported it
    if _short_name(node) in DATA_MOVEMENT:
        return [record_change(node, PASS_NAME, SKIPPED, op_text, op_text, reason=REASON_DATA_MOVEMENT)]
    if not produces_tensor(node, tensors):
        return [record_change(node, PASS_NAME, SKIPPED, op_text, op_text, reason=REASON_SHAPE)]
    reason = "unsupported op: no wrapper module in the tables (add it to FUNCTION_TABLE/METHOD_TABLE)"
    change = record_change(node, PASS_NAME, SKIPPED, op_text, op_text, reason=reason)
    if config.strict:
        raise RewriteError(f"{PASS_NAME}: cannot rewrite {op_text} ({node.name}) at {change.location or '?'}: {reason}")
    return [change]
