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
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._compat import boolean_dispatch_parts

__all__ = ["Spec", "Unconvertible", "BuildContext", "FUNCTIONAL_SPECS", "METHOD_SPECS", "REQUIRED"]

REQUIRED = object()


class Unconvertible(Exception):
    """The call has no exact ``nn`` module equivalent; the message says why."""


@dataclasses.dataclass
class BuildContext:
    """What a builder may consult: the parameter objects behind ``get_attr`` arguments,
    the input's rank when example inputs were run, whether ``training`` follows the
    module's mode, and where to record adopted parameters."""

    attrs: dict[str, Any]  # parameter name -> the tensor object (or None) behind it
    rank: int | None
    follows_training: bool
    adopted: dict[str, Any] = dataclasses.field(default_factory=dict)  # module attr -> get_attr node
    private: list[str] = dataclasses.field(default_factory=list)  # module state qprep added


@dataclasses.dataclass(frozen=True)
class Spec:
    module: str  # the nn class it makes, for reports and tests
    params: tuple[tuple[str, Any], ...]
    inputs: tuple[str, ...]
    build: Callable[[dict, BuildContext], nn.Module]
    parametric: tuple[str, ...] = ()  # parameters taken from the model (get_attr)


def _p(*names: str, **defaults: Any) -> tuple[tuple[str, Any], ...]:
    return tuple((n, defaults.get(n, REQUIRED)) for n in names)


def _simple(cls: type, *ctor: str, **fixed: Any) -> Callable:
    def build(b: dict, ctx: BuildContext) -> nn.Module:
        return cls(**{name: b[name] for name in ctor}, **fixed)

    return build


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


def _mode_dependent(cls, training_default: bool, *ctor: str):
    def build(b, ctx):
        if not ctx.follows_training:
            raise Unconvertible(
                f"training={b['training']!r} is fixed in the source, not self.training; "
                f"nn.{cls.__name__} would follow the module's mode instead"
            )
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


def _by_rank(classes: dict[int, type], ctx: BuildContext, what: str) -> type:
    if ctx.rank is None:
        raise Unconvertible(f"the input's rank is unknown, so the {what} class is (pass example_inputs)")
    if ctx.rank not in classes:
        raise Unconvertible(f"no {what} module for {ctx.rank}-D input")
    return classes[ctx.rank]


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


# -- functionals that take their weights from the model ----------------------------------------
def _adopt(module: nn.Module, name: str, value: Any) -> None:
    """Make ``module.<name>`` the very object ``value`` (a Parameter, a buffer or None)."""
    if value is None:
        if name in module._parameters:
            module._parameters[name] = None
        return
    if isinstance(value, nn.Parameter):
        setattr(module, name, value)
        return
    if name in module._parameters:
        del module._parameters[name]
    module.register_buffer(name, value)


def _weights(module: nn.Module, ctx: BuildContext, b: dict, *names: str) -> nn.Module:
    for name in names:
        if b.get(name) is not None and ctx.attrs.get(name) is None:
            raise Unconvertible(f"{name} is computed at run time, not a parameter or buffer of the model")
        _adopt(module, name, ctx.attrs.get(name))
        if ctx.attrs.get(name) is not None:
            ctx.adopted[name] = b[name]
    return module


def _linear(b, ctx):
    w = ctx.attrs.get("weight")
    if w is None:
        raise Unconvertible("weight is computed at run time, not a parameter of the model")
    m = nn.Linear(w.shape[1], w.shape[0], bias=b["bias"] is not None, device="meta")
    return _weights(m, ctx, b, "weight", "bias")


def _conv(cls, transpose: bool):
    def build(b, ctx):
        w = ctx.attrs.get("weight")
        if w is None:
            raise Unconvertible("weight is computed at run time, not a parameter of the model")
        g = b["groups"]
        ins, outs = (w.shape[0], w.shape[1] * g) if transpose else (w.shape[1] * g, w.shape[0])
        extra = dict(output_padding=b["output_padding"]) if transpose else {}
        m = cls(ins, outs, tuple(w.shape[2:]), stride=b["stride"], padding=b["padding"], dilation=b["dilation"],
                groups=g, bias=b["bias"] is not None, device="meta", **extra)
        return _weights(m, ctx, b, "weight", "bias")

    names = ("input", "weight", "bias", "stride", "padding") + (("output_padding", "groups", "dilation") if transpose else ("dilation", "groups"))
    return Spec(cls.__name__, _p(*names, bias=None, stride=1, padding=0, dilation=1, groups=1, output_padding=0),
                ("input",), build, ("weight", "bias"))


