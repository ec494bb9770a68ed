"""A fuzz campaign: many seeds through the generator and the oracle, with statistics and
readable failure reports (used by ``tests/test_fuzz.py`` and ``python -m tests.fuzz``)."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import multiprocessing
import os
import time
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import torch

from tests.fuzz.generator import UNTRACEABLE_FEATURES, Program, generate
from tests.fuzz.oracle import EQUAL, FAILURE, INVALID, REFUSED, Outcome, check, minimize

__all__ = ["Campaign", "run", "quiet", "report_failure", "is_failure", "workers"]


def is_failure(outcome: Outcome, known: Iterable[str] = ()) -> bool:
    """Whether ``outcome`` fails the fuzz test: a failure, an invalid program (a generator
    bug), or an equal outcome with a signature (``kernel_bound``, ...) whose finding is not
    listed as known."""
    if outcome.verdict in (FAILURE, INVALID):
        return True
    return bool(set(outcome.signatures) - set(known))


@dataclasses.dataclass
class Campaign:
    programs: int = 0
    seconds: float = 0.0
    labels: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    refused_by: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    features_equal: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    new_batch: int = 0
    grads: int = 0
    failures: list[tuple[Program, Outcome]] = dataclasses.field(default_factory=list)

    def add(self, program: Program, outcome: Outcome, known: Iterable[str]) -> None:
        self.programs += 1
        self.labels[outcome.label] += 1
        if outcome.verdict == REFUSED:
            kinds = sorted(program.features & UNTRACEABLE_FEATURES) or ["(none marked)"]
            self.refused_by[", ".join(kinds)] += 1
        if outcome.verdict == EQUAL:
            self.features_equal.update(program.features)
            self.new_batch += outcome.new_batch_checked
            self.grads += outcome.grad_checked
        if is_failure(outcome, known):
            self.failures.append((program, outcome))

    def summary(self) -> str:
        n = max(self.programs, 1)
        parts = [f"{label} {count} ({100 * count / n:.0f}%)" for label, count in self.labels.most_common()]
        equal = sum(c for label, c in self.labels.items() if label.startswith("equal"))
        lines = [
            f"qprep fuzz: {self.programs} programs in {self.seconds:.1f} s: " + ", ".join(parts),
            f"  equal programs also checked at another batch size: {self.new_batch}/{equal}, "
            f"gradients compared: {self.grads}/{equal}",
        ]
        if self.refused_by:
            lines.append("  refused, by construct: " + ", ".join(f"{k} {c}" for k, c in self.refused_by.most_common()))
        return "\n".join(lines)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """One intra-op thread (tiny ops on a shared 2-core machine are 30x faster on one) and
    no warnings from the generated programs (deprecated spellings are on purpose)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.set_num_threads(threads)


def _check_all(seeds: list[int], directory: str, exclude: tuple[str, ...]) -> list[Outcome]:
    with quiet():
        return [check(generate(seed, exclude=exclude), directory) for seed in seeds]


def workers() -> int:
    """Processes a campaign runs in: ``QPREP_FUZZ_WORKERS``, else one per core."""
    return max(1, int(os.environ.get("QPREP_FUZZ_WORKERS", os.cpu_count() or 1)))


def run(seeds: Iterable[int], directory: Path | str, exclude: Iterable[str] = (), known: Iterable[str] = (),
        processes: int | None = None) -> Campaign:
    """Generate and check one program per seed, in ``processes`` worker processes (default
    :func:`workers`; one runs them here). Results are gathered in seed order."""
    campaign = Campaign()
    seeds, exclude, known = list(seeds), tuple(exclude), tuple(known)
    processes = min(processes or workers(), max(1, len(seeds) // 50))
    start = time.perf_counter()
    if processes == 1:
        outcomes = _check_all(seeds, str(directory), exclude)
    else:  # interleaved shares (programs grow with the seed's features, not its value)
        shares = [seeds[i::processes] for i in range(processes)]
        context = multiprocessing.get_context("spawn")  # fork after torch's thread pools start is unsafe
        with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
            done = list(pool.map(_check_all, shares, [str(directory)] * processes, [exclude] * processes))
        by_seed = {seed: outcome for share, results in zip(shares, done) for seed, outcome in zip(share, results)}
        outcomes = [by_seed[seed] for seed in seeds]
    for seed, outcome in zip(seeds, outcomes):
        campaign.add(generate(seed, exclude=exclude), outcome, known)
    campaign.seconds = time.perf_counter() - start
    return campaign


def report_failure(program: Program, outcome: Outcome, directory: Path | str, shrink: bool = True) -> str:
    """The failure with the seed, how to replay it, the program and (``shrink``) the
    smallest program that still fails the same way."""
    lines = [
        f"=== seed {program.seed}: {outcome.label} at {outcome.stage} ===",
        outcome.detail or "\n".join(outcome.signatures.values()),
        f"replay: python -m tests.fuzz {program.seed} --minimize   (or QPREP_FUZZ_SEEDS={program.seed} "
        "python -m pytest tests/test_fuzz.py -q)",
        f"features: {', '.join(sorted(program.features))}",
        "--- program ---",
        program.source,
    ]
    if shrink:
        first_line = (outcome.detail or "").splitlines()[0] if outcome.detail else ""

        def same_failure(o: Outcome) -> bool:
            o_first = (o.detail or "").splitlines()[0] if o.detail else ""
            return o.verdict == outcome.verdict and o_first.split(":")[0] == first_line.split(":")[0] \
                and set(o.signatures) == set(outcome.signatures)

        with quiet():
            smallest = minimize(program, directory, same_failure)
        if smallest.source != program.source:
            lines += ["--- smallest program that fails the same way ---", smallest.source]
    return "\n".join(lines)
