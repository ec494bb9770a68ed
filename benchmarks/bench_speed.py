"""Forward latency of prepared models over their originals (issue 12), measured side by side.

    python benchmarks/bench_speed.py [--quick] [--only recurrent,transformer,resnet,torchvision]

One CPU thread, eval mode, ``torch.no_grad()``. Each candidate runs once per round, the
order alternating from round to round, so drifting load on a shared machine hits all of
them alike; a ratio is the median over rounds of that round's ratio. Time is the calling
thread's CPU time (``time.thread_time``; with one torch thread all the work runs there),
which leaves out the time other processes hold the cores; ``--clock wall`` measures wall
time instead.

``--malloc pinned`` fixes glibc's mmap and trim thresholds before any model is built.
By default glibc adapts them as the process frees large blocks; a forward that frees each
activation at its last use (fx's generated code does, the original model's locals do not)
can then hand the heap top back to the system and page-fault it in again on the next call.
Plain ``torch.fx.symbolic_trace`` shows the same slowdown as a prepared model there; with
the thresholds pinned (or jemalloc/tcmalloc) it disappears for both, leaving what qprep's
own code costs. Every row also checks
that the prepared output is bitwise equal (``torch.equal``) to the original's (for LSTMs:
to the original on ATen's native kernel, which the modular LSTM reproduces).

Targets (issue 12): small recurrent models <= 1.8x the original; the tiny-op transformer
(1x16x32) <= 1.15x; ResNet-style models and torchvision classifiers <= 1.03x.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.fx
import torch.nn as nn
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qprep  # noqa: E402
from qprep.examples import TinyLSTMLM  # noqa: E402
from tests.models import AttentionBlock, TinyResNet  # noqa: E402

__all__ = ["side_by_side", "main"]

TARGETS = {"recurrent": 1.8, "transformer": 1.15, "resnet": 1.03, "torchvision": 1.03}


CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}
_clock = CLOCKS["cpu"]


def side_by_side(candidates: dict, args: tuple, rounds: int, warmup: int = 3) -> tuple[dict, dict]:
    """Median milliseconds per candidate, and the median per-round ratio of each to the first."""
    clock = _clock
    names = list(candidates)
    times = {name: [] for name in names}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in candidates.values():
                fn(*args)
        gc.collect()
        gc.disable()
        try:
            for i in range(rounds):
                for name in (names if i % 2 == 0 else names[::-1]):
                    start = clock()
                    candidates[name](*args)
                    times[name].append(clock() - start)
        finally:
            gc.enable()
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    base = times[names[0]]
    ratios = {name: statistics.median(b / a for a, b in zip(base, times[name])) for name in names[1:]}
    return ms, ratios


def pin_malloc() -> bool:
    """Fix glibc's mmap threshold (32 MiB, its maximum) and trim threshold (1 GiB), which
    turns off their adaptation. Returns False where there is no glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def _native(module: nn.Module):
    """``module`` run on ATen's native kernels (oneDNN off), the LSTM reference."""
    def call(*args):
        with torch.backends.mkldnn.flags(enabled=False):
            return module(*args)
    return call


def _tensors(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _bitwise(reference, prepared, args) -> bool:
    with torch.no_grad():
        a, b = _tensors(reference(*args)), _tensors(prepared(*args))
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- models
class BiLSTMTagger(nn.Module):
    """Embedding -> 2-layer bidirectional LSTM -> per-token linear tagger."""

    def __init__(self, vocab: int = 1000, dim: int = 128, hidden: int = 128, tags: int = 10):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, 2, bidirectional=True)
        self.out = nn.Linear(2 * hidden, tags)

    def forward(self, tokens):
        out, _ = self.lstm(self.embed(tokens))
        return self.out(out)


