"""CUDA: the modular LSTM and attention against torch's fused GPU kernels, and a prepared
model on the GPU. Skipped without a CUDA device (every test here needs one).

On the GPU, torch runs ``nn.LSTM`` in cuDNN and ``nn.MultiheadAttention(need_weights=False)``
in one of SDPA's fused kernels (flash: float16/bfloat16 only; memory-efficient: float32
too). The modular versions spell the same math out op by op, so they cannot round like
those kernels: the differences are bounded, not zero (the standard's one exception). A
model without such modules runs the very same kernels prepared and unprepared, so it must be
bitwise equal there too.

The bounds below were measured on an NVIDIA H200 (torch 2.11.0+cu130, 2026-11-30;
``QPREP_CUDA_FIGURES=path.json`` makes each test add its measured maximum to that file):
cuDNN's float32 LSTM differs from the modular one by up to 2.4e-4 here (8.3e-4 for nn.RNN
at H=256), whether TF32 is allowed or not, so its bound is qprep's own
:data:`~qprep.modules.rnn.CUDA_RNN_ATOL` (3e-3, relative); ATen's own CUDA LSTM (cuDNN off)
4.5e-8; SDPA memory-efficient float32 7.2e-7, flash and memory-efficient float16 2.0e-3 and
bfloat16 1.6e-2.

A whole model holding such modules prepares on CUDA: verify proves it bitwise against the
unfused kernels (SDPA's math kernel; for recurrent modules their modular twins, since no
torch kernel on CUDA computes the modular ops' order) and bounds the fused ones.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import qprep
from qprep.core.runtime import map_tensors
from qprep.examples import TinyLSTMLM
from qprep.modules import ModularLSTM
from qprep.modules.rnn import CUDA_RNN_ATOL
from qprep.modules.attention import ModularMultiheadAttention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

#: max abs difference accepted, modular vs fused kernel (measured, see the docstring).
CUDNN_LSTM_BOUND = CUDA_RNN_ATOL  # the outputs are below 1: the relative bound is an absolute one
NATIVE_CUDA_LSTM_BOUND = 1e-6
SDPA_BOUNDS = {torch.float32: 2e-6, torch.float16: 5e-3, torch.bfloat16: 4e-2}
#: the modular attention in half precision may be at most this many times less accurate
#: (vs a float64 reference) than the fused kernel, plus one unit of the dtype's epsilon.
ACCURACY_FACTOR = 4.0


def record(name: str, value: float) -> None:
    """Add a measured figure to ``$QPREP_CUDA_FIGURES`` (a JSON object), if set."""
    target = os.environ.get("QPREP_CUDA_FIGURES")
    if not target:
        return
    path = pathlib.Path(target)
    figures = json.loads(path.read_text()) if path.exists() else {}
    figures[name] = {"max_abs_diff": value, "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    path.write_text(json.dumps(figures, indent=1, sort_keys=True))


def max_diff(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


@pytest.fixture
def no_tf32():
    """TF32 off everywhere: the legacy switches and torch's ``fp32_precision`` ones."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    precisions = [(b, b.fp32_precision) for b in _precision_backends()]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    for backend, _ in precisions:
        backend.fp32_precision = "ieee"
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    for backend, value in precisions:
        backend.fp32_precision = value


def _precision_backends() -> list:
    cudnn = torch.backends.cudnn
    found = [getattr(cudnn, "rnn", None), getattr(cudnn, "conv", None), getattr(torch.backends.cuda, "matmul", None)]
    return [b for b in found if b is not None and isinstance(getattr(b, "fp32_precision", None), str)]


LSTM_CASES = {"1layer": (1, False, 1, 16), "2layer-bidir": (2, True, 4, 20), "2layer-h64": (2, False, 4, 64)}


def lstm_pair(case: str):
    num_layers, bidirectional, batch, hidden = LSTM_CASES[case]
    torch.manual_seed(0)
    lstm = nn.LSTM(8, hidden, num_layers, bidirectional=bidirectional).cuda().eval()
    modular = ModularLSTM.from_float(lstm)
    x = torch.randn(16, batch, 8, device="cuda")
    return lstm, modular, x


