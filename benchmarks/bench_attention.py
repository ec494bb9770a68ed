"""Forward latency of :class:`qprep.modules.ModularMultiheadAttention` against ``nn.MultiheadAttention``.

Measures, on one CPU thread, in eval mode and under ``torch.no_grad()``, the median forward
time of a self-attention call ``mha(x, x, x)`` with ``need_weights`` True and False, for

* ``nn.MultiheadAttention`` on sequence-first input: its ``multi_head_attention_forward``
  path (explicit ``baddbmm``/``softmax`` with weights, the SDPA flash kernel without);
* the same module under ``sdpa_kernel(SDPBackend.MATH)``: without weights, SDPA's math
  kernel, the one the modular version spells out (with weights, the same path as above);
* the same module with ``batch_first=True``, which takes torch's fused fast path
  (``torch._native_multi_head_attention``) under these conditions;
* ``ModularMultiheadAttention.from_float`` of the first, on the same input.

The implementations run round-robin within each repeat, so drifting machine load hits them
alike. Each row also gives the largest ``|modular - nn|`` on the sequence-first path (0 where
the modular version is bit-exact).

Run: ``python benchmarks/bench_attention.py [--repeats N]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from tabulate import tabulate
from torch.nn.attention import SDPBackend, sdpa_kernel

from qprep.modules import ModularMultiheadAttention

__all__ = ["Config", "CONFIGS", "run_benchmark", "main"]


@dataclass(frozen=True)
class Config:
    seq_len: int
    batch: int
    embed_dim: int
    num_heads: int


CONFIGS = (
    Config(128, 8, 256, 8),
    Config(64, 16, 512, 8),
    Config(32, 4, 128, 4),
)


def _candidates(config: Config, x: torch.Tensor, need_weights: bool) -> dict:
    """Name -> zero-argument callable, all holding the same weights."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(config.embed_dim, config.num_heads).eval()
    fast = nn.MultiheadAttention(config.embed_dim, config.num_heads, batch_first=True).eval()
    fast.load_state_dict(mha.state_dict())
    modular = ModularMultiheadAttention.from_float(mha).eval()
    x_batch_first = x.transpose(0, 1).contiguous()

    def math_kernel():
        with sdpa_kernel(SDPBackend.MATH):
            return mha(x, x, x, need_weights=need_weights)

    return {
        "nn": lambda: mha(x, x, x, need_weights=need_weights),
        "nn math": math_kernel,
        "nn fast path": lambda: fast(x_batch_first, x_batch_first, x_batch_first, need_weights=need_weights),
        "modular": lambda: modular(x, x, x, need_weights=need_weights),
    }


def _time(candidates: dict, repeats: int) -> dict[str, float]:
    """Median milliseconds per candidate, run round-robin."""
    times = {name: [] for name in candidates}
    for fn in candidates.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def run_benchmark(configs=CONFIGS, repeats: int = 15) -> list[dict]:
    """One row per (config, need_weights): median ms, ratios, max |modular - nn|."""
    torch.set_num_threads(1)
    rows = []
    with torch.no_grad():
        for config in configs:
            x = torch.randn(config.seq_len, config.batch, config.embed_dim)
            for need_weights in (True, False):
                candidates = _candidates(config, x, need_weights)
                ms = _time(candidates, repeats)
                diff = (candidates["modular"]()[0] - candidates["nn"]()[0]).abs().max().item()
                rows.append({
                    "L": config.seq_len, "B": config.batch, "E": config.embed_dim, "heads": config.num_heads,
                    "need_weights": need_weights, **{f"{name} ms": round(v, 2) for name, v in ms.items()},
                    "modular / nn": round(ms["modular"] / ms["nn"], 2),
                    "modular / nn math": round(ms["modular"] / ms["nn math"], 2),
                    "modular / fast path": round(ms["modular"] / ms["nn fast path"], 2),
                    "max |modular - nn|": diff,
                })
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    rows = run_benchmark(repeats=args.repeats)
    print(tabulate(rows, headers="keys", floatfmt=".3g"))
    return rows


if __name__ == "__main__":
    main()
