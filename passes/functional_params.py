"""Functionals that take their weights from the model (``F.linear``, ``F.conv2d``,
``F.batch_norm``, ...): their ``nn`` modules are built on the meta device and then hold the
model's own Parameter and buffer objects (no copies)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from qprep.passes.functional_spec import BuildContext, Spec, Unconvertible, by_rank
from qprep.passes.functional_spec import params as _p

__all__ = ["PARAMETRIC_SPECS"]


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
    cls = by_rank({2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}, ctx, "BatchNorm")
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
    cls = by_rank({3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d, 5: nn.InstanceNorm3d}, ctx, "InstanceNorm")
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



#: callable -> Spec for the functionals with model weights.
PARAMETRIC_SPECS = {
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