@pytest.mark.parametrize("case", LSTM_CASES)
def test_cudnn_lstm_vs_modular_bounded(case, no_tf32):
    if not torch.backends.cudnn.is_available():
        pytest.skip("cuDNN is not available")
    lstm, modular, x = lstm_pair(case)
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True):
        expected, (h, c) = lstm(x)
        actual, (h2, c2) = modular(x)
    worst = max(max_diff(actual, expected), max_diff(h2, h), max_diff(c2, c))
    record(f"cudnn_lstm[{case}]", worst)
    assert worst <= CUDNN_LSTM_BOUND


def test_cudnn_lstm_vs_modular_with_default_tf32_bounded():
    """torch's defaults: TF32 allowed in cuDNN (``torch.backends.cudnn.allow_tf32``)."""
    if not torch.backends.cudnn.is_available():
        pytest.skip("cuDNN is not available")
    lstm, modular, x = lstm_pair("2layer-h64")
    with torch.no_grad():
        worst = max_diff(modular(x)[0], lstm(x)[0])
    record("cudnn_lstm_default_tf32[2layer-h64]", worst)
    assert worst <= CUDNN_LSTM_BOUND


def test_native_cuda_lstm_vs_modular_bounded(no_tf32):
    """cuDNN off: torch's own CUDA LSTM (a fused cell kernel that adds both biases inside),
    still not the modular op order."""
    lstm, modular, x = lstm_pair("2layer-bidir")
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=False):
        worst = max_diff(modular(x)[0], lstm(x)[0])
    record("native_cuda_lstm[2layer-bidir]", worst)
    assert worst <= NATIVE_CUDA_LSTM_BOUND


def mha_pair(dtype: torch.dtype, batch_first: bool = True):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, batch_first=batch_first)
    nn.init.normal_(mha.in_proj_bias)  # torch initialises biases to 0, which would hide bias bugs
    mha = mha.to("cuda", dtype).eval()
    modular = ModularMultiheadAttention.from_float(mha)
    q = torch.randn(3, 33, 64, device="cuda", dtype=dtype)
    kv = torch.randn(3, 17, 64, device="cuda", dtype=dtype)
    return mha, modular, q, kv


def _attention(module, q, kv, backend):
    with torch.no_grad(), sdpa_kernel(backend):
        return module(q, kv, kv, need_weights=False)[0]


BACKENDS = {
    "flash": (SDPBackend.FLASH_ATTENTION, (torch.float16, torch.bfloat16)),
    "mem_efficient": (SDPBackend.EFFICIENT_ATTENTION, (torch.float32, torch.float16, torch.bfloat16)),
}
SDPA_CASES = [(name, dtype) for name, (_, dtypes) in BACKENDS.items() for dtype in dtypes]


@pytest.mark.parametrize("backend, dtype", SDPA_CASES, ids=[f"{b}-{str(d)[6:]}" for b, d in SDPA_CASES])
def test_sdpa_fused_kernel_vs_modular_bounded(backend, dtype, no_tf32):
    kernel, _ = BACKENDS[backend]
    if backend == "flash" and not torch.backends.cuda.is_flash_attention_available():
        pytest.skip("flash attention is not available on this device")
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("bfloat16 is not supported on this device")
    mha, modular, q, kv = mha_pair(dtype)
    try:
        fused = _attention(mha, q, kv, kernel)
    except RuntimeError as exc:  # the kernel refuses this device or shape
        pytest.skip(f"{backend} kernel unavailable here: {exc}")
    actual = _attention(modular, q, kv, SDPBackend.MATH)
    worst = max_diff(actual, fused)
    record(f"sdpa_{backend}[{str(dtype)[6:]}]", worst)
    assert worst <= SDPA_BOUNDS[dtype]
    # and the spelled-out math is about as accurate as the fused kernel (float64 reference)
    reference = _attention(copy.deepcopy(mha).double(), q.double(), kv.double(), SDPBackend.MATH)
    eps = torch.finfo(dtype).eps
    assert max_diff(actual, reference) <= ACCURACY_FACTOR * max_diff(fused, reference) + eps


