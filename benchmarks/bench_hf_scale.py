"""Preparing a large Hugging Face decoder on the meta device (issue 9): time and peak memory.

    python benchmarks/bench_hf_scale.py [--layers 1,8,32,80] [--hidden 4096] [--repeats 1]

A ``LlamaForCausalLM`` at the 7B configuration (hidden size 4096, 11008 MLP, 32 heads,
vocabulary 32000) is built under ``torch.device("meta")`` (no weights allocated) and
prepared on meta example inputs (``input_ids`` 1x16): ``qprep.prepare(model, inputs)``,
which skips the bitwise check with a note (there are no values). Each row runs in a fresh
process, so its peak RSS (``ru_maxrss``) is its own; the time is the median of
``--repeats`` prepares in that process, and next to it the same with ``dedup=False`` (every
repeated block traced again instead of replayed; :mod:`qprep.capture.blocks`), timed
alternately, with the number of module calls replayed. Next to it, ``torch.fx.symbolic_trace`` cannot
trace the model at all (it reads shapes), so the reference column is the time to build
the meta model. Targets: 32 layers under 10 s and under 2 GB of RSS on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from tabulate import tabulate


def _one(layers: int, hidden: int, repeats: int) -> dict:
    import resource

    import torch
    import transformers

    import qprep
    from qprep.core import meta

    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 43 // 16, num_hidden_layers=layers,
                                      num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128,
                                      vocab_size=32000)
    start = time.perf_counter()
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config).eval()
    build = time.perf_counter() - start
    inputs = {"input_ids": torch.zeros(1, 16, dtype=torch.long, device="meta")}
    times, plain, nodes, replayed = [], [], 0, ()
    for _ in range(repeats):  # with and without dedup, alternately
        start = time.perf_counter()
        gm = qprep.prepare(model, inputs)
        times.append(time.perf_counter() - start)
        nodes, replayed = len(gm.graph.nodes), meta.graph_fact(gm, meta.REPLAYED) or ()
        del gm
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the peak with dedup (the default)
        start = time.perf_counter()
        qprep.prepare(model, inputs, dedup=False)
        plain.append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters())
    return {"layers": layers, "params": params, "build": build, "prepare": statistics.median(times), "nodes": nodes,
            "plain": statistics.median(plain), "replayed": len(replayed),
            "replayed_nodes": sum(r.nodes for r in replayed), "rss": rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="1,8,32,80")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(_one(args.child, args.hidden, args.repeats)))
        return
    rows = []
    for layers in (int(n) for n in args.layers.split(",")):
        out = subprocess.run([sys.executable, __file__, "--child", str(layers), "--hidden", str(args.hidden),
                              "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append([r["layers"], f"{r['params'] / 1e9:.2f}B", r["nodes"], f"{r['build']:.2f}", f"{r['prepare']:.2f}",
                     f"{r['prepare'] / r['layers']:.3f}", f"{r['plain']:.2f}", f"{r['prepare'] / r['plain']:.2f}x",
                     f"{r['replayed']} ({r['replayed_nodes']} nodes)", f"{r['rss']:.0f}"])
    print(tabulate(rows, headers=["layers", "parameters (meta)", "graph nodes", "build s", "prepare s",
                                  "prepare s / layer", "dedup=False s", "dedup / not", "calls replayed",
                                  "peak RSS MB"]))


if __name__ == "__main__":
    main()
