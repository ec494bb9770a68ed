"""ModularMultiheadAttention against nn.MultiheadAttention: numerics, parameters, structure."""

import collections
import copy
import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from torch.overrides import TorchFunctionMode

from qprep.modules.attention import ModularMultiheadAttention, SafeSoftmax, SlicedLinear
from qprep.modules.base import TensorOp

E, H = 16, 4
TGT, SRC, BATCH = 5, 7, 3
# Measured maxima over the module docstring's grid, and the bounds tested here.
FLASH_BOUND = 2e-6  # need_weights=False, SDPA flash kernel: measured 9.5e-7
FAST_OUTPUT_BOUND = 2e-6  # torch._native_multi_head_attention output: measured 4.8e-7
FAST_WEIGHTS_BOUND = 5e-7  # its attention weights: measured 1.2e-7

CONFIGS = {
    "default": {},
    "batch_first": {"batch_first": True},
    "no_bias": {"bias": False},
    "bias_kv": {"add_bias_kv": True},
    "zero_attn": {"add_zero_attn": True},
    "bias_kv_zero_attn_bf": {"add_bias_kv": True, "add_zero_attn": True, "batch_first": True},
    "kdim_vdim": {"kdim": 11, "vdim": 13},
    "kdim_vdim_no_bias_bf": {"kdim": 11, "vdim": 13, "bias": False, "batch_first": True},
}
# How query, key and value relate; torch projects self-attention in one GEMM, key-is-value in two.
PACKED_CALLS = ("self", "kv", "cross", "self_unbatched")
SEPARATE_CALLS = ("cross", "cross_unbatched")
CONFIG_CALLS = [(c, call) for c, kw in CONFIGS.items() for call in (SEPARATE_CALLS if "kdim" in kw else PACKED_CALLS)]
MASKS = ("none", "bool_attn", "float_attn_3d", "bool_kpm", "float_kpm", "bool_both")
# Ops that only move, view or create data; anything else must run inside a submodule.
DATA_MOVEMENT = {
    "__get__", "dim", "size", "view", "reshape", "transpose", "permute", "unsqueeze", "squeeze",
    "unflatten", "expand", "contiguous", "repeat", "__getitem__", "pad", "zeros", "zeros_like",
    "full", "triu", "is_floating_point",
}
LEAVES = (TensorOp, SlicedLinear, SafeSoftmax, nn.Linear, nn.Softmax, nn.Dropout)


