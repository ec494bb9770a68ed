"""prepare() time over plain torch.fx.symbolic_trace time, and forward latency of the
prepared model over the original, measured side by side in one run.

    python benchmarks/bench_prepare.py [--quick]

Targets (issue 2): prepare <= 1.5x symbolic_trace, linear growth with graph size;
prepared forward <= 1.05x the original on a ResNet-style model (1 thread, batch 1).
Forward latency against the issue 12 targets, in thread CPU time: ``bench_speed.py``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
import torch.fx
import torch.nn as nn
from tabulate import tabulate

import qprep
from qprep.examples import AttentionBlock, TinyResNet


class Stack(nn.Module):
    def __init__(self, depth: int, dim: int = 32):
        super().__init__()
        self.blocks = nn.ModuleList([AttentionBlock(dim, 4) for _ in range(depth)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _median(fn, repeats: int) -> float:
    """Median wall time; the garbage collector runs before each call, not during it."""
    times = []
    for _ in range(repeats):
        gc.collect()
        gc.disable()
        try:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        finally:
            gc.enable()
    return statistics.median(times)


def _nodes(model) -> int:
    return len(torch.fx.symbolic_trace(model).graph.nodes)


def prepare_rows(models, repeats):
    rows = []
    for name, model, x in models:
        model.eval()
        t_fx = _median(lambda: torch.fx.symbolic_trace(model), repeats)
        t_prep = _median(lambda: qprep.prepare(model), repeats)
        t_inplace = _median(lambda: qprep.prepare(model, inplace=True), repeats)
        t_check = _median(lambda: qprep.prepare(model, (x,)), max(1, repeats // 2))
        n = _nodes(model)
        rows.append([name, n, f"{t_fx * 1e3:.0f}", f"{t_prep * 1e3:.0f}", f"{t_prep / t_fx:.2f}x",
                     f"{t_inplace / t_fx:.2f}x", f"{t_check / t_fx:.2f}x", f"{t_prep / n * 1e6:.0f}"])
    return rows


def latency_rows(models, repeats):
    """Calls alternate one by one (original, prepared, original, ...) so that drift in
    clock speed and caches hits both alike; the ratio is the median of per-pair ratios.
    Plain fx is left out ("-") where ``symbolic_trace`` cannot trace the model."""
    torch.set_num_threads(1)
    rows = []
    for name, model, x in models:
        model.eval()
        gm = qprep.prepare(model, (x,))
        try:
            fx = torch.fx.symbolic_trace(model)
        except Exception:  # noqa: BLE001  (a benchmark column, not a check)
            fx = None
        runs = [("original", model), ("prepared", gm)] + ([("fx", fx)] if fx is not None else [])
        times = {key: [] for key, _ in runs}
        with torch.no_grad():
            for _ in range(5):
                for _, fn in runs:
                    fn(x)
            for i in range(repeats * 10):
                for key, fn in runs if i % 2 else runs[::-1]:
                    start = time.perf_counter()
                    fn(x)
                    times[key].append(time.perf_counter() - start)
        ratio = statistics.median(b / a for a, b in zip(times["original"], times["prepared"]))
        fx_ratio = statistics.median(b / a for a, b in zip(times["original"], times["fx"])) if fx is not None else None
        rows.append([name, f"{statistics.median(times['original']) * 1e3:.2f}",
                     f"{statistics.median(times['prepared']) * 1e3:.2f}", f"{ratio:.3f}x",
                     f"{fx_ratio:.3f}x" if fx_ratio is not None else "-"])
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (a smoke run)")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else 7
    depths = (2, 4) if args.quick else (8, 16, 32, 64)
    torch.manual_seed(0)
    models = [(f"resnet-style, {d} blocks", TinyResNet(16, d), torch.randn(1, 3, 32, 32)) for d in depths]
    models += [(f"transformer-like, {d} blocks", Stack(d), torch.randn(1, 16, 32)) for d in depths]
    print("prepare() time vs torch.fx.symbolic_trace (same models, same run)")
    print(tabulate(prepare_rows(models, repeats), headers=[
        "model", "fx nodes", "fx ms", "prepare ms", "prepare/fx", "inplace/fx", "with inputs+verify/fx", "us/node"]))
    print()
    print("forward latency, 1 thread, batch 1 (median of interleaved runs)")
    lat = [(f"resnet-style, {d} blocks", TinyResNet(32, d), torch.randn(1, 3, 64, 64)) for d in depths[:2]]
    lat += [(f"transformer-like, {d} blocks", Stack(d), torch.randn(1, 16, 32)) for d in depths[:1]]
    try:
        import torchvision

        lat.append(("torchvision resnet18", torchvision.models.resnet18(weights=None), torch.randn(1, 3, 224, 224)))
    except ImportError:
        pass
    print(tabulate(latency_rows(lat, repeats), headers=[
        "model", "original ms", "prepared ms", "prepared/original", "plain fx/original"]))


if __name__ == "__main__":
    main()