def _affine(b: dict, *names: str) -> bool:
    given = [b[n] is not None for n in names]
    if any(given) and not all(given):
        raise Unconvertible(f"only some of {', '.join(names)} given; the nn module has them all or none")
    return all(given)


def _batch_norm(b, ctx):
    affine = _affine(b, "weight", "bias")
    stats = _affine(b, "running_mean", "running_var")
    cls = _by_rank({2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}, ctx, "BatchNorm")
    if stats:
        if not ctx.follows_training or b["momentum"] is None:
            raise Unconvertible("training is fixed in the source (nn.BatchNorm follows the module's mode)")
        if ctx.attrs.get("running_mean") is None:
            raise Unconvertible("running statistics are computed at run time")
        num = ctx.attrs["running_mean"].shape[0]
    else:
        if b["training"] is not True or ctx.follows_training:
            raise Unconvertible("batch statistics without running statistics only match with training=True fixed")
        num = ctx.attrs["weight"].shape[0] if affine and ctx.attrs.get("weight") is not None else 0
    m = cls(num, eps=b["eps"], momentum=b["momentum"], affine=affine, track_running_stats=stats, device="meta")
    if stats:  # the functional call keeps no step count: a fresh counter, hidden from state_dict
        m.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        ctx.private.append("num_batches_tracked")
    return _weights(m, ctx, b, "weight", "bias", "running_mean", "running_var")


def _layer_norm(b, ctx):
    if b["weight"] is None and b["bias"] is not None:
        raise Unconvertible("bias without weight; nn.LayerNorm cannot hold that")
    m = nn.LayerNorm(b["normalized_shape"], eps=b["eps"], elementwise_affine=b["weight"] is not None,
                     bias=b["bias"] is not None, device="meta")
    return _weights(m, ctx, b, "weight", "bias")


def _rms_norm(b, ctx):
    m = nn.RMSNorm(b["normalized_shape"], eps=b["eps"], elementwise_affine=b["weight"] is not None, device="meta")
    return _weights(m, ctx, b, "weight")


def _group_norm(b, ctx):
    affine = _affine(b, "weight", "bias")
    if affine and ctx.attrs.get("weight") is not None:
        channels = ctx.attrs["weight"].shape[0]
    else:
        raise Unconvertible("the channel count is only known from an affine weight")
    m = nn.GroupNorm(b["num_groups"], channels, eps=b["eps"], affine=affine, device="meta")
    return _weights(m, ctx, b, "weight", "bias")


def _instance_norm(b, ctx):
    if b["running_mean"] is not None or b["running_var"] is not None or b["use_input_stats"] is not True:
        raise Unconvertible("instance norm with running statistics follows rules nn.InstanceNorm cannot reproduce")
    affine = _affine(b, "weight", "bias")
    cls = _by_rank({3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d, 5: nn.InstanceNorm3d}, ctx, "InstanceNorm")
    if not affine:
        raise Unconvertible("the channel count is only known from an affine weight")
    m = cls(ctx.attrs["weight"].shape[0], eps=b["eps"], momentum=b["momentum"], affine=True, track_running_stats=False, device="meta")
    return _weights(m, ctx, b, "weight", "bias")


def _embedding(b, ctx):
    w = ctx.attrs.get("weight")
    if w is None:
        raise Unconvertible("weight is computed at run time, not a parameter of the model")
    m = nn.Embedding(w.shape[0], w.shape[1], padding_idx=b["padding_idx"], max_norm=b["max_norm"],
                     norm_type=b["norm_type"], scale_grad_by_freq=b["scale_grad_by_freq"], sparse=b["sparse"], device="meta")
    return _weights(m, ctx, b, "weight")


def _prelu(b, ctx):
    w = ctx.attrs.get("weight")
    if w is None:
        raise Unconvertible("weight is computed at run time, not a parameter of the model")
    return _weights(nn.PReLU(w.numel(), device="meta"), ctx, b, "weight")