def test_modular_attention_matches_sdpa_math_kernel_bitwise_on_cuda(no_tf32):
    """Under SDPA's math kernel torch runs the same ops the modular version spells out."""
    mha, modular, q, kv = mha_pair(torch.float32)
    assert torch.equal(_attention(modular, q, kv, SDPBackend.MATH), _attention(mha, q, kv, SDPBackend.MATH))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        y = y + y.mean(1, keepdim=True)
        return torch.softmax(self.fc(y.flatten(2).mean(-1)), -1)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_prepared_model_on_cuda_is_bitwise_equal(train):
    """No fused-kernel module: prepared and original run the same CUDA kernels (gradients
    with cuDNN's deterministic algorithms: its default backward ones may sum atomically)."""
    torch.manual_seed(0)
    model = ConvNet().cuda().train(train)
    x = torch.randn(4, 3, 16, 16, device="cuda")
    gm = qprep.prepare(model, (x,))  # verified bitwise on x, or it raises
    assert next(gm.parameters()).is_cuda
    with torch.backends.cudnn.flags(enabled=True, deterministic=True, benchmark=False):
        result = qprep.verify(model, gm, (x,), grad=True)
    assert result.equal and result.reference == "default kernels", result.table()


# ----------------------------------------------------------------------------- whole models on CUDA
def _to(tree, device):
    return map_tensors(tree, lambda t: t.to(device))


class GRUTagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(16, 32, 2, bidirectional=True, batch_first=True, dropout=0.3)
        self.fc = nn.Linear(64, 4)

    def forward(self, x):
        return self.fc(self.gru(x)[0])


RECURRENT_MODELS = {
    "lstm_lm": lambda: (TinyLSTMLM(), lambda: TinyLSTMLM().example_inputs()),
    "gru_tagger": lambda: (GRUTagger(), lambda: (torch.randn(3, 10, 16),)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", RECURRENT_MODELS)
def test_recurrent_model_prepares_on_cuda_against_its_modular_twins(name, train, dtype):
    """cuDNN (and ATen's fused CUDA cells) round otherwise than the modular ops, and no torch
    kernel on CUDA computes their order: verify proves the graph bitwise against each
    recurrent module's modular twin and bounds cuDNN per call. In train mode cuDNN also draws
    its own dropout masks between layers."""
    torch.manual_seed(0)
    build, inputs = RECURRENT_MODELS[name]()
    model = build.to("cuda", dtype).train(train)
    args = tuple(a.to("cuda", dtype) if a.is_floating_point() else a.cuda() for a in inputs())
    gm = qprep.prepare(model, args)  # verified, or it raises
    # (cuDNN computes gradients in train mode only)
    result = qprep.verify(model, gm, args, grad=train)
    record(f"prepared_{name}[{'train' if train else 'eval'}-{str(dtype)[6:]}]", result.kernel_diff or 0.0)
    assert result.equal and "modular twins" in result.reference, result.table()
    assert qprep.verify(model, gm, tuple(torch.cat([a, a]) for a in args)).equal


HF = ["llama", "bert", "t5", "vit"]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", HF)
def test_hugging_face_model_prepares_on_cuda(name, train):
    """SDPA's fused CUDA kernels (flash, memory-efficient) against its math kernel, which the
    prepared attention spells out; in train mode they also draw their own dropout masks."""
    hf_models = pytest.importorskip("tests.hf_models")
    model = hf_models.build(name).cuda().train(train)
    example = _to(hf_models.example(name, pad=True), "cuda")
    gm = qprep.prepare(model, example)
    other = _to(hf_models.example(name, batch=3, seq=12, pad=True, seed=1), "cuda")
    for inputs in (example, other):
        result = qprep.verify(model, gm, inputs)
        assert result.equal, result.table()
        record(f"hf_{name}[{'train' if train else 'eval'}]", result.kernel_diff or 0.0)
    assert type(gm(**example)) is type(model(**example))


def test_generate_of_a_prepared_llama_on_cuda_gives_the_same_tokens():
    hf_models = pytest.importorskip("tests.hf_models")
    import qprep.hf

    model = hf_models.build("llama").cuda()
    inputs = _to(hf_models.example("llama", pad=True), "cuda")
    wrapped = qprep.hf.prepare_for_generate(model, inputs, decode_steps=3)
    expected = model.generate(**inputs, do_sample=False, max_new_tokens=6)
    assert torch.equal(wrapped.generate(**inputs, do_sample=False, max_new_tokens=6), expected)