@pytest.fixture(autouse=True)
def _one_thread():
    """The machine is shared: one thread avoids oversubscription (and results stay comparable)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_mha(config: str, seed: int = 0, **overrides) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, H, **{**CONFIGS[config], **overrides})
    if mha.in_proj_bias is not None:  # torch initialises biases to 0, which would hide bias bugs
        with torch.no_grad():
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    return mha


def make_inputs(mha: nn.MultiheadAttention, call: str, seed: int = 1):
    torch.manual_seed(seed)
    batched = not call.endswith("unbatched")
    src = TGT if call.startswith("self") else SRC

    def tensor(length, dim):
        if not batched:
            return torch.randn(length, dim)
        return torch.randn(BATCH, length, dim) if mha.batch_first else torch.randn(length, BATCH, dim)

    query = tensor(TGT, E)
    if call.startswith("self"):
        return query, query, query
    key = tensor(src, mha.kdim)
    return (query, key, key) if call == "kv" else (query, key, tensor(src, mha.vdim))


def make_masks(kind: str, query: torch.Tensor, key: torch.Tensor, batch_first: bool):
    """(attn_mask, key_padding_mask); boolean masks leave key 0 free so no row is all masked."""
    batched = query.dim() == 3
    seq_dim = 1 if batched and batch_first else 0
    tgt, src = query.shape[seq_dim], key.shape[seq_dim]
    kpm_shape = (BATCH, src) if batched else (src,)
    attn_mask = key_padding_mask = None
    if kind in ("bool_attn", "bool_both"):
        attn_mask = torch.rand(tgt, src) < 0.4
        attn_mask[:, 0] = False
    if kind == "float_attn_3d":
        attn_mask = torch.randn((BATCH if batched else 1) * H, tgt, src)
    if kind in ("bool_kpm", "bool_both"):
        key_padding_mask = torch.rand(kpm_shape) < 0.4
        key_padding_mask[..., 0] = False
    if kind == "float_kpm":
        key_padding_mask = torch.randn(kpm_shape)
    return attn_mask, key_padding_mask


def assert_same(actual, expected, what: str) -> None:
    for name, a, e in zip(("output", "weights"), actual, expected):
        if e is None:
            assert a is None, f"{what}: {name} should be None"
        else:
            assert torch.equal(a, e), f"{what}: {name} differs, max |diff| {(a - e).abs().max().item():.3g}"


def max_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual - expected).abs().max().item()


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("config, call", CONFIG_CALLS, ids=[f"{c}-{call}" for c, call in CONFIG_CALLS])
def test_bit_exact_on_torch_path(config, call, mask):
    """Eval, grad enabled (so no fast path); SDPA pinned to its math kernel for need_weights=False."""
    mha = make_mha(config).eval()
    modular = ModularMultiheadAttention.from_float(mha)
    query, key, value = make_inputs(mha, call)
    attn_mask, key_padding_mask = make_masks(mask, query, key, mha.batch_first)
    for need_weights, average in ((True, True), (True, False), (False, True)):
        kwargs = dict(attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=need_weights, average_attn_weights=average)
        with sdpa_kernel(SDPBackend.MATH):
            expected = mha(query, key, value, **kwargs)
        assert_same(modular(query, key, value, **kwargs), expected, f"need_weights={need_weights}, average={average}")


@pytest.mark.parametrize("need_weights", (True, False))
@pytest.mark.parametrize("config, call", CONFIG_CALLS, ids=[f"{c}-{call}" for c, call in CONFIG_CALLS])
def test_train_dropout_outputs_and_gradients_bit_exact(config, call, need_weights):
    """Training with dropout, same seed: torch's SDPA picks the math kernel itself."""
    mha = make_mha(config, dropout=0.3).train()
    twin = copy.deepcopy(mha)
    modular = ModularMultiheadAttention.from_float(twin)
    inputs = make_inputs(mha, call)
    attn_mask, key_padding_mask = make_masks("bool_both", inputs[0], inputs[1], mha.batch_first)
    kwargs = dict(attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=need_weights)
    results = []
    for module in (mha, modular):
        leaves = {id(t): t.detach().clone().requires_grad_() for t in inputs}  # keeps `query is key`
        args = [leaves[id(t)] for t in inputs]
        torch.manual_seed(123)
        output, weights = module(*args, **kwargs)
        output.backward(torch.linspace(-1, 1, output.numel()).view_as(output))
        results.append(((output, weights), [a.grad for a in leaves.values()]))
    (expected, input_grads), (actual, modular_grads) = results
    assert_same(actual, expected, "train")
    for a, e in zip(modular_grads, input_grads):
        assert torch.equal(a, e), "input gradient differs"
    for (name, p), q in zip(mha.named_parameters(), twin.parameters()):
        assert torch.equal(q.grad, p.grad), f"gradient of {name} differs"


@pytest.mark.parametrize("config, call", CONFIG_CALLS, ids=[f"{c}-{call}" for c, call in CONFIG_CALLS])
def test_need_weights_false_flash_kernel_bounded(config, call):
    """Eval without dropout: SDPA's flash kernel, whose rounding the explicit math cannot match."""
    mha = make_mha(config).eval()
    modular = ModularMultiheadAttention.from_float(mha)
    query, key, value = make_inputs(mha, call)
    for mask in ("none", "bool_both", "float_kpm"):
        attn_mask, key_padding_mask = make_masks(mask, query, key, mha.batch_first)
        kwargs = dict(attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False)
        expected, _ = mha(query, key, value, **kwargs)
        actual, _ = modular(query, key, value, **kwargs)
        assert max_diff(actual, expected) <= FLASH_BOUND, mask


@pytest.mark.parametrize("mask", ("none", "bool_attn", "bool_kpm", "bool_both"))
def test_fast_path_bounded(mask, monkeypatch):
    calls = []
    native = torch._native_multi_head_attention
    monkeypatch.setattr(torch, "_native_multi_head_attention", lambda *a, **k: calls.append(1) or native(*a, **k))
    mha = make_mha("batch_first").eval()
    modular = ModularMultiheadAttention.from_float(mha)
    query, _, _ = make_inputs(mha, "self")
    attn_mask, key_padding_mask = make_masks(mask, query, query, True)
    for need_weights, average in ((True, True), (True, False), (False, True)):
        kwargs = dict(attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=need_weights, average_attn_weights=average)
        with torch.no_grad():
            expected = mha(query, query, query, **kwargs)
            actual = modular(query, query, query, **kwargs)
        assert max_diff(actual[0], expected[0]) <= FAST_OUTPUT_BOUND
        if need_weights:
            assert max_diff(actual[1], expected[1]) <= FAST_WEIGHTS_BOUND
    assert len(calls) == 3, "torch did not take its fast path"


