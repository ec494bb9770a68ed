"""Wrapper modules for tensor ops that have no ``torch.nn`` module.

One class per op. Each reproduces the user's call exactly (see :mod:`qprep.modules.base`);
built directly, each computes its plain form: ``Add()(x, y) == x + y``,
``MatMul()(a, b) == a @ b``, ``Cat(dim=1)(a, b) == torch.cat([a, b], dim=1)``.
Class names never shadow ``torch.nn`` classes.
"""

from __future__ import annotations

import operator

import torch

from .base import TensorOp, _inplace_ops

__all__ = [
    "Add", "Sub", "Mul", "Div", "FloorDiv", "Remainder", "Fmod", "Pow", "Neg", "Reciprocal",
    "MatMul", "MM", "BMM", "Baddbmm", "Addmm", "Addbmm", "Addcmul", "Addcdiv", "Einsum", "Lerp",
    "Cat", "Stack", "Where", "Clamp", "Maximum", "Minimum", "MaskedFill",
    "Exp", "Log", "Log2", "Log1p", "Sqrt", "Rsqrt", "Abs", "Sign", "Square", "Floor", "Ceil",
    "Round", "Trunc", "Erf", "Sin", "Cos", "Atan2", "Expm1",
    "Mean", "Sum", "Prod", "Amax", "Amin", "Max", "Min", "Norm", "Cumsum", "Cumprod", "Var",
    "Std", "LogSumExp",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "LogicalNot", "LogicalAnd", "LogicalOr", "BitwiseAnd",
    "BitwiseOr", "BitwiseXor", "BitwiseNot", "SetItem",
    "Functional",
]


def _op(name: str, default_call, arg_names=("input", "other"), inplace=(), doc="", pack=False):
    attrs = {
        "default_call": default_call,
        "arg_names": tuple(arg_names),
        "inplace_calls": _inplace_ops(*inplace),
        "pack_inputs": pack,
        "__doc__": doc or f"Wraps ``{name.lower()}``; see :class:`qprep.modules.base.TensorOp`.",
        "__module__": __name__,
        "__qualname__": name,
    }
    return type(name, (TensorOp,), attrs)


# Arithmetic (operators, their reflected and in-place forms, torch.* and Tensor methods).
Add = _op("Add", operator.add, inplace=("iadd",), doc="``x + y``, ``torch.add``, ``x.add(_)``, ``x += y``.")
Sub = _op("Sub", operator.sub, inplace=("isub",), doc="``x - y``, ``1 - x``, ``torch.sub``/``rsub``, ``x -= y``.")
Mul = _op("Mul", operator.mul, inplace=("imul",), doc="``x * y``, ``torch.mul``, ``x *= y``.")
Div = _op("Div", operator.truediv, inplace=("itruediv",), doc="``x / y``, ``torch.div``, ``x /= y``.")
FloorDiv = _op("FloorDiv", operator.floordiv, inplace=("ifloordiv",), doc="``x // y``, ``torch.floor_divide``.")
Remainder = _op("Remainder", operator.mod, inplace=("imod",), doc="``x % y``, ``torch.remainder``.")
Fmod = _op("Fmod", torch.fmod, doc="``torch.fmod``.")
Pow = _op("Pow", operator.pow, arg_names=("input", "exponent"), inplace=("ipow",), doc="``x ** y``, ``2 ** x``, ``torch.pow``.")
Neg = _op("Neg", operator.neg, arg_names=("input",), doc="``-x``, ``torch.neg``.")
Reciprocal = _op("Reciprocal", torch.reciprocal, arg_names=("input",))
Maximum = _op("Maximum", torch.maximum)
Minimum = _op("Minimum", torch.minimum)
Atan2 = _op("Atan2", torch.atan2)
Lerp = _op("Lerp", torch.lerp, arg_names=("input", "end", "weight"))