class GRUClassifier(nn.Module):
    """Batch-first 2-layer GRU; the last step's hidden state feeds a linear classifier."""

    def __init__(self, features: int = 64, hidden: int = 128, classes: int = 10):
        super().__init__()
        self.gru = nn.GRU(features, hidden, 2, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        out, _ = self.gru(x)
        return self.head(out[:, -1])


class TransformerStack(nn.Module):
    """``depth`` blocks of bare tensor ops (tests.models.AttentionBlock)."""

    def __init__(self, depth: int, dim: int = 32, heads: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList([AttentionBlock(dim, heads) for _ in range(depth)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


#: (hidden size, batch, sequence length) of the small recurrent models.
RECURRENT_SIZES = ((64, 8, 32), (128, 8, 32), (256, 8, 32))


def _recurrent_models(sizes=RECURRENT_SIZES):
    """Word-level LSTM LM, BiLSTM tagger and GRU classifier, 2 layers each, at each size."""
    models = []
    for hidden, batch, steps in sizes:
        tokens = torch.randint(0, 1000, (steps, batch))
        shape = f"H={hidden}, T={steps}, B={batch}"
        models += [
            (f"LSTM LM ({shape})", TinyLSTMLM(vocab=1000, dim=hidden, layers=2), (tokens,), True),
            (f"BiLSTM tagger ({shape})", BiLSTMTagger(1000, hidden, hidden), (tokens,), True),
            (f"GRU classifier ({shape})", GRUClassifier(hidden, hidden), (torch.randn(batch, steps, hidden),), False),
        ]
    return models


# ----------------------------------------------------------------------------- sections
def recurrent_rows(rounds: int, sizes=RECURRENT_SIZES) -> list[list]:
    rows = []
    for name, model, args, has_lstm in _recurrent_models(sizes):
        torch.manual_seed(0)
        model.eval()
        gm = qprep.prepare(model, args, check=False)
        candidates = {"original": model, "native": _native(model), "prepared": gm}
        ms, ratios = side_by_side(candidates, args, rounds)
        reference = _native(model) if has_lstm else model
        rows.append([name, f"{ms['original']:.2f}", f"{ms['native']:.2f}", f"{ms['prepared']:.2f}",
                     f"{ratios['prepared']:.2f}x", f"{ratios['prepared'] / ratios['native']:.2f}x",
                     _bitwise(reference, gm, args)])
    return rows


def _plain_fx(model: nn.Module):
    """``torch.fx.symbolic_trace(model)``, or None where plain fx cannot trace it."""
    try:
        return torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001  (a benchmark column, not a check)
        return None


def _plain_rows(models, rounds: int, with_fx: bool = False) -> list[list]:
    rows = []
    for name, model, args in models:
        model.eval()
        gm = qprep.prepare(model, args, check=False)
        candidates = {"original": model, "prepared": gm}
        fx = _plain_fx(model) if with_fx else None
        if fx is not None:
            candidates["fx"] = fx
        ms, ratios = side_by_side(candidates, args, rounds)
        row = [name, f"{ms['original']:.2f}", f"{ms['prepared']:.2f}", f"{ratios['prepared']:.3f}x",
               _bitwise(model, gm, args)]
        rows.append(row + ([f"{ratios['fx']:.3f}x" if fx is not None else "-"] if with_fx else []))
    return rows


def transformer_rows(rounds: int) -> list[list]:
    torch.manual_seed(0)
    models = [(f"transformer-like, {d} blocks, 1x16x32", TransformerStack(d), (torch.randn(1, 16, 32),)) for d in (2, 8)]
    return _plain_rows(models, rounds)


def resnet_rows(rounds: int) -> list[list]:
    torch.manual_seed(0)
    models = [(f"resnet-style, {d} blocks, 1x3x64x64", TinyResNet(32, d), (torch.randn(1, 3, 64, 64),)) for d in (8, 16)]
    return _plain_rows(models, rounds, with_fx=True)


def torchvision_rows(rounds: int, names) -> list[list]:
    import torchvision

    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    models = [(f"torchvision {name}, 1x3x224x224", torchvision.models.get_model(name, weights=None), (x,)) for name in names]
    return _plain_rows(models, rounds, with_fx=True)


TORCHVISION = ("resnet18", "mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x0_5", "regnet_y_400mf")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds (a smoke run)")
    parser.add_argument("--only", default="recurrent,transformer,resnet,torchvision")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per model (default 60, 20 for torchvision)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    parser.add_argument("--malloc", choices=["default", "pinned"], default="default",
                        help="pinned: fix glibc's mmap/trim thresholds (see the module docstring)")
    args = parser.parse_args(argv)
    global _clock
    _clock = CLOCKS[args.clock]
    if args.malloc == "pinned" and not pin_malloc():
        print("warning: could not pin glibc's malloc thresholds (no glibc?)")
    print(f"clock: {args.clock} time, malloc: {args.malloc}, torch {torch.__version__}, 1 thread\n")
    warnings.filterwarnings("ignore", message=".*TF32.*")
    torch.set_num_threads(1)
    sections = args.only.split(",")
    rounds = args.rounds or (6 if args.quick else 60)
    out = {}
    if "recurrent" in sections:
        out["recurrent"] = rows = recurrent_rows(rounds, RECURRENT_SIZES[1:2] if args.quick else RECURRENT_SIZES)
        print(f"small recurrent models end to end (target <= {TARGETS['recurrent']}x the original)")
        print(tabulate(rows, headers=["model", "original ms", "native ms", "prepared ms", "prepared/original",
                                      "prepared/native", "bitwise"]))
        print()
    headers = ["model", "original ms", "prepared ms", "prepared/original", "bitwise"]
    if "transformer" in sections:
        out["transformer"] = rows = transformer_rows(rounds * 3)
        print(f"tiny-op transformer (target <= {TARGETS['transformer']}x)")
        print(tabulate(rows, headers=headers))
        print()
    if "resnet" in sections:
        out["resnet"] = rows = resnet_rows(rounds)
        print(f"ResNet-style (target <= {TARGETS['resnet']}x)")
        print(tabulate(rows, headers=headers + ["plain fx/original"]))
        print()
    if "torchvision" in sections:
        names = TORCHVISION[:2] if args.quick else TORCHVISION
        out["torchvision"] = rows = torchvision_rows(args.rounds or (4 if args.quick else 20), names)
        print(f"torchvision classifiers (target <= {TARGETS['torchvision']}x)")
        print(tabulate(rows, headers=headers + ["plain fx/original"]))
    return out


if __name__ == "__main__":
    main()