@pytest.mark.parametrize("key_padding", (False, True))
@pytest.mark.parametrize("need_weights", (True, False))
@pytest.mark.parametrize("call", ("self", "cross"))
def test_is_causal_bit_exact(call, need_weights, key_padding):
    """need_weights=False without a padding mask hands SDPA ``is_causal`` in place of the mask."""
    mha = make_mha("batch_first", dropout=0.2).train()
    modular = ModularMultiheadAttention.from_float(mha)
    query, key, value = make_inputs(mha, call)
    src = key.shape[1]
    causal = torch.zeros(TGT, src).masked_fill(torch.ones(TGT, src, dtype=torch.bool).triu(1), float("-inf"))
    key_padding_mask = make_masks("bool_kpm", query, key, True)[1].float() * -1e4 if key_padding else None
    kwargs = dict(attn_mask=causal, key_padding_mask=key_padding_mask, need_weights=need_weights, is_causal=True)
    torch.manual_seed(5)
    expected = mha(query, key, value, **kwargs)
    torch.manual_seed(5)
    assert_same(modular(query, key, value, **kwargs), expected, "is_causal")


def test_fully_masked_rows():
    """NaN with need_weights=True (as torch), 0 without (as SDPA)."""
    mha = make_mha("batch_first").eval()
    modular = ModularMultiheadAttention.from_float(mha)
    query, _, _ = make_inputs(mha, "self")
    key_padding_mask = torch.zeros(BATCH, TGT, dtype=torch.bool)
    key_padding_mask[1] = True
    expected, _ = mha(query, query, query, key_padding_mask=key_padding_mask)
    actual, _ = modular(query, query, query, key_padding_mask=key_padding_mask)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
    assert actual[1].isnan().all()
    with sdpa_kernel(SDPBackend.MATH):
        expected, _ = mha(query, query, query, key_padding_mask=key_padding_mask, need_weights=False)
    actual, _ = modular(query, query, query, key_padding_mask=key_padding_mask, need_weights=False)
    assert torch.equal(actual, expected)
    assert torch.equal(actual[1], mha.out_proj.bias.detach().expand(TGT, E))


