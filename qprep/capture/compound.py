"""Traceable forwards for compound ``torch.nn`` modules whose own ``forward`` branches on
ranks and fast-path conditions (``nn.TransformerEncoder``, ``nn.TransformerDecoder``,
``nn.Transformer``).

Each function computes what the module's own ``forward`` computes on its math path (the
attention fast path off, which is how qprep traces), minus input validation that only raises:
the same calls of the same submodules with the same arguments. The tracer uses them in place
of ``forward`` while tracing, so the layers inside are traced and prepared; where a function
still meets data-dependent control flow (a traced mask with ``is_causal=None`` must be
compared with a causal mask), tracing fails and the module is kept opaque, as before.
"""

from __future__ import annotations

import torch.nn as nn

from ..core._compat import canonical_mask, detect_is_causal_mask, none_or_dtype

__all__ = ["TRACEABLE_FORWARDS", "COMPOUND_NN"]

#: ``torch.nn`` modules traced into (not leaves) when ``config.trace_compound_nn`` is on.
COMPOUND_NN = (
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.Transformer,
)


def _encoder_forward(self: nn.TransformerEncoder, src, mask=None, src_key_padding_mask=None, is_causal=None):
    src_key_padding_mask = canonical_mask(
        mask=src_key_padding_mask, mask_name="src_key_padding_mask", other_type=none_or_dtype(mask),
        other_name="mask", target_type=src.dtype,
    )
    mask = canonical_mask(mask=mask, mask_name="mask", other_type=None, other_name="", target_type=src.dtype,
                          check_other=False)
    # torch passes the sequence length as ``size``; with a mask it is the mask's size(-2).
    is_causal = detect_is_causal_mask(mask, is_causal, None)
    output = src
    for mod in self.layers:
        output = mod(output, src_mask=mask, is_causal=is_causal, src_key_padding_mask=src_key_padding_mask)
    if self.norm is not None:
        output = self.norm(output)
    return output


def _decoder_forward(self: nn.TransformerDecoder, tgt, memory, tgt_mask=None, memory_mask=None,
                     tgt_key_padding_mask=None, memory_key_padding_mask=None, tgt_is_causal=None,
                     memory_is_causal=False):
    tgt_is_causal = detect_is_causal_mask(tgt_mask, tgt_is_causal, None)
    output = tgt
    for mod in self.layers:
        output = mod(output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                     tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                     tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)
    if self.norm is not None:
        output = self.norm(output)
    return output


def _transformer_forward(self: nn.Transformer, src, tgt, src_mask=None, tgt_mask=None, memory_mask=None,
                         src_key_padding_mask=None, tgt_key_padding_mask=None, memory_key_padding_mask=None,
                         src_is_causal=None, tgt_is_causal=None, memory_is_causal=False):
    memory = self.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
    return self.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                        tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                        tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)


#: exact module type -> the forward the tracer traces instead of the module's own.
TRACEABLE_FORWARDS = {
    nn.TransformerEncoder: _encoder_forward,
    nn.TransformerDecoder: _decoder_forward,
    nn.Transformer: _transformer_forward,
}
