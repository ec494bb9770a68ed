"""Which ``nn`` module reproduces which functional call: data, keyed by the callable.

Each :class:`Spec` lists the functional's parameters with their defaults (so a call is
bound exactly as Python would bind it), which of them are ``forward`` inputs, and a
``build`` function that makes the ``nn`` module from the constant arguments. ``build``
raises :class:`Unconvertible` when the module cannot reproduce the call (a dtype argument
``nn.Softmax`` lacks, a rank it cannot know, a weight computed at run time); the pass
then keeps the exact call in a :class:`qprep.modules.Functional` wrapper and says why.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from qprep.core import meta
from qprep.core._compat import boolean_dispatch_parts
from qprep.core.graph import lookup, member
from qprep.modules import ScaledDotProductAttention
from qprep.passes.functional_params import PARAMETRIC_SPECS
from qprep.passes.functional_spec import Spec, Unconvertible
from qprep.passes.functional_spec import params as _p
from qprep.passes.functional_spec import simple as _simple

__all__ = [
    "FUNCTIONAL_SPECS", "METHOD_SPECS", "WITHOUT_MODULE", "spec_for", "is_functional", "follows_training",
]


def _act(cls, *ctor, **fixed) -> Spec:
    return Spec(cls.__name__, _p("input", *ctor, **_ACT_DEFAULTS), ("input",), _simple(cls, *ctor, **fixed))


_ACT_DEFAULTS = dict(
    inplace=False, alpha=1.0, negative_slope=0.01, min_val=-1.0, max_val=1.0, dim=-1,
    approximate="none", beta=1.0, threshold=20.0, lambd=0.5,
)


def _inplace_only(cls):
    """``x.sigmoid_()``-style calls: the nn module has no in-place form."""

    def build(b, ctx):
        raise Unconvertible(f"nn.{cls.__name__} has no in-place form")

    return Spec(cls.__name__, _p("input"), ("input",), build)


def _softmax(cls, functional: bool = True):
    """``F.softmax(input, dim, _stacklevel, dtype)``; ``torch.softmax``/``x.softmax``
    take ``(input, dim, dtype)``."""

    def build(b, ctx):
        if b["dtype"] is not None:
            raise Unconvertible(f"nn.{cls.__name__} has no dtype argument")
        return cls(dim=b["dim"])

    names = ("input", "dim", "_stacklevel", "dtype") if functional else ("input", "dim", "dtype")
    return Spec(cls.__name__, _p(*names, dim=None, _stacklevel=3, dtype=None), ("input",), build)


#: Dropout modules whose ``forward`` drops the ``inplace`` argument they are built with.
_IGNORES_INPLACE = (nn.AlphaDropout, nn.FeatureAlphaDropout)


def _mode_dependent(cls, training_default: bool, *ctor: str):
    def build(b, ctx):
        if not ctx.follows_training:
            raise Unconvertible(
                f"training={b['training']!r} is fixed in the source, not self.training; "
                f"nn.{cls.__name__} would follow the module's mode instead"
            )
        if b.get("inplace") and issubclass(cls, _IGNORES_INPLACE):
            raise Unconvertible(f"nn.{cls.__name__}'s forward ignores inplace=True")
        return cls(**{name: b[name] for name in ctor})

    params = _p("input", "p", "training", "inplace", p=0.5, training=training_default, inplace=False)
    return Spec(cls.__name__, params, ("input",), build)


def _rrelu():
    def build(b, ctx):
        if not ctx.follows_training:
            raise Unconvertible(f"training={b['training']!r} is fixed in the source, not self.training")
        return nn.RReLU(b["lower"], b["upper"], b["inplace"])

    params = _p("input", "lower", "upper", "training", "inplace", lower=1.0 / 8, upper=1.0 / 3, training=False, inplace=False)
    return Spec("RReLU", params, ("input",), build)


def _pad():
    families = {
        "constant": (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d),
        "reflect": (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d),
        "replicate": (nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d),
        "circular": (nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d),
    }

    def build(b, ctx):
        pad, mode, value = b["pad"], b["mode"], b["value"]
        if not isinstance(pad, (list, tuple)) or len(pad) not in (2, 4, 6) or mode not in families:
            raise Unconvertible(f"no padding module for mode={mode!r} with {len(pad) if isinstance(pad, (list, tuple)) else '?'} pad values")
        cls = families[mode][len(pad) // 2 - 1]
        if mode == "constant":
            return cls(tuple(pad), 0.0 if value is None else value)
        if value is not None:
            raise Unconvertible(f"mode={mode!r} takes no value")
        return cls(tuple(pad))

    return Spec("Pad", _p("input", "pad", "mode", "value", mode="constant", value=None), ("input",), build)


def _interpolate():
    def build(b, ctx):
        if b["antialias"]:
            raise Unconvertible("nn.Upsample has no antialias argument")
        return nn.Upsample(b["size"], b["scale_factor"], b["mode"], b["align_corners"], b["recompute_scale_factor"])

    params = _p("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias",
                size=None, scale_factor=None, mode="nearest", align_corners=None, recompute_scale_factor=None, antialias=False)
    return Spec("Upsample", params, ("input",), build)


def _pool(cls, *names, **defaults):
    return Spec(cls.__name__, _p("input", *names, **defaults), ("input",), _simple(cls, *names))


_MAXPOOL = dict(stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False)
_AVGPOOL = dict(stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None)

_ACTIVATIONS = {
    F.relu: _act(nn.ReLU, "inplace"), F.relu6: _act(nn.ReLU6, "inplace"), F.elu: _act(nn.ELU, "alpha", "inplace"),
    F.selu: _act(nn.SELU, "inplace"), F.celu: _act(nn.CELU, "alpha", "inplace"),
    F.gelu: _act(nn.GELU, "approximate"), F.silu: _act(nn.SiLU, "inplace"), F.mish: _act(nn.Mish, "inplace"),
    F.hardswish: _act(nn.Hardswish, "inplace"), F.hardsigmoid: _act(nn.Hardsigmoid, "inplace"),
    F.hardtanh: _act(nn.Hardtanh, "min_val", "max_val", "inplace"),
    F.leaky_relu: _act(nn.LeakyReLU, "negative_slope", "inplace"), F.glu: _act(nn.GLU, "dim"),
    F.logsigmoid: _act(nn.LogSigmoid), F.softplus: _act(nn.Softplus, "beta", "threshold"),
    F.softshrink: _act(nn.Softshrink, "lambd"), F.hardshrink: _act(nn.Hardshrink, "lambd"),
    F.tanhshrink: _act(nn.Tanhshrink), F.softsign: _act(nn.Softsign),
    F.threshold: Spec("Threshold", _p("input", "threshold", "value", "inplace", inplace=False), ("input",),
                      _simple(nn.Threshold, "threshold", "value", "inplace")),
    F.sigmoid: _act(nn.Sigmoid), F.tanh: _act(nn.Tanh), torch.sigmoid: _act(nn.Sigmoid), torch.tanh: _act(nn.Tanh),
    F.softmax: _softmax(nn.Softmax), F.softmin: _softmax(nn.Softmin), F.log_softmax: _softmax(nn.LogSoftmax),
    torch.softmax: _softmax(nn.Softmax, False), torch.log_softmax: _softmax(nn.LogSoftmax, False),
    F.rrelu: _rrelu(),
    # In-place functional forms.
    torch.relu_: _act(nn.ReLU, inplace=True), F.elu_: _act(nn.ELU, "alpha", inplace=True),
    F.leaky_relu_: _act(nn.LeakyReLU, "negative_slope", inplace=True),
    F.hardtanh_: _act(nn.Hardtanh, "min_val", "max_val", inplace=True), torch.selu_: _act(nn.SELU, inplace=True),
    torch.celu_: _act(nn.CELU, "alpha", inplace=True),
    torch.threshold_: Spec("Threshold", _p("input", "threshold", "value"), ("input",),
                           _simple(nn.Threshold, "threshold", "value", inplace=True)),
    torch.relu: _act(nn.ReLU),
}

_POOLING = {
    F.max_pool1d: _pool(nn.MaxPool1d, "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices", **_MAXPOOL),
    F.max_pool2d: _pool(nn.MaxPool2d, "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices", **_MAXPOOL),
    F.max_pool3d: _pool(nn.MaxPool3d, "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices", **_MAXPOOL),
    F.avg_pool1d: _pool(nn.AvgPool1d, "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", **_AVGPOOL),
    F.avg_pool2d: _pool(nn.AvgPool2d, "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override", **_AVGPOOL),
    F.avg_pool3d: _pool(nn.AvgPool3d, "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override", **_AVGPOOL),
    F.adaptive_avg_pool1d: _pool(nn.AdaptiveAvgPool1d, "output_size"),
    F.adaptive_avg_pool2d: _pool(nn.AdaptiveAvgPool2d, "output_size"),
    F.adaptive_avg_pool3d: _pool(nn.AdaptiveAvgPool3d, "output_size"),
    F.adaptive_max_pool1d: _pool(nn.AdaptiveMaxPool1d, "output_size", "return_indices", return_indices=False),
    F.adaptive_max_pool2d: _pool(nn.AdaptiveMaxPool2d, "output_size", "return_indices", return_indices=False),
    F.adaptive_max_pool3d: _pool(nn.AdaptiveMaxPool3d, "output_size", "return_indices", return_indices=False),
    F.lp_pool1d: _pool(nn.LPPool1d, "norm_type", "kernel_size", "stride", "ceil_mode", stride=None, ceil_mode=False),
    F.lp_pool2d: _pool(nn.LPPool2d, "norm_type", "kernel_size", "stride", "ceil_mode", stride=None, ceil_mode=False),
}

_SHAPE = {
    F.interpolate: _interpolate(),
    F.upsample: Spec("Upsample", _p("input", "size", "scale_factor", "mode", "align_corners", size=None, scale_factor=None,
                                    mode="nearest", align_corners=None), ("input",),
                     _simple(nn.Upsample, "size", "scale_factor", "mode", "align_corners")),
    F.pad: _pad(),
    F.pixel_shuffle: Spec("PixelShuffle", _p("input", "upscale_factor"), ("input",), _simple(nn.PixelShuffle, "upscale_factor")),
    F.pixel_unshuffle: Spec("PixelUnshuffle", _p("input", "downscale_factor"), ("input",), _simple(nn.PixelUnshuffle, "downscale_factor")),
    F.channel_shuffle: Spec("ChannelShuffle", _p("input", "groups"), ("input",), _simple(nn.ChannelShuffle, "groups")),
    torch.flatten: Spec("Flatten", _p("input", "start_dim", "end_dim", start_dim=0, end_dim=-1), ("input",),
                        _simple(nn.Flatten, "start_dim", "end_dim")),
    F.unfold: Spec("Unfold", _p("input", "kernel_size", "dilation", "padding", "stride", dilation=1, padding=0, stride=1),
                   ("input",), _simple(nn.Unfold, "kernel_size", "dilation", "padding", "stride")),
    F.fold: Spec("Fold", _p("input", "output_size", "kernel_size", "dilation", "padding", "stride", dilation=1, padding=0, stride=1),
                 ("input",), _simple(nn.Fold, "output_size", "kernel_size", "dilation", "padding", "stride")),
    F.cosine_similarity: Spec("CosineSimilarity", _p("x1", "x2", "dim", "eps", dim=1, eps=1e-8), ("x1", "x2"),
                              _simple(nn.CosineSimilarity, "dim", "eps")),
    F.pairwise_distance: Spec("PairwiseDistance", _p("x1", "x2", "p", "eps", "keepdim", p=2.0, eps=1e-6, keepdim=False),
                              ("x1", "x2"), _simple(nn.PairwiseDistance, "p", "eps", "keepdim")),
    F.local_response_norm: Spec("LocalResponseNorm", _p("input", "size", "alpha", "beta", "k", alpha=1e-4, beta=0.75, k=1.0),
                                ("input",), _simple(nn.LocalResponseNorm, "size", "alpha", "beta", "k")),
}

def _sdpa():
    """``F.scaled_dot_product_attention``: the math kernel as modules (QKᵀ, scale, mask, softmax,
    dropout, AV), bitwise equal to that kernel."""

    def build(b, ctx):
        return ScaledDotProductAttention(b["dropout_p"], b["is_causal"], b["scale"], b["enable_gqa"])

    params = _p("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa",
                attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False)
    return Spec("ScaledDotProductAttention", params, ("query", "key", "value", "attn_mask"), build)


_ATTENTION = {F.scaled_dot_product_attention: _sdpa()}

_DROPOUT = {
    F.dropout: _mode_dependent(nn.Dropout, True, "p", "inplace"),
    F.dropout1d: _mode_dependent(nn.Dropout1d, True, "p", "inplace"),
    F.dropout2d: _mode_dependent(nn.Dropout2d, True, "p", "inplace"),
    F.dropout3d: _mode_dependent(nn.Dropout3d, True, "p", "inplace"),
    F.alpha_dropout: _mode_dependent(nn.AlphaDropout, False, "p", "inplace"),
    F.feature_alpha_dropout: _mode_dependent(nn.FeatureAlphaDropout, False, "p", "inplace"),
}

def _dispatched(specs: dict) -> dict:
    """``F.max_pool2d(x, 2, return_indices=True)`` is traced as the function the
    ``boolean_dispatch`` picked; map both picks, with ``return_indices`` fixed."""
    out = {}
    for fn, spec in specs.items():
        for pick, indices in zip(boolean_dispatch_parts(fn), (True, False)):
            build = spec.build

            def fixed(b, ctx, build=build, indices=indices):
                return build({**b, "return_indices": indices}, ctx)

            out[pick] = dataclasses.replace(spec, build=fixed)
    return out


def _twin(functional: Callable, params: tuple, rename: dict | None = None, fixed: dict | None = None) -> Spec:
    """The spec of a ``torch.*`` twin of a functional whose arguments have other names or
    order (``torch.batch_norm(input, weight, bias, running_mean, ...)``): bound by its own
    ``params``, renamed to the functional's, and built as the functional's spec builds.
    ``fixed``: arguments the twin has and the module always passes (``cudnn_enabled=True``),
    with the values the conversion requires; ``rename`` values may be ``(name, convert)``."""
    base = FUNCTIONAL_SPECS[functional]
    rename, fixed = rename or {}, fixed or {}

    def name_of(name):
        target = rename.get(name, name)
        return target[0] if isinstance(target, tuple) else target

    def build(b, ctx):
        for name, value in fixed.items():
            if b.get(name) != value:
                raise Unconvertible(f"{name}={b.get(name)!r}; the nn module always passes {value!r}")
        bound = {}
        for name, value in b.items():
            if name in fixed:
                continue
            target = rename.get(name, name)
            if isinstance(target, tuple):
                target, convert = target
                value = convert(value)
            bound[target] = value
        for name, default in base.params:
            bound.setdefault(name, default)
        return base.build(bound, ctx)

    inverse = {name_of(n): n for n, _ in params}
    return Spec(base.module, params, tuple(inverse.get(n, n) for n in base.inputs), build,
                tuple(inverse.get(n, n) for n in base.parametric))


def _no_stride(value):
    return None if isinstance(value, (list, tuple)) and not value else value  # aten's [] is "the kernel size"


_MAX_POOL_TWIN = dict(stride=[], padding=0, dilation=1, ceil_mode=False)

#: ``torch.*`` functions that compute what a functional with a module computes, under other
#: argument names or order: bound by their own signature (aten's), built as the functional.
_TWINS: dict[Callable, tuple] = {
    torch.selu: (F.selu, _p("self"), {"self": "input"}),
    torch.celu: (F.celu, _p("self", "alpha", alpha=1.0), {"self": "input"}),
    torch.max_pool1d: (F.max_pool1d, _p("self", "kernel_size", "stride", "padding", "dilation", "ceil_mode", **_MAX_POOL_TWIN),
                       {"self": "input", "stride": ("stride", _no_stride)}),
    torch.max_pool2d: (F.max_pool2d, _p("self", "kernel_size", "stride", "padding", "dilation", "ceil_mode", **_MAX_POOL_TWIN),
                       {"self": "input", "stride": ("stride", _no_stride)}),
    torch.max_pool3d: (F.max_pool3d, _p("self", "kernel_size", "stride", "padding", "dilation", "ceil_mode", **_MAX_POOL_TWIN),
                       {"self": "input", "stride": ("stride", _no_stride)}),
    torch.dropout: (F.dropout, _p("input", "p", "train"), {"train": "training"}),
    torch.alpha_dropout: (F.alpha_dropout, _p("input", "p", "train"), {"train": "training"}),
    torch.feature_alpha_dropout: (F.feature_alpha_dropout, _p("input", "p", "train"), {"train": "training"}),
    torch.batch_norm: (F.batch_norm, _p("input", "weight", "bias", "running_mean", "running_var", "training", "momentum",
                                        "eps", "cudnn_enabled"), {}, {"cudnn_enabled": True}),
    torch.instance_norm: (F.instance_norm, _p("input", "weight", "bias", "running_mean", "running_var", "use_input_stats",
                                              "momentum", "eps", "cudnn_enabled"), {}, {"cudnn_enabled": True}),
    torch.layer_norm: (F.layer_norm, _p("input", "normalized_shape", "weight", "bias", "eps", "cudnn_enable",
                                        weight=None, bias=None, eps=1e-5, cudnn_enable=True), {}, {"cudnn_enable": True}),
    torch.group_norm: (F.group_norm, _p("input", "num_groups", "weight", "bias", "eps", "cudnn_enabled",
                                        weight=None, bias=None, eps=1e-5, cudnn_enabled=True), {}, {"cudnn_enabled": True}),
    torch.rms_norm: (F.rms_norm, _p("input", "normalized_shape", "weight", "eps", weight=None, eps=None), {}),
    torch.embedding: (F.embedding, _p("weight", "indices", "padding_idx", "scale_grad_by_freq", "sparse",
                                      padding_idx=-1, scale_grad_by_freq=False, sparse=False),
                      {"indices": "input", "padding_idx": ("padding_idx", lambda i: None if i == -1 else i)}),
}


#: callable -> Spec, for ``torch.nn.functional`` functions and their ``torch.*`` twins.
FUNCTIONAL_SPECS: dict[Callable, Spec] = {
    **_ACTIVATIONS, **_POOLING, **_dispatched(_POOLING), **_SHAPE, **_DROPOUT, **PARAMETRIC_SPECS, **_ATTENTION,
}
FUNCTIONAL_SPECS.update({twin: _twin(*entry) for twin, entry in _TWINS.items()})


#: ``torch.ops.aten`` overload packets (what code that calls aten directly records) that are
#: the ``torch.*`` function of the same name, whose arguments aten names the same way.
_ATEN = ("relu", "relu_", "sigmoid", "tanh", "softmax", "log_softmax", "selu", "celu", "hardshrink", "conv1d",
         "conv2d", "conv3d", "layer_norm", "group_norm", "batch_norm", "max_pool2d", "dropout", "embedding",
         "pixel_shuffle", "flatten")
FUNCTIONAL_SPECS.update({getattr(torch.ops.aten, name): FUNCTIONAL_SPECS[getattr(torch, name)] for name in _ATEN})

#: Tensor method name -> Spec (``x.relu()``, ``x.softmax(-1)``, ``x.flatten(1)``).
METHOD_SPECS: dict[str, Spec] = {
    "relu": _act(nn.ReLU), "relu_": _act(nn.ReLU, inplace=True),
    "sigmoid": _act(nn.Sigmoid), "tanh": _act(nn.Tanh),
    "sigmoid_": _inplace_only(nn.Sigmoid), "tanh_": _inplace_only(nn.Tanh),
    "softmax": _softmax(nn.Softmax, False), "log_softmax": _softmax(nn.LogSoftmax, False),
    "flatten": FUNCTIONAL_SPECS[torch.flatten],
}

_NOT_OPS = frozenset({
    "has_torch_function", "has_torch_function_unary", "has_torch_function_variadic",
    "handle_torch_function", "boolean_dispatch", "assert_int_or_pair",
})


def _functionals_without_module() -> frozenset:
    found = set()
    for name, value in vars(F).items():
        if name.startswith("_") or name in _NOT_OPS or isinstance(value, type) or not callable(value):
            continue
        module = getattr(value, "__module__", None)
        if module in (None, "torch.nn.functional", "torch._C._nn", "torch") or type(value).__name__ == "builtin_function_or_method":
            if value not in FUNCTIONAL_SPECS:
                found.add(value)
    return frozenset(found)


#: ``torch.nn.functional`` functions with no ``nn`` module: kept in a Functional wrapper.
WITHOUT_MODULE = _functionals_without_module()


def spec_for(node: torch.fx.Node) -> Spec | None:
    """The table entry for a functional call or its ``Tensor`` method twin, if any."""
    if node.op == "call_function":
        return lookup(FUNCTIONAL_SPECS, node.target)
    if node.op == "call_method":
        return METHOD_SPECS.get(node.target)
    return None


def follows_training(node: torch.fx.Node) -> bool:
    """Whether a bool argument of this call is its scope module's ``self.training``."""
    return bool(meta.fact(node, meta.FOLLOWS_TRAINING))


def is_functional(node: torch.fx.Node) -> bool:
    """Whether ``convert_functionals`` owns ``node`` (converts it or keeps it in an exact
    wrapper): a functional or twin in the tables, a ``torch.nn.functional`` function with no
    module, or any call whose bool argument follows ``self.training`` (its wrapper passes its
    own mode, so the prepared model follows ``.train()``)."""
    return (spec_for(node) is not None
            or (node.op == "call_function" and member(WITHOUT_MODULE, node.target))
            or follows_training(node))