def _bilinear(b, ctx):
    w = ctx.attrs.get("weight")
    if w is None:
        raise Unconvertible("weight is computed at run time, not a parameter of the model")
    m = nn.Bilinear(w.shape[1], w.shape[2], w.shape[0], bias=b["bias"] is not None, device="meta")
    return _weights(m, ctx, b, "weight", "bias")


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

_DROPOUT = {
    F.dropout: _mode_dependent(nn.Dropout, True, "p", "inplace"),
    F.dropout1d: _mode_dependent(nn.Dropout1d, True, "p", "inplace"),
    F.dropout2d: _mode_dependent(nn.Dropout2d, True, "p", "inplace"),
    F.dropout3d: _mode_dependent(nn.Dropout3d, True, "p", "inplace"),
    F.alpha_dropout: _mode_dependent(nn.AlphaDropout, False, "p", "inplace"),
    F.feature_alpha_dropout: _mode_dependent(nn.FeatureAlphaDropout, False, "p", "inplace"),
}

_PARAMETRIC = {
    F.linear: Spec("Linear", _p("input", "weight", "bias", bias=None), ("input",), _linear, ("weight", "bias")),
    F.bilinear: Spec("Bilinear", _p("input1", "input2", "weight", "bias", bias=None), ("input1", "input2"), _bilinear, ("weight", "bias")),
    F.conv1d: _conv(nn.Conv1d, False), F.conv2d: _conv(nn.Conv2d, False), F.conv3d: _conv(nn.Conv3d, False),
    F.conv_transpose1d: _conv(nn.ConvTranspose1d, True), F.conv_transpose2d: _conv(nn.ConvTranspose2d, True),
    F.conv_transpose3d: _conv(nn.ConvTranspose3d, True),
    F.batch_norm: Spec("BatchNorm", _p("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps",
                                       weight=None, bias=None, training=False, momentum=0.1, eps=1e-5),
                       ("input",), _batch_norm, ("running_mean", "running_var", "weight", "bias")),
    F.layer_norm: Spec("LayerNorm", _p("input", "normalized_shape", "weight", "bias", "eps", weight=None, bias=None, eps=1e-5),
                       ("input",), _layer_norm, ("weight", "bias")),
    F.rms_norm: Spec("RMSNorm", _p("input", "normalized_shape", "weight", "eps", weight=None, eps=None), ("input",), _rms_norm, ("weight",)),
    F.group_norm: Spec("GroupNorm", _p("input", "num_groups", "weight", "bias", "eps", weight=None, bias=None, eps=1e-5),
                       ("input",), _group_norm, ("weight", "bias")),
    F.instance_norm: Spec("InstanceNorm", _p("input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps",
                                             running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                                             momentum=0.1, eps=1e-5), ("input",), _instance_norm, ("running_mean", "running_var", "weight", "bias")),
    F.embedding: Spec("Embedding", _p("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse",
                                      padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False, sparse=False),
                      ("input",), _embedding, ("weight",)),
    F.prelu: Spec("PReLU", _p("input", "weight"), ("input",), _prelu, ("weight",)),
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


#: callable -> Spec, for ``torch.nn.functional`` functions and their ``torch.*`` twins.
FUNCTIONAL_SPECS: dict[Callable, Spec] = {
    **_ACTIVATIONS, **_POOLING, **_dispatched(_POOLING), **_SHAPE, **_DROPOUT, **_PARAMETRIC,
}

#: Tensor method name -> Spec (``x.relu()``, ``x.softmax(-1)``, ``x.flatten(1)``).
METHOD_SPECS: dict[str, Spec] = {
    "relu": _act(nn.ReLU), "relu_": _act(nn.ReLU, inplace=True),
    "sigmoid": _act(nn.Sigmoid), "tanh": _act(nn.Tanh),
    "sigmoid_": _inplace_only(nn.Sigmoid), "tanh_": _inplace_only(nn.Tanh),
    "softmax": _softmax(nn.Softmax, False), "log_softmax": _softmax(nn.LogSoftmax, False),
    "flatten": FUNCTIONAL_SPECS[torch.flatten],
}
