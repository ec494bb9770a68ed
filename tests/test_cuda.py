"""CUDA: the modular LSTM and attention against torch's fused GPU kernels, and a prepared
model on the GPU. Skipped without a CUDA device (every test here needs one).

On the GPU, torch runs ``nn.LSTM`` in cuDNN and ``nn.MultiheadAttention(need_weights=False)``
in one of SDPA's fused kernels (flash: float16/bfloat16 only; memory-efficient: float32
too). The modular versions spell the same math out op by op, so they cannot round like
those kernels: the differences are bounded, not zero (the standard's one exception). A
model without such modules runs the very same kernels prepared and unprepared, so it must be
bitwise equal there too.

The bounds below are PROVISIONAL: they were set without a GPU to measure on (the CPU
figures, oneDNN LSTM 5.4e-7 and SDPA flash 9.5e-7 in float32, scaled up for the GPU's
different reduction orders and for half precision). With ``QPREP_CUDA_FIGURES=path.json``
each test adds its measured maximum to that file, so the run on a GPU records the figures
to tighten them by.
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
from qprep.modules import ModularLSTM
from qprep.modules.attention import ModularMultiheadAttention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

#: max abs difference accepted, modular vs fused kernel (provisional, see the docstring).
CUDNN_LSTM_BOUND = 1e-5  # float32, TF32 off
CUDNN_LSTM_TF32_BOUND = 1e-2  # torch's default allows TF32 inside cuDNN
SDPA_BOUNDS = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}
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
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


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
    assert worst <= CUDNN_LSTM_TF32_BOUND


def test_native_cuda_lstm_vs_modular_bounded(no_tf32):
    """cuDNN off: torch's own CUDA LSTM (a fused cell kernel that adds both biases inside),
    still not the modular op order."""
    lstm, modular, x = lstm_pair("2layer-bidir")
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=False):
        worst = max_diff(modular(x)[0], lstm(x)[0])
    record("native_cuda_lstm[2layer-bidir]", worst)
    assert worst <= CUDNN_LSTM_BOUND


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