# Products.
MatMul = _op("MatMul", operator.matmul, doc="``a @ b``, ``torch.matmul``.")
MM = _op("MM", torch.mm, arg_names=("input", "mat2"))
BMM = _op("BMM", torch.bmm, arg_names=("input", "mat2"))
Baddbmm = _op("Baddbmm", torch.baddbmm, arg_names=("input", "batch1", "batch2"))
Addmm = _op("Addmm", torch.addmm, arg_names=("input", "mat1", "mat2"))
Addbmm = _op("Addbmm", torch.addbmm, arg_names=("input", "batch1", "batch2"))
Addcmul = _op("Addcmul", torch.addcmul, arg_names=("input", "tensor1", "tensor2"))
Addcdiv = _op("Addcdiv", torch.addcdiv, arg_names=("input", "tensor1", "tensor2"))
Einsum = _op("Einsum", torch.einsum, arg_names=("equation",))

# Joining and selecting.
Cat = _op("Cat", torch.cat, arg_names=("tensors", "dim"), pack=True, doc="``torch.cat``; built directly, ``Cat(dim=1)(a, b)``.")
Stack = _op("Stack", torch.stack, arg_names=("tensors", "dim"), pack=True, doc="``torch.stack``.")
Where = _op("Where", torch.where, arg_names=("condition", "input", "other"))
Clamp = _op("Clamp", torch.clamp, arg_names=("input", "min", "max"))
MaskedFill = _op("MaskedFill", torch.masked_fill, arg_names=("input", "mask", "value"))

# Element-wise math.
_UNARY = {}
for _name, _fn in [
    ("Exp", torch.exp), ("Log", torch.log), ("Log2", torch.log2), ("Log1p", torch.log1p),
    ("Sqrt", torch.sqrt), ("Rsqrt", torch.rsqrt), ("Abs", torch.abs), ("Sign", torch.sign),
    ("Square", torch.square), ("Floor", torch.floor), ("Ceil", torch.ceil), ("Round", torch.round),
    ("Trunc", torch.trunc), ("Erf", torch.erf), ("Sin", torch.sin), ("Cos", torch.cos),
    ("Expm1", torch.expm1), ("LogicalNot", torch.logical_not), ("BitwiseNot", torch.bitwise_not),
]:
    _UNARY[_name] = _op(_name, _fn, arg_names=("input",))
Exp, Log, Log2, Log1p, Sqrt, Rsqrt, Abs, Sign, Square, Floor, Ceil, Round, Trunc, Erf, Sin, Cos, Expm1, LogicalNot, BitwiseNot = _UNARY.values()

# Reductions and scans.
_REDUCE = {}
for _name, _fn in [
    ("Mean", torch.mean), ("Sum", torch.sum), ("Prod", torch.prod), ("Amax", torch.amax),
    ("Amin", torch.amin), ("Max", torch.max), ("Min", torch.min), ("Norm", torch.norm),
    ("Cumsum", torch.cumsum), ("Cumprod", torch.cumprod), ("Var", torch.var), ("Std", torch.std),
    ("LogSumExp", torch.logsumexp),
]:
    _REDUCE[_name] = _op(_name, _fn, arg_names=("input", "dim"))
Mean, Sum, Prod, Amax, Amin, Max, Min, Norm, Cumsum, Cumprod, Var, Std, LogSumExp = _REDUCE.values()

# Comparisons and logic (wrapped where they feed compute, e.g. a mask).
Eq = _op("Eq", operator.eq)
Ne = _op("Ne", operator.ne)
Lt = _op("Lt", operator.lt)
Le = _op("Le", operator.le)
Gt = _op("Gt", operator.gt)
Ge = _op("Ge", operator.ge)
LogicalAnd = _op("LogicalAnd", torch.logical_and)
LogicalOr = _op("LogicalOr", torch.logical_or)
BitwiseAnd = _op("BitwiseAnd", operator.and_, inplace=("iand",))
BitwiseOr = _op("BitwiseOr", operator.or_, inplace=("ior",))
BitwiseXor = _op("BitwiseXor", operator.xor, inplace=("ixor",))

# Indexed assignment: y[:, 0] = v updates y in place, as eager mode does.
SetItem = _op("SetItem", operator.setitem, arg_names=("input", "index", "value"), inplace=("setitem",),
              doc="``y[index] = value`` (``operator.setitem``): updates ``y`` in place.")

# A torch.nn.functional call that has no nn module with the same semantics (F.normalize, ...).
Functional = _op("Functional", None, arg_names=("input",), doc="An exact call of a function no dedicated module reproduces (``F.normalize``, ``torch.topk``, a user's function); the function is shown in ``extra_repr``.")

del _name, _fn
