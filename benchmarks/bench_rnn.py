"""Forward latency of :class:`qprep.modules.ModularLSTM` against ``nn.LSTM`` and torch.ao's LSTM.

Measures, on one CPU thread and under ``torch.no_grad()``, the median forward time of

* ``nn.LSTM`` with its default CPU kernel (oneDNN) and with the native ATen kernel
  (``torch.backends.mkldnn.flags(enabled=False)``, the kernel ModularLSTM is bit-exact to);
* ``torch.ao.nn.quantizable.LSTM`` on its float path (no observers), holding the same weights;
* ``ModularLSTM.from_float`` of the same ``nn.LSTM``.

The implementations run round-robin within each repeat, the order alternating, so drifting
machine load hits them alike; a ratio is the median over repeats of that repeat's ratio,
and time is the calling thread's CPU time (``--clock wall`` for wall time). Each row also
reports the largest absolute output difference to the oneDNN kernel.

Target (issue 12): ``Modular / native`` <= 1.1 on every row.

Run: ``python benchmarks/bench_rnn.py [--repeats N] [--clock cpu|wall]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
from tabulate import tabulate

from qprep.modules import ModularLSTM

__all__ = ["Config", "CONFIGS", "run_benchmark", "onednn_difference", "main"]


@dataclass(frozen=True)
class Config:
    seq_len: int
    batch: int
    input_size: int
    hidden_size: int
    num_layers: int = 2
    bidirectional: bool = False


CONFIGS = (
    Config(64, 16, 256, 256),
    Config(64, 16, 256, 256, bidirectional=True),
    Config(32, 8, 128, 128),
    Config(32, 8, 128, 128, bidirectional=True),
)


def _ao_lstm(lstm: nn.LSTM) -> nn.Module:
    """torch.ao's quantizable LSTM on its float path (no observers) with ``lstm``'s weights.

    Its constructor sizes layers >0 of a bidirectional stack wrongly, so the layers are
    rebuilt from the float module (``LSTM.from_float`` would also insert observers).
    """
    from torch.ao.nn.quantizable.modules.rnn import LSTM, _LSTMLayer

    ao = LSTM(lstm.input_size, lstm.hidden_size, lstm.num_layers, bidirectional=lstm.bidirectional)
    qconfig = torch.ao.quantization.default_qconfig
    for index in range(lstm.num_layers):
        ao.layers[index] = _LSTMLayer.from_float(lstm, index, qconfig, batch_first=False)
    return ao.eval()


def _native(module: nn.Module):
    def call(x):
        with torch.backends.mkldnn.flags(enabled=False):
            return module(x)
    return call


CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}


def run_benchmark(configs=CONFIGS, repeats: int = 15, clock=time.thread_time) -> list[dict]:
    """One row per config: median forward milliseconds, ratios, max |diff| to oneDNN."""
    torch.set_num_threads(1)
    rows = []
    for config in configs:
        torch.manual_seed(0)
        lstm = nn.LSTM(config.input_size, config.hidden_size, config.num_layers, bidirectional=config.bidirectional).eval()
        x = torch.randn(config.seq_len, config.batch, config.input_size)
        candidates = {
            "nn.LSTM": lstm,
            "nn.LSTM native": _native(lstm),
            "torch.ao": _ao_lstm(lstm),
            "ModularLSTM": ModularLSTM.from_float(lstm).eval(),
        }
        times = {name: [] for name in candidates}
        with torch.no_grad():
            if not torch.allclose(candidates["torch.ao"](x)[0], lstm(x)[0], atol=1e-5):
                raise RuntimeError("torch.ao's LSTM does not compute what nn.LSTM does; the comparison is void")
            for fn in candidates.values():
                fn(x)  # warm-up
            order = list(candidates)
            for repeat in range(repeats):
                for name in (order if repeat % 2 == 0 else order[::-1]):
                    start = clock()
                    candidates[name](x)
                    times[name].append(clock() - start)
            diff = _max_difference(lstm(x), candidates["ModularLSTM"](x))
        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        ratio = {name: statistics.median(m / o for m, o in zip(times["ModularLSTM"], t)) for name, t in times.items()}
        rows.append({
            "T": config.seq_len, "B": config.batch, "I=H": config.hidden_size, "layers": config.num_layers,
            "bidir": config.bidirectional, **{f"{name} ms": round(v, 2) for name, v in ms.items()},
            "Modular / native": round(ratio["nn.LSTM native"], 3),
            "Modular / nn.LSTM": round(ratio["nn.LSTM"], 2),
            "Modular / torch.ao": round(ratio["torch.ao"], 2),
            "max |diff| vs oneDNN": diff,
        })
    return rows


def onednn_difference(seq_lens=(5, 32), batches=(1, 4), sizes=((16, 16), (32, 64), (128, 128)), seed: int = 0) -> float:
    """Largest ``|ModularLSTM - nn.LSTM|`` (outputs and final states) over a small grid."""
    worst = 0.0
    with torch.no_grad():
        for (input_size, hidden_size) in sizes:
            for num_layers, bidirectional in ((1, False), (2, True)):
                torch.manual_seed(seed)
                lstm = nn.LSTM(input_size, hidden_size, num_layers, bidirectional=bidirectional).eval()
                modular = ModularLSTM.from_float(lstm).eval()
                for seq_len in seq_lens:
                    for batch in batches:
                        x = torch.randn(seq_len, batch, input_size)
                        worst = max(worst, _max_difference(lstm(x), modular(x)))
    return worst


def _max_difference(expected, got) -> float:
    """Largest ``|a - b|`` over ``(output, (h_n, c_n))``."""
    (a, (h, c)), (b, (h2, c2)) = expected, got
    return max((x - y).abs().max().item() for x, y in ((a, b), (h, h2), (c, c2)))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*TF32.*")
    rows = run_benchmark(repeats=args.repeats, clock=CLOCKS[args.clock])
    print(tabulate(rows, headers="keys", floatfmt=".3g"))
    print(f"\nlargest |ModularLSTM - nn.LSTM (oneDNN)| over the grid: {onednn_difference():.3g}")
    return rows


if __name__ == "__main__":
    main()
