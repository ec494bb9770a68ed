"""A modular ``nn.MultiheadAttention`` whose every op is a named submodule, bit for bit.

``nn.MultiheadAttention`` runs its projections, matmuls, scaling and softmax inside one
functional call, out of a module-level quantizer's sight. :class:`ModularMultiheadAttention`
runs the same ops, in the same order and call forms, as named submodules:

=========================  ======================================================================
``q_proj`` ``k_proj``      :class:`SlicedLinear` input projections; on the packed weight also
``v_proj``                 ``kv_proj`` (rows ``E:3E``, used when ``key is value``) and ``qkv_proj``
                           (all rows, used when ``query is key is value``): torch runs one GEMM
                           per group there, and a wider GEMM does not round like its slices.
``*_mask_fill``            ``MaskedFill``: a boolean mask becomes a float ``-inf`` mask.
``cat_bias_k/_v``          ``Cat``: ``add_bias_kv``; ``cat_zero_attn_k/_v``: ``add_zero_attn``.
``mask_merge``             ``Add``: ``attn_mask + key_padding_mask``.
``scale`` ``qk_bmm``       ``need_weights=True`` (torch's explicit path): ``q * sqrt(1/head_dim)``,
``qk_baddbmm``             ``bmm(q, k^T)`` or, with a mask, ``baddbmm(mask, q, k^T)`` (a fused add:
``softmax`` ``av_bmm``     ``bmm`` then ``+`` rounds differently once ``head_dim >= 256``),
``head_mean``              ``nn.Softmax``, ``bmm(attn, v)``, the mean over heads.
``sdpa_*``                 ``need_weights=False``: SDPA's math kernel spelled out: ``q`` and ``k^T``
                           each times ``scale ** 0.5``, ``matmul``, mask ``Add``,
                           :class:`SafeSoftmax`, ``matmul``.
``attn_dropout``           ``nn.Dropout`` on the attention weights (both paths).
``out_proj``               ``nn.Linear`` holding the original ``out_proj`` Parameters.
=========================  ======================================================================

Reshapes, transposes, ``pad`` and ``repeat`` stay plain tensor code.

**Parameters.** The original Parameter objects stay registered under their original names
(``in_proj_weight``, ``in_proj_bias``, ``q_proj_weight``, ``bias_k``, ``out_proj.weight``,
...), never copied. A row of a packed weight cannot be a Parameter of its own without
cutting it from the optimizer and ``.grad`` of ``in_proj_weight``, and an ``nn.Linear``
whose ``weight`` is a view invites a quantizer to replace (copy) it. So each projection is
a :class:`SlicedLinear` that registers the *whole* original Parameter (``packed_weight``,
an alias hidden by :func:`qprep.core.aliases.hide_aliases`) plus the rows it uses; its
``weight``/``bias`` properties are views of those rows, so gradients reach the original.
``state_dict()`` keys are exactly torch's, and checkpoints load with ``strict=True`` both ways.

**Numerics** (float32, CPU, torch 2.14.1):

* Bitwise equal, outputs and gradients (of inputs and Parameters), wherever torch runs
  ``F.multi_head_attention_forward``: always with ``need_weights=True``; with
  ``need_weights=False`` where its SDPA call picks the math kernel (dropout in training, or
  under ``sdpa_kernel(SDPBackend.MATH)``). Checked on every combination of bias,
  ``add_bias_kv``, ``add_zero_attn``, kdim/vdim, ``batch_first``, unbatched input,
  self/key-is-value/cross attention, bool/float/3-D attention and padding masks and
  ``is_causal`` (8,512 cases, eval and training with dropout).
* Bounded where torch calls a fused kernel; max abs difference measured over embed dims 8
  to 64, 2 to 8 heads, lengths 1 to 33, N(0, 1) inputs and biases (bound tested in brackets):
  SDPA's CPU flash kernel (``need_weights=False`` without dropout): 9.5e-7 [2e-6]; torch's
  fast path ``torch._native_multi_head_attention`` (eval, no grad, batched ``batch_first``
  self-attention, packed weights with bias, even heads, boolean or no masks): output
  4.8e-7 [2e-6], weights 1.2e-7 [5e-7].
* A row whose keys are all masked: NaN with ``need_weights=True`` (as in torch), 0 with
  ``need_weights=False`` (as SDPA; torch's fast path gives NaN there).

The forward branches on tensor identity (``query is key``) and on shapes, as torch's does:
keep it a leaf when tracing symbolically.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from ..core.aliases import hide_aliases
from ..core.template import Input
from .ops import Add, BMM, Baddbmm, Cat, Functional, LogicalNot, MaskedFill, MatMul, Mean, Mul

__all__ = ["SlicedLinear", "SafeSoftmax", "ModularMultiheadAttention"]

_NEG_INF = float("-inf")
# Parameters registered on nn.MultiheadAttention itself (None where absent), in its order.
_OWN_PARAMETERS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "bias_k", "bias_v")


class SlicedLinear(nn.Module):
    """``F.linear(x, weight, bias)`` where ``weight``/``bias`` are rows of Parameters it shares.

    Args:
        packed_weight: the original weight Parameter (e.g. ``in_proj_weight``), registered
            here as is; ``weight`` is its rows ``weight_rows = (start, stop)``, a view.
        packed_bias: the original bias Parameter or ``None``; ``bias`` is its rows
            ``bias_rows`` (default: ``weight_rows``).
    """

    def __init__(self, packed_weight: nn.Parameter, packed_bias: nn.Parameter | None, weight_rows: tuple[int, int], bias_rows: tuple[int, int] | None = None):
        super().__init__()
        self.register_parameter("packed_weight", packed_weight)
        self.register_parameter("packed_bias", packed_bias)
        self.weight_rows = _check_rows(weight_rows, packed_weight.shape[0], "weight_rows")
        if packed_bias is None:
            self.bias_rows = None
        else:
            self.bias_rows = _check_rows(self.weight_rows if bias_rows is None else bias_rows, packed_bias.shape[0], "bias_rows")
        self.in_features = packed_weight.shape[1]
        self.out_features = self.weight_rows[1] - self.weight_rows[0]

    @property
    def weight(self) -> torch.Tensor:
        return _rows(self.packed_weight, self.weight_rows)

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.packed_bias is None else _rows(self.packed_bias, self.bias_rows)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        rows = f", bias_rows={self.bias_rows}" if self.bias_rows not in (None, self.weight_rows) else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.packed_bias is not None}, weight_rows={self.weight_rows}{rows}"


def _check_rows(rows, size: int, name: str) -> tuple[int, int]:
    start, stop = (int(r) for r in rows)
    if not 0 <= start < stop <= size:
        raise ValueError(f"SlicedLinear: {name}={tuple(rows)} is not a non-empty range of the {size} rows")
    return start, stop


def _rows(tensor: torch.Tensor, rows: tuple[int, int]) -> torch.Tensor:
    start, stop = rows
    return tensor if (start, stop) == (0, tensor.shape[0]) else tensor[start:stop]


class SafeSoftmax(nn.Module):
    """``aten._safe_softmax``, SDPA's math-kernel softmax: a row that is all ``-inf`` gives 0.

    Bitwise equal to it in value and gradient; the softmax itself is the child ``softmax``.
    """

    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim
        self.softmax = nn.Softmax(dim=dim)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        masked_rows = input.amax(self.dim, keepdim=True).eq(_NEG_INF)
        if not masked_rows.any():  # the common case; the fills below would change nothing
            return self.softmax(input)
        # Filling masked rows before the softmax keeps their gradient 0 rather than NaN.
        return self.softmax(input.masked_fill(masked_rows, 0.0)).masked_fill(masked_rows, 0.0)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


_REDUCED = (torch.float16, torch.bfloat16)


class ScaledDotProductAttention(nn.Module):
    """``F.scaled_dot_product_attention`` with every op a module: SDPA's math kernel spelled out.

    ``forward(query, key, value, attn_mask=None)`` with the call's constants (``dropout_p``,
    ``is_causal``, ``scale``, ``enable_gqa``) as attributes. The ops, in the math kernel's
    order: ``scale_q`` and ``scale_k`` multiply query and transposed key by the square root of
    the scale; ``qk_matmul``; a bool mask (or the causal one) becomes the additive float mask
    (``mask_fill``: ``-inf`` where not attended); ``mask_add``; ``softmax`` (the kernel's safe
    softmax: a fully masked row gives 0); ``dropout`` (``F.dropout(..., training=True)``, as the
    kernel draws it, when ``dropout_p > 0``); ``av_matmul``; with ``enable_gqa``, key and value
    heads are repeated (``repeat_interleave``) as the kernel does. Half and bfloat16 inputs are
    computed in float32 and the result cast back, as the kernel does.

    Bitwise equal to SDPA's math kernel (``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``);
    to the default (flash) kernel on CPU within the bound of :data:`qprep.verify.KERNEL_BOUNDS`.
    """

    def __init__(self, dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                 enable_gqa: bool = False):
        super().__init__()
        self.dropout_p, self.is_causal, self.scale, self.enable_gqa = float(dropout_p), bool(is_causal), scale, enable_gqa
        self.scale_q = Mul()
        self.scale_k = Mul()
        self.qk_matmul = MatMul()
        self.mask_not = LogicalNot()
        self.mask_fill = MaskedFill(value=_NEG_INF)
        self.mask_add = Add()
        self.softmax = SafeSoftmax(dim=-1)
        self.dropout = Functional(F.dropout, (Input(0),), {"p": self.dropout_p, "training": True})
        self.av_matmul = MatMul()

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(query.size(-1))
        root = math.sqrt(abs(scale))
        dtype = query.dtype
        if dtype in _REDUCED:  # the kernel computes half and bfloat16 attention in float32
            return self.forward(query.float(), key.float(), value.float(), attn_mask).to(dtype)
        if self.is_causal:
            if attn_mask is not None:
                raise ValueError("scaled_dot_product_attention: is_causal=True takes no attn_mask")
            attn_mask = torch.ones(query.size(-2), key.size(-2), dtype=torch.bool, device=query.device).tril()
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = self.mask_fill(torch.zeros_like(attn_mask, dtype=query.dtype), self.mask_not(attn_mask))
        query = self.scale_q(query, -root if scale < 0 else root)
        if self.enable_gqa:
            key = key.repeat_interleave(query.size(-3) // key.size(-3), -3)
            value = value.repeat_interleave(query.size(-3) // value.size(-3), -3)
        scores = self.qk_matmul(query, self.scale_k(key.transpose(-2, -1), root))
        if attn_mask is not None:
            scores = self.mask_add(scores, attn_mask)
        weights = self.softmax(scores)
        if self.dropout_p > 0.0:
            weights = self.dropout(weights)
        return self.av_matmul(weights, value)

    def extra_repr(self) -> str:
        return (f"dropout_p={self.dropout_p}, is_causal={self.is_causal}, scale={self.scale}, "
                f"enable_gqa={self.enable_gqa}")


class ModularMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with every op a named submodule; see the module docstring.

    Takes the same constructor arguments and ``forward`` arguments and returns the same
    ``(attn_output, attn_weights)``. Build it from a float module with :meth:`from_float`
    (which takes over that module's Parameters) and go back with :meth:`to_float`.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True, add_bias_kv: bool = False, add_zero_attn: bool = False,
                 kdim: int | None = None, vdim: int | None = None, batch_first: bool = False, device=None, dtype=None):
        super().__init__()
        if num_heads > 0 and embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        mha = nn.MultiheadAttention(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first, device=device, dtype=dtype)
        self.embed_dim, self.kdim, self.vdim = mha.embed_dim, mha.kdim, mha.vdim
        self._qkv_same_embed_dim = mha._qkv_same_embed_dim
        self.num_heads, self.head_dim = num_heads, mha.head_dim
        self.batch_first, self.add_zero_attn = batch_first, add_zero_attn
        self._take_in_projections(mha)
        self._build_ops(dropout)
        self.out_proj = _linear_sharing(mha.out_proj, nn.Linear)

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention) -> "ModularMultiheadAttention":
        """The modular twin of ``mha``, holding ``mha``'s own Parameter objects (no copies)."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"from_float expects an nn.MultiheadAttention, got {type(mha).__name__}")
        module = cls(**_config(mha), device="meta")
        module._take_in_projections(mha)
        module.out_proj = _linear_sharing(mha.out_proj, nn.Linear)
        return module.train(mha.training)

    def to_float(self) -> nn.MultiheadAttention:
        """An ``nn.MultiheadAttention`` holding this module's Parameter objects (no copies)."""
        mha = nn.MultiheadAttention(**_config(self), device="meta")
        for name in _OWN_PARAMETERS:
            if getattr(self, name) is not None:
                setattr(mha, name, getattr(self, name))
        mha.out_proj = _linear_sharing(self.out_proj, NonDynamicallyQuantizableLinear)
        return mha.train(self.training)

    @property
    def dropout(self) -> float:
        """Dropout probability on the attention weights (that of ``attn_dropout``)."""
        return self.attn_dropout.p

    @dropout.setter
    def dropout(self, p: float) -> None:
        self.attn_dropout.p = p

    def _build_ops(self, dropout: float) -> None:
        self.key_padding_mask_fill = MaskedFill(value=_NEG_INF)
        self.attn_mask_fill = MaskedFill(value=_NEG_INF)
        self.cat_bias_k, self.cat_bias_v = Cat(), Cat()
        self.cat_zero_attn_k, self.cat_zero_attn_v = Cat(dim=1), Cat(dim=1)
        self.mask_merge = Add()
        # need_weights=True: multi_head_attention_forward's explicit path.
        self.scale = Mul(args=(Input(0), math.sqrt(1.0 / float(self.head_dim))))
        self.qk_bmm, self.qk_baddbmm = BMM(), Baddbmm()
        self.softmax = nn.Softmax(dim=-1)
        self.attn_dropout = nn.Dropout(dropout)
        self.av_bmm = BMM()
        self.head_mean = Mean(dim=1)
        # need_weights=False: scaled_dot_product_attention's math kernel.
        root_scale = math.sqrt(1.0 / math.sqrt(self.head_dim))
        self.sdpa_scale_q = Mul(args=(Input(0), root_scale))
        self.sdpa_scale_k = Mul(args=(Input(0), root_scale))
        self.sdpa_qk_matmul = MatMul()
        self.sdpa_mask_add = Add()
        self.sdpa_softmax = SafeSoftmax(dim=-1)
        self.sdpa_av_matmul = MatMul()

    def _take_in_projections(self, mha: nn.MultiheadAttention) -> None:
        """Register ``mha``'s own Parameters and the projections that share them."""
        for name in _OWN_PARAMETERS:
            self.register_parameter(name, getattr(mha, name))
        E, bias = self.embed_dim, self.in_proj_bias
        packed = self._qkv_same_embed_dim
        weights = (self.in_proj_weight,) * 3 if packed else (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        aliases = {}
        for i, (name, weight) in enumerate(zip(("q_proj", "k_proj", "v_proj"), weights)):
            rows = (i * E, (i + 1) * E)
            setattr(self, name, SlicedLinear(weight, bias, rows if packed else (0, E), rows))
            aliases[f"{name}.packed_weight"] = "in_proj_weight" if packed else f"{name}_weight"
        if packed:
            self.kv_proj = SlicedLinear(self.in_proj_weight, bias, (E, 3 * E))
            self.qkv_proj = SlicedLinear(self.in_proj_weight, bias, (0, 3 * E))
            aliases.update({f"{name}.packed_weight": "in_proj_weight" for name in ("kv_proj", "qkv_proj")})
        if bias is not None:
            aliases.update({alias.replace("weight", "bias"): "in_proj_bias" for alias in aliases})
        hide_aliases(self, aliases)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True, is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As ``nn.MultiheadAttention.forward``, minus its fused fast path."""
        is_batched = query.dim() == 3
        key_padding_mask = self._float_mask(key_padding_mask, "key_padding_mask", self.key_padding_mask_fill, query.dtype, attn_mask)
        attn_mask = self._float_mask(attn_mask, "attn_mask", self.attn_mask_fill, query.dtype)
        if self.batch_first and is_batched:
            query, key, value = _swap_batch_dim(query, key, value)
        output, weights = self._attention(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)
        if self.batch_first and is_batched:
            output = output.transpose(1, 0)
        return output, weights

    def _float_mask(self, mask, name, fill, dtype, other=None):
        """``F._canonical_mask``: a boolean mask becomes 0 / -inf through ``fill``."""
        if mask is None:
            return None
        is_float = torch.is_floating_point(mask)
        if mask.dtype != torch.bool and not is_float:
            raise TypeError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")
        if other is not None and other.dtype != mask.dtype:
            warnings.warn(f"Support for mismatched {name} and attn_mask is deprecated. Use same type for both instead.", stacklevel=3)
        return mask if is_float else fill(torch.zeros_like(mask, dtype=dtype), mask)

    def _attention(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal):
        """``F.multi_head_attention_forward`` on sequence-first inputs."""
        is_batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        if not is_batched:  # separate unsqueezes end ``query is key``: torch then runs 3 GEMMs too
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        tgt_len, bsz, _ = query.shape
        if is_causal and attn_mask is None:
            raise ValueError("is_causal=True needs attn_mask (e.g. nn.Transformer.generate_square_subsequent_mask)")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # SDPA applies the causal mask itself
        elif key_padding_mask is not None:
            is_causal = False
        q, k, v = self._project(query, key, value)
        attn_mask = self._attn_mask_3d(attn_mask, tgt_len, key.shape[0], bsz)
        if self.bias_k is not None:
            k, v = self._add_bias_kv(k, v, bsz)
            attn_mask, key_padding_mask = _pad_masks(attn_mask, key_padding_mask)
        q, k, v = (x.view(x.shape[0], bsz * self.num_heads, self.head_dim).transpose(0, 1) for x in (q, k, v))
        if self.add_zero_attn:
            k, v = self._add_zero_attn(k, v)
            attn_mask, key_padding_mask = _pad_masks(attn_mask, key_padding_mask)
        attn_mask = self._merge_masks(attn_mask, key_padding_mask, bsz, k.size(1))
        dropout = self.training and self.dropout > 0.0
        if need_weights:
            output, weights = self._attend_with_weights(q, k, v, attn_mask, dropout, average_attn_weights, bsz)
        else:
            output, weights = self._attend_sdpa(q, k, v, attn_mask, dropout, is_causal, bsz), None
        if not is_batched:
            output = output.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        return output, weights

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        """``F._mha_shape_check`` and the embed-dim checks; returns whether the input is batched."""
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be unbatched 2-D or batched 3-D, got {query.dim()}-D")
        batched = query.dim() == 3
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"key and value must be {query.dim()}-D like query, got {key.dim()}-D and {value.dim()}-D")
        if key_padding_mask is not None and key_padding_mask.dim() != query.dim() - 1:
            raise ValueError(f"key_padding_mask must be {query.dim() - 1}-D for a {query.dim()}-D query, got {key_padding_mask.dim()}-D")
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise ValueError(f"attn_mask must be 2-D or 3-D, got {attn_mask.dim()}-D")
        if query.shape[-1] != self.embed_dim:
            raise ValueError(f"query's last dimension must be embed_dim={self.embed_dim}, got {query.shape[-1]}")
        same = key.shape[:-1] == value.shape[:-1] if not self._qkv_same_embed_dim else key.shape == value.shape
        if not same:
            raise ValueError(f"key shape {tuple(key.shape)} does not match value shape {tuple(value.shape)}")
        return batched

    def _project(self, query, key, value):
        """``F._in_projection_packed`` / ``F._in_projection``: one GEMM per group of identical inputs."""
        if self._qkv_same_embed_dim and key is value:
            E = query.size(-1)
            if query is key:
                qkv = _unpack(self.qkv_proj(query), 3, E)
                return qkv[0], qkv[1], qkv[2]
            q = self.q_proj(query)
            kv = _unpack(self.kv_proj(key), 2, E)
            return q, kv[0], kv[1]
        return self.q_proj(query), self.k_proj(key), self.v_proj(value)

    def _attn_mask_3d(self, attn_mask, tgt_len, src_len, bsz):
        if attn_mask is None:
            return None
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, src_len):
                raise ValueError(f"2-D attn_mask must have shape {(tgt_len, src_len)}, got {tuple(attn_mask.shape)}")
            return attn_mask.unsqueeze(0)
        if attn_mask.shape != (bsz * self.num_heads, tgt_len, src_len):
            raise ValueError(f"3-D attn_mask must have shape {(bsz * self.num_heads, tgt_len, src_len)}, got {tuple(attn_mask.shape)}")
        return attn_mask

    def _add_bias_kv(self, k, v, bsz):
        """One learned key and value per batch entry, after the sequence (dim 0)."""
        return self.cat_bias_k(k, self.bias_k.repeat(1, bsz, 1)), self.cat_bias_v(v, self.bias_v.repeat(1, bsz, 1))

    def _add_zero_attn(self, k, v):
        """One zero key and value per (batch, head), after the sequence (now dim 1)."""
        return self.cat_zero_attn_k(k, _zero_row(k)), self.cat_zero_attn_v(v, _zero_row(v))

    def _merge_masks(self, attn_mask, key_padding_mask, bsz, src_len):
        if key_padding_mask is None:
            return attn_mask
        if tuple(key_padding_mask.shape) != (bsz, src_len):
            raise ValueError(f"key_padding_mask must have shape {(bsz, src_len)} (with added keys), got {tuple(key_padding_mask.shape)}")
        key_padding_mask = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, self.num_heads, -1, -1).reshape(bsz * self.num_heads, 1, src_len)
        return key_padding_mask if attn_mask is None else self.mask_merge(attn_mask, key_padding_mask)

    def _attend_with_weights(self, q, k, v, attn_mask, dropout, average_attn_weights, bsz):
        """The explicit ``need_weights=True`` path of ``F.multi_head_attention_forward``."""
        tgt_len, src_len = q.shape[1], k.shape[1]
        q_scaled = self.scale(q)
        if attn_mask is not None:
            weights = self.qk_baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = self.qk_bmm(q_scaled, k.transpose(-2, -1))
        weights = self.softmax(weights)
        if dropout:
            weights = self.attn_dropout(weights)
        output = self.av_bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, self.embed_dim)
        output = self.out_proj(output)
        output = output.view(tgt_len, bsz, output.size(1))
        weights = weights.view(bsz, self.num_heads, tgt_len, src_len)
        return output, (self.head_mean(weights) if average_attn_weights else weights)

    def _attend_sdpa(self, q, k, v, attn_mask, dropout, is_causal, bsz):
        """The ``need_weights=False`` path, with SDPA's math kernel spelled out."""
        tgt_len, src_len = q.shape[1], k.shape[1]
        if attn_mask is not None:
            attn_mask = attn_mask.unsqueeze(0) if attn_mask.size(0) == 1 else attn_mask.view(bsz, self.num_heads, -1, src_len)
        elif is_causal:  # the math kernel's causal mask: 0 on and below the diagonal, -inf above
            attn_mask = torch.full((tgt_len, src_len), _NEG_INF, dtype=q.dtype, device=q.device).triu(1)
        dtype = q.dtype
        q, k, v = (x.view(bsz, self.num_heads, x.shape[1], self.head_dim) for x in (q, k, v))
        if dtype in _REDUCED:  # the kernel computes half and bfloat16 attention in float32
            q, k, v = q.float(), k.float(), v.float()
        scores = self.sdpa_qk_matmul(self.sdpa_scale_q(q), self.sdpa_scale_k(k.transpose(-2, -1)))
        if attn_mask is not None:
            scores = self.sdpa_mask_add(scores, attn_mask)
        weights = self.sdpa_softmax(scores)
        if dropout:
            weights = self.attn_dropout(weights)
        attended = self.sdpa_av_matmul(weights, v)
        if dtype in _REDUCED:
            attended = attended.to(dtype)
        output = attended.permute(2, 0, 1, 3).reshape(bsz * tgt_len, self.embed_dim)
        output = self.out_proj(output)
        return output.view(tgt_len, bsz, output.size(1))

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kdim={self.kdim}, vdim={self.vdim}, batch_first={self.batch_first}"


def _config(mha) -> dict:
    """Constructor arguments of an ``nn.MultiheadAttention`` or :class:`ModularMultiheadAttention`."""
    return dict(embed_dim=mha.embed_dim, num_heads=mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
                add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn, kdim=mha.kdim, vdim=mha.vdim, batch_first=mha.batch_first)


def _linear_sharing(linear: nn.Linear, cls: type) -> nn.Linear:
    """A ``cls`` Linear holding ``linear``'s Parameter objects."""
    shared = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    shared.weight = linear.weight
    if linear.bias is not None:
        shared.bias = linear.bias
    return shared


def _swap_batch_dim(query, key, value):
    """``batch_first`` to sequence-first, keeping ``query is key`` / ``key is value`` as they were."""
    if key is value:
        if query is key:
            query = key = value = query.transpose(1, 0)
        else:
            query, key = (x.transpose(1, 0) for x in (query, key))
            value = key
        return query, key, value
    return tuple(x.transpose(1, 0) for x in (query, key, value))


def _unpack(proj, n, embed_dim):
    """Split a packed projection's last dim into ``n`` contiguous ``embed_dim`` parts (torch's layout)."""
    return proj.unflatten(-1, (n, embed_dim)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()


def _zero_row(x: torch.Tensor) -> torch.Tensor:
    """Zeros shaped like one sequence position of ``x`` (batch*heads, seq, head_dim)."""
    return torch.zeros((x.shape[0], 1, x.shape[2]), dtype=x.dtype, device=x.device)


def _pad_masks(attn_mask, key_padding_mask):
    """One more key column (a bias or zero key), not masked, in each mask present."""
    return tuple(None if mask is None else F.pad(mask, (0, 1)) for mask in (attn_mask, key_padding_mask))
