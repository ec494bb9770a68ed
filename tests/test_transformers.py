"""Hugging Face transformers 5 (issue 9): encoders, decoder LLMs, an encoder-decoder and a
vision transformer, each with sdpa and eager attention: prepared, the same output type,
bitwise equal on other batch sizes and sequence lengths and on padded batches, every op in
a module, no re-used module, attention decomposed."""

from __future__ import annotations

import collections

import pytest
import torch

import qprep
from qprep.core import meta
from tests.hf_models import CASES, DECODERS, build, example
from tests.models import compute_ops_outside_modules

#: A quick subset for the default run; the rest run with -m slow.
QUICK = {("bert", "sdpa"), ("llama", "sdpa"), ("llama", "eager"), ("t5", "sdpa")}
NEW_SHAPES = [dict(batch=3, seq=11), dict(batch=1, seq=5), dict(batch=2, seq=8, pad=True)]


def _cases():
    return [pytest.param(n, a, id=f"{n}-{a}", marks=() if (n, a) in QUICK else pytest.mark.slow) for n, a in CASES]


@pytest.mark.parametrize("name, attn", _cases())
def test_prepared_model_is_the_model(name, attn):
    model = build(name, attn)
    gm = qprep.prepare(model, example(name))  # verified bitwise on the example (check=True)
    out = gm(**example(name, seed=3))
    assert type(out) is type(model(**example(name, seed=3)))
    assert compute_ops_outside_modules(gm) == []
    calls = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    assert [t for t, c in calls.items() if c > 1] == []  # no module is called twice
    for shape in NEW_SHAPES:  # other sizes and padded rows: equal (no guard here depends on them)
        assert qprep.verify(model, gm, example(name, seed=1, **shape)).equal, shape
    if attn == "sdpa":
        assert any(isinstance(m, qprep.modules.ScaledDotProductAttention) for m in gm.modules())
    assert set(gm.state_dict()) == set(model.state_dict())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llama_building_blocks_are_modules(attn):
    gm = qprep.prepare(build("llama", attn), example("llama"))
    kinds = collections.Counter(type(m).__name__ for m in gm.modules())
    # RMSNorm: pow, mean, rsqrt, mul; rotary: cos, sin, the products, rotate_half's neg and cat, the adds
    for kind in ("Pow", "Mean", "Rsqrt", "Mul", "Cos", "Sin", "Neg", "Cat", "Add", "SiLU", "Linear", "Embedding"):
        assert kinds[kind] > 0, kind
    if attn == "sdpa":
        sdpa = next(m for m in gm.modules() if isinstance(m, qprep.modules.ScaledDotProductAttention))
        assert {"qk_matmul", "scale_q", "scale_k", "mask_add", "softmax", "dropout", "av_matmul"} <= set(
            dict(sdpa.named_children()))
    else:  # eager attention: the matmuls, the scale, the mask add and the softmax are modules of the graph
        assert kinds["MatMul"] >= 4 and kinds["Functional"] >= 2  # softmax(dtype=float32), dropout


def test_sdpa_decomposition_is_bitwise_the_math_kernel_and_bounded_to_the_default():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = build("llama", "sdpa")
    gm = qprep.prepare(model, example("llama"))
    inputs = example("llama", batch=3, seq=12, seed=5)
    with sdpa_kernel(SDPBackend.MATH):
        assert torch.equal(gm(**inputs).logits, model(**inputs).logits)
    result = qprep.verify(model, gm, inputs)
    assert result.equal
    if result.kernel_diff is not None:  # the default kernel (flash on CPU) differs within the bound
        assert result.kernel_diff <= result.kernel_bound


def test_padding_is_honoured():
    for name in ("bert", "llama"):
        model = build(name)
        gm = qprep.prepare(model, example(name, pad=True))
        padded = example(name, batch=3, seq=9, pad=True, seed=7)
        assert qprep.verify(model, gm, padded).equal


def test_decoder_outputs_a_cache_made_at_run_time():
    model = build("llama")
    gm = qprep.prepare(model, example("llama"))
    first, second = gm(**example("llama")), gm(**example("llama"))
    assert type(first.cache).__name__ == "DynamicCache" and first.cache is not second.cache
    assert torch.equal(first.cache.layers[0].keys, model(**example("llama")).cache.layers[0].keys)


def test_guards_name_the_branch():
    model = build("bert")
    gm = qprep.prepare(model, example("bert"))
    guards = meta.graph_fact(gm, meta.GUARDS)
    assert guards and all(g.location for g in guards)
    with pytest.raises(qprep.GuardError, match=r"kwargs.keys\(\)"):  # BertModel takes it through **kwargs
        gm(**example("bert"), output_attentions=True)
    with pytest.raises(qprep.GuardError, match="argument fixed at trace time"):
        gm(**example("bert"), use_cache=True)
