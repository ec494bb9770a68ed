"""prepare() time over plain torch.fx.symbolic_trace time on torchvision and timm models,
the cost of each stage of prepare, and forward latency of the prepared model over the
original, measured side by side in one run.

    python benchmarks/bench_prepare.py [--quick] [--models NAME,NAME,...] [--skip-latency]

Targets (issue 8): ``prepare(model, example_inputs, check=False)`` <= 1.5x
``torch.fx.symbolic_trace(model)``, median over the models below (random weights, nothing
downloaded; models plain fx can trace, so the ratio exists), and prepare with verification
no more than that plus two forward passes (batch 1, 224x224). Each row times fx and prepare
alternately, after one warm-up call of each, and reports medians; ``inplace/fx`` is
``prepare(..., inplace=True)``, without the copy of the model. Everything runs on one
thread (``torch.set_num_threads(1)``): steadier on a shared machine.

The stage breakdown comes from one more, instrumented ``prepare(check=True)`` per model: the
benchmark wraps qprep's own functions in time accumulators (the library holds no timing
code). A stage's time excludes the stages nested in it (value propagation runs inside the
trace, code generation inside trace and passes): copy (``api._working_copy``), trace
(``capture.tracer.trace``), value propagation (``Values.record``), passes (``run_pipeline``
less its lint), lint (``Graph.lint``), code generation (``GraphModule.recompile``), verify
(``api.verify``), other (the rest of ``prepare``: analysis, guards, bookkeeping).

Forward latency (issue 12 targets in thread CPU time: ``bench_speed.py``): the last table.
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics
import sys
import time
import warnings
from typing import Callable

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


# -- the models -------------------------------------------------------------------------
def _tv(name: str, **kwargs) -> Callable[[], nn.Module]:
    def make():
        import torchvision

        return getattr(torchvision.models, name)(weights=None, **kwargs)

    return make


def _timm(name: str) -> Callable[[], nn.Module]:
    def make():
        import timm

        return timm.create_model(name, pretrained=False)

    return make


#: (name, factory): models plain ``torch.fx.symbolic_trace`` can trace.
MODELS: list[tuple[str, Callable[[], nn.Module]]] = [
    ("resnet18", _tv("resnet18")),
    ("resnet50", _tv("resnet50")),
    ("mobilenet_v2", _tv("mobilenet_v2")),
    ("mobilenet_v3_small", _tv("mobilenet_v3_small")),
    ("efficientnet_b0", _tv("efficientnet_b0")),
    ("regnet_y_400mf", _tv("regnet_y_400mf")),
    ("shufflenet_v2_x0_5", _tv("shufflenet_v2_x0_5")),
    ("densenet121", _tv("densenet121")),
    ("squeezenet1_0", _tv("squeezenet1_0")),
    ("vgg11", _tv("vgg11")),
    ("googlenet", _tv("googlenet", aux_logits=False, init_weights=False)),
    ("convnext_tiny", _tv("convnext_tiny")),
    ("mnasnet0_5", _tv("mnasnet0_5")),
    ("timm resnet18", _timm("resnet18")),
    ("timm efficientnet_b0", _timm("efficientnet_b0")),
    ("timm mobilenetv3_small_100", _timm("mobilenetv3_small_100")),
    ("timm regnetx_002", _timm("regnetx_002")),
]
QUICK = ("resnet18", "mobilenet_v3_small", "squeezenet1_0", "timm resnet18")


def _median(fn, repeats: int) -> float:
    """Median wall time; the garbage collector runs before each call, not during it."""
    times = []
    for _ in range(repeats):
        times.append(_timed(fn))
    return statistics.median(times)


def _timed(fn) -> float:
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    finally:
        gc.enable()


def _alternating(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median time of each function, calls alternated (a, b, c, a, b, c, ...) so that drift in
    machine load hits all alike; one untimed warm-up call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            times[key].append(_timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


# -- the stage breakdown ----------------------------------------------------------------
STAGES = ("copy", "trace", "values", "passes", "lint", "codegen", "verify")


class StageClock:
    """Exclusive time per stage: time spent in a stage nested in another (value
    propagation inside the trace) counts for the inner one only."""

    def __init__(self):
        self.totals = dict.fromkeys(STAGES, 0.0)
        self._stack: list[list] = []  # [stage, started]

    def wrap(self, stage: str, fn: Callable) -> Callable:
        clock = self

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            now = time.perf_counter()
            if clock._stack:
                outer = clock._stack[-1]
                clock.totals[outer[0]] += now - outer[1]
            entry = [stage, now]
            clock._stack.append(entry)
            try:
                return fn(*args, **kwargs)
            finally:
                end = time.perf_counter()
                clock.totals[stage] += end - entry[1]
                clock._stack.pop()
                if clock._stack:
                    clock._stack[-1][1] = end

        timed.__wrapped_by_bench__ = fn
        return timed


def _qprep_modules():
    return [m for name, m in list(sys.modules.items()) if m is not None and name.split(".")[0] == "qprep"]


class instrumented:
    """Time accumulators around qprep's functions for the length of a ``with`` block.
    A module-level function is replaced in every qprep module that imported it by name."""

    def __init__(self, clock: StageClock):
        self.clock = clock
        self.undo: list[tuple[object, str, object]] = []
        self.missing: list[str] = []

    def _patch(self, owner, name: str, stage: str) -> None:
        original = getattr(owner, name)
        owner_dict = owner.__dict__ if isinstance(owner, type) else None
        if owner_dict is not None:
            original = owner_dict[name]
        self.undo.append((owner, name, original))
        setattr(owner, name, self.clock.wrap(stage, original))

    def _function(self, module: str, name: str, stage: str) -> None:
        try:
            original = getattr(sys.modules[module], name)
        except (KeyError, AttributeError):
            self.missing.append(f"{module}.{name}")
            return
        for m in _qprep_modules():
            for attr, value in list(vars(m).items()):
                if value is original:
                    self._patch(m, attr, stage)

    def _method(self, cls: type | None, name: str, stage: str, label: str) -> None:
        if cls is None or name not in cls.__dict__:
            self.missing.append(label)
            return
        self._patch(cls, name, stage)

    def __enter__(self):
        import qprep.api
        import qprep.capture
        import qprep.passes

        values_cls = getattr(sys.modules.get("qprep.capture.values"), "Values", None)
        self._function("qprep.api", "_working_copy", "copy")
        self._function("qprep.capture.tracer", "trace", "trace")
        self._method(values_cls, "record", "values", "qprep.capture.values.Values.record")
        self._function("qprep.passes.pipeline", "run_pipeline", "passes")
        self._method(torch.fx.Graph, "lint", "lint", "torch.fx.Graph.lint")
        self._method(torch.fx.GraphModule, "recompile", "codegen", "torch.fx.GraphModule.recompile")
        self._function("qprep.api", "verify", "verify")
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self.undo):
            setattr(owner, name, original)
        self.undo.clear()


def stage_times(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, float], float, list[str]]:
    """Per-stage seconds of one ``prepare(check=True)``, its total, and functions not found."""
    clock = StageClock()
    with instrumented(clock) as inst:
        total = _timed(lambda: qprep.prepare(model, (x,)))
    return dict(clock.totals), total, inst.missing


# -- the tables -------------------------------------------------------------------------
def _forward_twice(model: nn.Module, x: torch.Tensor) -> float:
    def run():
        with torch.no_grad():
            model(x)
            model(x)

    run()
    return _median(run, 3)


def prepare_rows(models, repeats: int):
    """Per model: fx and prepare timings, and the stage breakdown (seconds)."""
    rows, stages, missing = [], [], set()
    for name, model, x in models:
        model.eval()
        n = len(torch.fx.symbolic_trace(model).graph.nodes)
        t = _alternating({
            "fx": lambda: torch.fx.symbolic_trace(model),
            "prep": lambda: qprep.prepare(model, (x,), check=False),
            "inplace": lambda: qprep.prepare(model, (x,), check=False, inplace=True),
        }, repeats)
        t_check = _alternating({"check": lambda: qprep.prepare(model, (x,))}, max(1, repeats // 2))["check"]
        t_fwd2 = _forward_twice(model, x)
        breakdown, total, lost = stage_times(model, x)
        missing.update(lost)
        rows.append(dict(name=name, nodes=n, fx=t["fx"], prep=t["prep"], inplace=t["inplace"], check=t_check,
                         fwd2=t_fwd2))
        stages.append((name, breakdown, total))
        print(f"  {name}: prepare/fx {t['prep'] / t['fx']:.2f}x", file=sys.stderr, flush=True)
    return rows, stages, sorted(missing)


def _ms(s: float) -> str:
    return f"{s * 1e3:.0f}" if s >= 0.01 else f"{s * 1e3:.1f}"


def print_prepare(rows, stages, missing) -> None:
    table = [[r["name"], r["nodes"], _ms(r["fx"]), _ms(r["prep"]), f"{r['prep'] / r['fx']:.2f}x",
              f"{r['inplace'] / r['fx']:.2f}x", _ms(r["check"]), f"{r['check'] / r['fx']:.2f}x", _ms(r["fwd2"]),
              f"{(r['prep'] + r['fwd2']) / r['fx']:.2f}x"] for r in rows]
    med = lambda key: statistics.median(key(r) for r in rows)  # noqa: E731
    table.append(["median", "", "", "", f"{med(lambda r: r['prep'] / r['fx']):.2f}x",
                  f"{med(lambda r: r['inplace'] / r['fx']):.2f}x", "",
                  f"{med(lambda r: r['check'] / r['fx']):.2f}x", "",
                  f"{med(lambda r: (r['prep'] + r['fwd2']) / r['fx']):.2f}x"])
    print("prepare(model, example_inputs, check=False) vs torch.fx.symbolic_trace(model), same run")
    print(tabulate(table, headers=[
        "model", "fx nodes", "fx ms", "prepare ms", "prepare/fx", "inplace/fx", "prepare+verify ms", "(prepare+verify)/fx",
        "2 forwards ms", "(prepare+2 fwd)/fx"], disable_numparse=True))
    print()
    print("stages of prepare(check=True), ms (exclusive: nested stages counted once, in the inner one)")
    table = []
    sums = dict.fromkeys((*STAGES, "other"), 0.0)
    for name, breakdown, total in stages:
        other = total - sum(breakdown.values())
        for k in STAGES:
            sums[k] += breakdown[k]
        sums["other"] += other
        table.append([name, *(_ms(breakdown[k]) for k in STAGES), _ms(other), _ms(total)])
    grand = sum(sums.values())
    table.append(["share of all", *(f"{sums[k] / grand:.0%}" for k in (*STAGES, "other")), ""])
    print(tabulate(table, headers=["model", *STAGES, "other", "total"], disable_numparse=True))
    if missing:
        print(f"(not found, so not timed: {', '.join(missing)})")


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


def _zoo(names: list[str] | None, quick: bool):
    """(name, model, input) for the chosen models, built one at a time (all of them at once
    would hold about 1.5 GB of weights)."""
    if names:
        unknown = set(names) - {n for n, _ in MODELS}
        if unknown:
            raise SystemExit(f"unknown models: {', '.join(sorted(unknown))}; known: {', '.join(n for n, _ in MODELS)}")
    for name, make in MODELS:
        if names is not None and name not in names or names is None and quick and name not in QUICK:
            continue
        try:
            model = make()
        except ImportError as exc:  # timm is a test extra
            print(f"  skipped {name}: {exc}", file=sys.stderr)
            continue
        yield name, model.eval(), torch.randn(1, 3, 224, 224)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="four models, few repeats (a smoke run)")
    parser.add_argument("--models", help="comma-separated model names (default: all)")
    parser.add_argument("--repeats", type=int, help="timed calls per function and model")
    parser.add_argument("--skip-latency", action="store_true", help="only the prepare tables")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(1)  # steadier on a shared machine; forwards and verify alike
    torch.manual_seed(0)
    models = _zoo(args.models.split(",") if args.models else None, args.quick)
    rows, stages, missing = prepare_rows(models, repeats)
    print_prepare(rows, stages, missing)
    if args.skip_latency:
        return
    print()
    print("forward latency, 1 thread, batch 1 (median of interleaved runs)")
    depths = (2, 4) if args.quick else (8, 16)
    lat = [(f"resnet-style, {d} blocks", TinyResNet(32, d), torch.randn(1, 3, 64, 64)) for d in depths]
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
