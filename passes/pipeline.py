"""The pass pipeline: a plain ordered list, and the runner.

The runner logs each pass, lints the graph after it, and wraps a failure as "pass X failed
after [A, B]". It regenerates the code once at the end (code generation is the costliest
step of a pass and no pass reads the code; not at all with ``recompile=False``, for a
caller that builds new modules from the graph), and after each pass only when a callback
wants to run the intermediate model. Running the pipeline on its own output changes nothing.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch.fx

from qprep.core.config import PrepareConfig
from qprep.core.errors import PassError, QprepError
from qprep.core.records import PassResult
from qprep.passes.convert_functionals import convert_functionals
from qprep.passes.expand_rnns import expand_rnns
from qprep.passes.split_reused_modules import split_reused_modules
from qprep.passes.wrap_tensor_ops import wrap_tensor_ops

__all__ = ["PIPELINE", "Pass", "run_pipeline", "pass_name"]

log = logging.getLogger("qprep")

Pass = Callable[[torch.fx.GraphModule, PrepareConfig], PassResult]

#: The passes, in order: compound modules first (their new modules are single call sites),
#: then functionals (so ``torch.relu`` becomes ``nn.ReLU`` rather than a wrapper), then the
#: remaining tensor ops, and last the split of re-used modules.
PIPELINE: tuple[Pass, ...] = (expand_rnns, convert_functionals, wrap_tensor_ops, split_reused_modules)


def pass_name(p: Pass) -> str:
    return getattr(p, "__name__", repr(p))


def run_pipeline(
    gm: torch.fx.GraphModule,
    config: PrepareConfig,
    passes: Sequence[Pass] | None = None,
    after_each: Callable[[str, torch.fx.GraphModule], None] | None = None,
    recompile: bool = True,
) -> list[PassResult]:
    """Run ``passes`` (default: :data:`PIPELINE`) in order on ``gm`` (mutated in place);
    return their results. ``recompile=False``: ``gm``'s code is left as it was (the caller
    makes new modules from ``gm.graph``)."""
    passes = PIPELINE if passes is None else passes
    results: list[PassResult] = []
    done: list[str] = []
    for p in passes:
        name = pass_name(p)
        try:
            result = p(gm, config)
            gm.graph.lint()
            if result.changed and after_each is not None:
                gm.recompile()
        except QprepError:
            raise
        except Exception as exc:  # noqa: BLE001  (a bug in a pass: say which one)
            raise PassError(
                f"pass {name} failed after [{', '.join(done)}]: {type(exc).__name__}: {exc}",
                pass_name=name, completed=tuple(done),
            ) from exc
        log.info("qprep: %s: %d rewritten, %d left alone", name, len(result.rewritten), len(result.skipped))
        results.append(result)
        done.append(name)
        if after_each is not None:
            after_each(name, gm)
    if recompile and after_each is None and any(r.changed for r in results):
        gm.recompile()
    return results