@pytest.mark.parametrize("shape", ((3, 5), (2, 3, 4), (2, 4, 6)))
def test_safe_softmax_matches_aten(shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    x[0, ..., :2] = float("-inf")
    x[-1, -1] = float("-inf")  # a fully masked row
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected, actual = torch.ops.aten._safe_softmax.default(a, -1), SafeSoftmax(-1)(b)
    grad = torch.randn(shape)
    expected.backward(grad)
    actual.backward(grad)
    assert torch.equal(actual, expected) and torch.equal(b.grad, a.grad)


@pytest.mark.parametrize("config", CONFIGS)
def test_state_dict_keys_are_torch_keys(config):
    mha = make_mha(config)
    modular = ModularMultiheadAttention.from_float(mha)
    assert list(modular.state_dict()) == list(mha.state_dict())
    assert [n for n, _ in modular.named_parameters()] == [n for n, _ in mha.named_parameters()]


@pytest.mark.parametrize("config", CONFIGS)
def test_checkpoint_round_trip_strict(config):
    mha = make_mha(config, seed=1)
    fresh_modular = ModularMultiheadAttention(E, H, **CONFIGS[config])
    fresh_modular.load_state_dict(mha.state_dict(), strict=True)
    fresh_torch = nn.MultiheadAttention(E, H, **CONFIGS[config])
    fresh_torch.load_state_dict(fresh_modular.state_dict(), strict=True)
    for name, value in mha.state_dict().items():
        assert torch.equal(fresh_modular.state_dict()[name], value), name
        assert torch.equal(fresh_torch.state_dict()[name], value), name
    source = "q_proj_weight" if "kdim" in CONFIGS[config] else "in_proj_weight"
    assert torch.equal(fresh_modular.q_proj.weight, mha.state_dict()[source][:E])


@pytest.mark.parametrize("config", CONFIGS)
def test_from_float_takes_over_parameters(config):
    mha = make_mha(config)
    modular = ModularMultiheadAttention.from_float(mha)
    for name, parameter in mha.named_parameters():
        assert modular.get_parameter(name) is parameter, name
    packed = mha.in_proj_weight is not None
    for name in ("q_proj", "k_proj", "v_proj") + (("kv_proj", "qkv_proj") if packed else ()):
        projection = modular.get_submodule(name)
        source = mha.in_proj_weight if packed else getattr(mha, f"{name}_weight")
        assert projection.packed_weight is source and projection.packed_bias is mha.in_proj_bias
        assert projection.weight.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()
    assert modular.out_proj.weight is mha.out_proj.weight and type(modular.out_proj) is nn.Linear


@pytest.mark.parametrize("config", CONFIGS)
def test_to_float_round_trip(config):
    mha = make_mha(config).eval()
    modular = ModularMultiheadAttention.from_float(mha)
    back = modular.to_float()
    assert type(back) is nn.MultiheadAttention and type(back.out_proj) is NonDynamicallyQuantizableLinear
    assert not back.training
    assert [(n, id(p)) for n, p in back.named_parameters()] == [(n, id(p)) for n, p in mha.named_parameters()]
    assert {k: getattr(back, k) for k in ("embed_dim", "kdim", "vdim", "num_heads", "dropout", "batch_first", "add_zero_attn")} == \
           {k: getattr(mha, k) for k in ("embed_dim", "kdim", "vdim", "num_heads", "dropout", "batch_first", "add_zero_attn")}
    query, key, value = make_inputs(mha, "cross")
    assert_same(back(query, key, value), mha(query, key, value), "to_float")


def test_constructor_initialises_like_torch():
    torch.manual_seed(3)
    expected = nn.MultiheadAttention(E, H, add_bias_kv=True, kdim=11, vdim=13)
    torch.manual_seed(3)
    actual = ModularMultiheadAttention(E, H, add_bias_kv=True, kdim=11, vdim=13)
    for name, value in expected.state_dict().items():
        assert torch.equal(actual.state_dict()[name], value), name


def test_deepcopy_keeps_parameter_sharing():
    modular = copy.deepcopy(ModularMultiheadAttention.from_float(make_mha("default")))
    assert modular.qkv_proj.packed_weight is modular.in_proj_weight
    assert list(modular.state_dict()) == ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]


def test_gradients_reach_the_packed_parameter():
    modular = ModularMultiheadAttention.from_float(make_mha("default"))
    modular.k_proj(torch.randn(2, E)).sum().backward()
    grad = modular.in_proj_weight.grad
    assert grad[E:2 * E].abs().sum() > 0 and grad[:E].abs().sum() == 0 and grad[2 * E:].abs().sum() == 0


class _TopLevelOps(TorchFunctionMode):
    """Records the torch functions called outside every leaf module."""

    def __init__(self):
        super().__init__()
        self.depth = 0
        self.names = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.depth == 0:
            self.names[getattr(func, "__name__", repr(func))] += 1
        return func(*args, **(kwargs or {}))


