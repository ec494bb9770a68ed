"""The tensor-op tables of :mod:`qprep.passes.wrap_tensor_ops`: data, keyed by the callable
(or by the ``Tensor`` method's name), and what is left alone as data movement."""

from __future__ import annotations

import operator

import torch
import torch.nn.utils.rnn as rnn_utils

from qprep import modules as qm
from qprep.core._compat import assert_is_none, enter_autocast, exit_autocast, set_grad_enabled, switch_grad_mode
from qprep.core.guards import update_buffer
from qprep.core.runtime import rebuild_object

__all__ = ["FUNCTION_TABLE", "METHOD_TABLE", "DATA_MOVEMENT_METHODS", "DATA_MOVEMENT_FUNCTIONS"]

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
    operator.setitem: qm.SetItem,
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

#: Tensor methods left as graph nodes by policy: they move or reinterpret data and compute nothing.
DATA_MOVEMENT_METHODS: frozenset = frozenset({
    "view", "view_as", "reshape", "reshape_as", "permute", "transpose", "transpose_", "t", "contiguous",
    "chunk", "split", "split_with_sizes", "unbind", "unflatten", "squeeze", "squeeze_",
    "unsqueeze", "unsqueeze_", "expand", "expand_as", "repeat", "repeat_interleave", "narrow", "select",
    "index_select", "gather", "movedim", "moveaxis", "flip", "roll", "tile", "to", "type", "type_as",
    "float", "double", "half", "bfloat16", "int", "long", "short", "bool", "byte", "char", "detach",
    "detach_", "clone", "cpu", "cuda", "masked_select", "tril", "triu", "diagonal", "unfold", "swapaxes",
    "new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "zero_", "fill_", "copy_",
    "requires_grad_", "as_strided",
})

#: Functions left as graph nodes by policy (matched by identity): indexing, views, factories.
DATA_MOVEMENT_FUNCTIONS: frozenset = frozenset({
    operator.getitem, getattr, torch._assert, rebuild_object, update_buffer,
    *(getattr(torch, name) for name in ("_check", "_check_with", "_check_tensor_all", "_check_tensor_all_with")
      if hasattr(torch, name)),  # runtime checks (transformers' torch_compilable_check): no compute
    torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.chunk, torch.split,
    torch.unbind, torch.narrow, torch.select, torch.index_select, torch.gather, torch.movedim, torch.flip,
    torch.roll, torch.tile, torch.tril, torch.triu, torch.diagonal, torch.broadcast_to, torch.masked_select,
    torch.t, torch.swapaxes, torch.meshgrid, torch.repeat_interleave, torch.clone, torch.detach,
    torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.linspace, torch.eye,
    torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, torch.rand, torch.randn,
    torch.rand_like, torch.randn_like, torch.tensor, torch.as_tensor, torch.scalar_tensor,
    # a grad-mode switch (torch.no_grad() in forward), entering or leaving autocast: they compute nothing
    assert_is_none, set_grad_enabled, switch_grad_mode, enter_autocast, exit_autocast,
    # packing and padding reorganise sequences: data movement
    rnn_utils.pack_padded_sequence, rnn_utils.pad_packed_sequence, rnn_utils.pack_sequence, rnn_utils.pad_sequence,
    rnn_utils.unpack_sequence, rnn_utils.unpad_sequence,
})
