"""int8 vs float latency of prepared models converted with ``qprep.quant.quantize_int8``,
measured side by side in one run.

    python benchmarks/bench_int8.py [--quick]

For each model: ``qprep.prepare`` (float, bitwise equal to the original), then conv/bn/relu
fusion, fake quantization, calibration on random batches and ``torch.ao`` convert with qprep's
twins. Forward latency on 1 thread of the float prepared model (bitwise the original) and of the
int8 one, calls alternated one by one (float, int8, float, ...); the ratio is the median of
per-pair ratios. Also: how far the int8 logits are from the fake-quant
simulation they were converted from, in steps of the output grid.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.fx
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qprep  # noqa: E402
import qprep.quant as qq  # noqa: E402
from tests.quant.tasks import SmallCNN  # noqa: E402


def _models(quick: bool):
    size = 32 if quick else 64
    models = [(f"SmallCNN width 32, {size}x{size}", SmallCNN(width=32), torch.randn(1, 1, size, size))]
    if not quick:
        models.append((f"SmallCNN width 64, {size}x{size}", SmallCNN(width=64), torch.randn(1, 1, size, size)))
    try:
        import torchvision

        side = 112 if quick else 224
        models.append((f"torchvision resnet18, {side}x{side}", torchvision.models.resnet18(weights=None),
                       torch.randn(1, 3, side, side)))
    except ImportError:
        pass
    return models


def _output_step(simulation: torch.fx.GraphModule) -> float:
    """The grid step of the model's output: the fake quantizer of the module that feeds the
    dequant stub before the output."""
    output = next(n for n in simulation.graph.nodes if n.op == "output")
    dequant = output.all_input_nodes[0]
    producer = simulation.get_submodule(dequant.all_input_nodes[0].target)
    return producer.activation_post_process.scale.item()


def _row(name, model, x, repeats):
    model.eval()
    gm = qprep.prepare(model, (x,))
    batches = [torch.randn(4, *x.shape[1:]) for _ in range(4)]
    simulation, int8 = qq.quantize_int8(gm, (x,), batches)
    times = {"float": [], "int8": []}
    with torch.no_grad():
        for _ in range(3):
            gm(x), int8(x)
        for i in range(repeats):
            runs = [("float", gm), ("int8", int8)]
            for key, fn in runs if i % 2 else runs[::-1]:
                start = time.perf_counter()
                fn(x)
                times[key].append(time.perf_counter() - start)
        check = torch.randn(8, *x.shape[1:])
        out_sim, out_int8 = simulation(check), int8(check)
    steps = ((out_int8 - out_sim).abs() / _output_step(simulation)).flatten()
    ratio = statistics.median(b / a for a, b in zip(times["float"], times["int8"]))
    return [name, f"{statistics.median(times['float']) * 1e3:.2f}", f"{statistics.median(times['int8']) * 1e3:.2f}",
            f"{ratio:.2f}x", f"{steps.mean().item():.2f} / {steps.max().item():.1f}"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (a smoke run)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    repeats = 10 if args.quick else 40
    print(f"int8 vs float forward latency, 1 thread, batch 1, engine {torch.backends.quantized.engine} "
          "(median of interleaved runs)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = [_row(name, model, x, repeats) for name, model, x in _models(args.quick)]
    print(tabulate(rows, headers=["model", "float ms", "int8 ms", "int8/float", "|int8 - sim| mean / max (steps)"]))


if __name__ == "__main__":
    main()