def top_level_ops(module: nn.Module, calls) -> collections.Counter:
    recorder = _TopLevelOps()
    leaves = [m for m in module.modules() if isinstance(m, LEAVES)]
    handles = [m.register_forward_pre_hook(lambda *_: setattr(recorder, "depth", recorder.depth + 1)) for m in leaves]
    handles += [m.register_forward_hook(lambda *_: setattr(recorder, "depth", recorder.depth - 1)) for m in leaves]
    try:
        with recorder:
            for args, kwargs in calls:
                module(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return recorder.names


@pytest.mark.parametrize("config", CONFIGS)
def test_no_raw_compute_outside_submodules(config):
    mha = make_mha(config, dropout=0.1).train()
    modular = ModularMultiheadAttention.from_float(mha)
    calls = []
    for call in SEPARATE_CALLS if "kdim" in CONFIGS[config] else PACKED_CALLS:
        query, key, value = make_inputs(mha, call)
        attn_mask, key_padding_mask = make_masks("bool_both", query, key, mha.batch_first)
        for need_weights in (True, False):
            calls.append(((query, key, value), dict(attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=need_weights)))
        calls.append(((query, key, value), dict(attn_mask=attn_mask, need_weights=False, is_causal=True)))
    names = top_level_ops(modular, calls)
    assert set(names) <= DATA_MOVEMENT, f"raw ops outside submodules: {set(names) - DATA_MOVEMENT}"
    assert top_level_ops(mha, calls[:1]).keys() - DATA_MOVEMENT, "the check should flag nn.MultiheadAttention"


def test_mismatched_mask_types_warn_like_torch():
    mha = make_mha("default").eval()
    modular = ModularMultiheadAttention.from_float(mha)
    query, _, _ = make_inputs(mha, "self")
    attn_mask, key_padding_mask = make_masks("bool_both", query, query, False)
    with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
        actual = modular(query, query, query, attn_mask=attn_mask.float() * -1e4, key_padding_mask=key_padding_mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = mha(query, query, query, attn_mask=attn_mask.float() * -1e4, key_padding_mask=key_padding_mask)
    assert_same(actual, expected, "mismatched masks")


@pytest.mark.parametrize("call, error, match", [
    (lambda m, x: m(x[0], x, x), ValueError, "key and value must be 2-D like query"),
    (lambda m, x: m(x[..., :8], x[..., :8], x[..., :8]), ValueError, "embed_dim=16"),
    (lambda m, x: m(x, x, x[:2]), ValueError, "does not match value shape"),
    (lambda m, x: m(x, x, x, attn_mask=torch.zeros(3, 3)), ValueError, "2-D attn_mask must have shape"),
    (lambda m, x: m(x, x, x, key_padding_mask=torch.zeros(BATCH, 2, dtype=torch.bool)), ValueError, "key_padding_mask must have shape"),
    (lambda m, x: m(x, x, x, attn_mask=torch.zeros(TGT, TGT, dtype=torch.int64)), TypeError, "bool or floating-point"),
    (lambda m, x: m(x, x, x, is_causal=True), ValueError, "is_causal=True needs attn_mask"),
], ids=["dims", "embed_dim", "kv_shape", "attn_mask_shape", "kpm_shape", "mask_dtype", "causal_without_mask"])
def test_bad_calls_raise(call, error, match):
    modular = ModularMultiheadAttention(E, H)
    with pytest.raises(error, match=match):
        call(modular, torch.randn(TGT, BATCH, E))


def test_bad_construction_raises():
    with pytest.raises(TypeError, match="nn.MultiheadAttention"):
        ModularMultiheadAttention.from_float(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="divisible"):
        ModularMultiheadAttention(10, 4)
    with pytest.raises(ValueError, match="rows"):
        SlicedLinear(nn.Parameter(torch.zeros(4, 2)), None, (2, 6))


@pytest.mark.parametrize("need_weights", (True, False))
def test_bit_exact_with_wide_heads(need_weights):
    """head_dim 256: there ``baddbmm(mask, q, k^T)`` and ``bmm(q, k^T) + mask`` round differently."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(256, 1).eval()
    modular = ModularMultiheadAttention.from_float(mha)
    query = torch.randn(16, 2, 256)
    attn_mask = torch.randn(16, 16)
    with sdpa_kernel(SDPBackend.MATH):
        expected = mha(query, query, query, attn_mask=attn_mask, need_weights=need_weights)
    assert_same(modular(query, query, query, attn_mask=attn_mask, need_weights=need_weights), expected, "wide heads")


def test_exported_from_qprep_modules():
    import qprep.modules

    assert qprep.modules.ModularMultiheadAttention is ModularMultiheadAttention
    assert {"ModularMultiheadAttention", "SlicedLinear", "SafeSoftmax"} <= set(qprep.modules.__all__)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_attention_is_the_math_kernels(dtype):
    """SDPA's math kernel computes half and bfloat16 attention in float32 and casts back:
    so do ScaledDotProductAttention and the need_weights=False path; a prepared encoder layer
    is bitwise the unfused kernels and within the precision-scaled bound of the fused ones."""
    import qprep
    from qprep.modules import ScaledDotProductAttention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 8, 8).to(dtype) for _ in range(3))
    masks = [None, torch.randn(2, 1, 8, 8).to(dtype), torch.rand(2, 1, 8, 8) > 0.3]
    for mask in masks:
        with sdpa_kernel(SDPBackend.MATH):
            expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert torch.equal(ScaledDotProductAttention()(q, k, v, mask), expected)
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True).eval().to(dtype)
    gm = qprep.prepare(layer, torch.randn(2, 5, 16).to(dtype))
    result = qprep.verify(layer, gm, torch.randn(3, 7, 16).to(dtype))
    assert result.equal and result.kernel_bound > 1e-3, result.table()
