"""qprep's modules: wrappers for tensor ops and modular versions of compound ``torch.nn`` modules."""

from . import ops
from .base import Input, TensorOp
from .ops import (
    Add, Sub, Mul, Div, FloorDiv, Remainder, Fmod, Pow, Neg, Reciprocal, MatMul, MM, BMM,
    Baddbmm, Addmm, Addbmm, Addcmul, Addcdiv, Einsum, Lerp, Cat, Stack, Where, Clamp, Maximum,
    Minimum, MaskedFill, Exp, Log, Log2, Log1p, Sqrt, Rsqrt, Abs, Sign, Square, Floor, Ceil,
    Round, Trunc, Erf, Sin, Cos, Atan2, Expm1, Mean, Sum, Prod, Amax, Amin, Max, Min, Norm,
    Cumsum, Cumprod, Var, Std, LogSumExp, Eq, Ne, Lt, Le, Gt, Ge, LogicalNot,
    LogicalAnd, LogicalOr, BitwiseAnd, BitwiseOr, BitwiseXor, BitwiseNot, SetItem, Functional,
)
from .attention import ModularMultiheadAttention, SafeSoftmax, ScaledDotProductAttention, SlicedLinear
from .rnn import ModularGRU, ModularGRUCell, ModularLSTM, ModularLSTMCell, ModularRecurrentLayer, ModularRNN, ModularRNNCell

#: Every module type qprep makes: the tracer keeps them as leaves (they are prepared already).
MODULE_TYPES: tuple[type, ...] = (
    TensorOp, ModularLSTMCell, ModularGRUCell, ModularRNNCell, ModularRecurrentLayer, ModularLSTM, ModularGRU,
    ModularRNN, ModularMultiheadAttention, SlicedLinear, SafeSoftmax, ScaledDotProductAttention,
)

__all__ = [
    "MODULE_TYPES",
    "Input", "TensorOp", *ops.__all__,
    "ModularLSTMCell", "ModularGRUCell", "ModularRNNCell", "ModularRecurrentLayer", "ModularLSTM", "ModularGRU", "ModularRNN",
    "ModularMultiheadAttention", "SlicedLinear", "SafeSoftmax", "ScaledDotProductAttention",
]
