"""Seeded multi-trial verification: trial 1 on the example inputs, later trials on random
inputs of the same structure; ``qprep verify`` and :func:`qprep.testing.assert_equivalent`
run it."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.nn as nn
from tabulate import tabulate

from ..core.errors import InputError
from ..core.inputs import as_positional
from ..core.runtime import map_tensors
from ..core.text import fmt_float
from .compare import VerifyResult, verify_outputs

__all__ = ["random_inputs_like", "run_trials", "Trial", "trials_table"]


@dataclasses.dataclass(frozen=True)
class Trial:
    """One verification run: trial number (1 = the example inputs), mode, the seed both
    models ran with, and the verdict."""

    index: int
    mode: str
    seed: int
    result: VerifyResult

    @property
    def equal(self) -> bool:
        return self.result.equal

    def as_dict(self) -> dict:
        return {"trial": self.index, "mode": self.mode, "seed": self.seed, "result": self.result.as_dict()}


def random_inputs_like(example: Any, seed: int, int_range: tuple[int, int] | None = None) -> Any:
    """Random inputs with the structure, shapes, dtypes and devices of ``example``.

    Floating and complex tensors are drawn from a standard normal distribution, bool
    tensors uniformly, integer tensors uniformly from ``int_range`` (``(low, high)``, high
    exclusive) or, without it, from the range the example tensor itself spans (token ids
    stay valid ids). Non-tensor values are kept as they are.
    """
    generator = torch.Generator().manual_seed(seed)
    return map_tensors(example, lambda t: _tensor_like(t, generator, int_range))


def _tensor_like(t: torch.Tensor, g: torch.Generator, int_range: tuple[int, int] | None) -> torch.Tensor:
    shape = tuple(t.shape)
    if t.dtype == torch.bool:
        out = torch.randint(0, 2, shape, generator=g).bool()
    elif t.is_floating_point():
        out = torch.randn(shape, generator=g).to(t.dtype)
    elif t.is_complex():
        out = torch.randn(shape, generator=g, dtype=t.dtype)
    else:
        if int_range is not None:
            low, high = int_range
        elif t.numel():
            low, high = int(t.min()), int(t.max()) + 1
        else:
            low, high = 0, 2
        out = torch.randint(low, high, shape, generator=g, dtype=t.dtype)
    return out.to(t.device)


def run_trials(
    original: nn.Module,
    prepared: nn.Module,
    example_inputs: Any,
    *,
    trials: int = 1,
    train: bool = False,
    grad: bool = False,
    seed: int = 0,
    int_range: tuple[int, int] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    check: Callable[..., VerifyResult] = verify_outputs,
) -> list[Trial]:
    """Verify ``prepared`` against ``original`` on ``trials`` inputs: trial 1 on
    ``example_inputs`` themselves, trial ``i > 1`` on :func:`random_inputs_like` with seed
    ``seed + i - 1``; each in eval mode and, with ``train``, in train mode too (dropout
    draws the same masks in both models: :func:`qprep.verify` seeds both runs with that
    seed). ``progress(i, trials, mode)`` is called before each run."""
    if trials < 1:
        raise InputError(f"trials must be at least 1, got {trials}")
    args = as_positional(example_inputs, original)
    modes = ("eval", "train") if train else ("eval",)
    runs = []
    for i in range(1, trials + 1):
        trial_seed = seed + i - 1
        inputs = args if i == 1 else random_inputs_like(args, trial_seed, int_range)
        for mode in modes:
            if progress is not None:
                progress(i, trials, mode)
            result = check(original, prepared, inputs, train=mode == "train", grad=grad, seed=trial_seed)
            runs.append(Trial(i, mode, trial_seed, result))
    return runs


def trials_table(runs: list[Trial]) -> str:
    """One row per trial and mode, then the overall verdict."""
    rows = []
    for run in runs:
        r = run.result
        bad = [o.path for o in r.outputs + r.grads if not o.equal]
        kernel = "" if r.kernel_diff is None else f"fused kernels differ by {fmt_float(r.kernel_diff)} (bound {fmt_float(r.kernel_bound)})"
        rows.append((
            run.index, run.mode, run.seed, "yes" if r.equal else "NO", fmt_float(r.max_abs_diff),
            len(r.outputs) + len(r.grads), ", ".join(bad[:4]) + (" ..." if len(bad) > 4 else ""),
            r.reference, kernel or (f"first bad pass: {r.first_bad_pass}" if r.first_bad_pass else "")
            or ("INCONCLUSIVE (empty)" if r.caveats else ""),
        ))
    table = tabulate(rows, headers=["trial", "mode", "seed", "bitwise equal", "max abs diff", "checked",
                                    "differing", "reference", "note"])
    ok = all(run.equal for run in runs)
    caveats = dict.fromkeys(c for run in runs for c in run.result.caveats)
    verdict = f"verdict: {'EQUIVALENT' if ok else 'NOT EQUIVALENT'} ({len(runs)} run{'s' if len(runs) != 1 else ''})"
    return "\n".join([table, verdict, *(f"INCONCLUSIVE: {c}" for c in caveats)])
