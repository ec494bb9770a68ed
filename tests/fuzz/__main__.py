"""Replay fuzz programs: ``python -m tests.fuzz SEED [SEED ...] [--minimize] [--all-features]``.

Prints each program's source, its features and the oracle's verdict; with ``--minimize``,
also the smallest program that fails the same way. By default the known findings' features
are switched off, as in the test; ``--all-features`` switches them on.
"""

from __future__ import annotations

import argparse
import tempfile

from tests.fuzz import campaign
from tests.fuzz.generator import FEATURES, generate
from tests.fuzz.oracle import check


def main(argv: list[str] | None = None) -> int:
    from tests.test_fuzz import KNOWN_FINDINGS

    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("seeds", nargs="+", type=int)
    parser.add_argument("--minimize", action="store_true", help="shrink failing programs")
    parser.add_argument("--all-features", action="store_true", help="also generate the known findings' features")
    args = parser.parse_args(argv)
    known = () if args.all_features else tuple(KNOWN_FINDINGS)
    exclude = [k for k in known if k in FEATURES]
    failed = 0
    with tempfile.TemporaryDirectory() as directory:
        for seed in args.seeds:
            program = generate(seed, exclude=exclude)
            with campaign.quiet():
                outcome = check(program, directory)
            if campaign.is_failure(outcome, known):
                failed += 1
                print(campaign.report_failure(program, outcome, directory, shrink=args.minimize))
            else:
                print(program.source)
                print(f"# features: {', '.join(sorted(program.features))}")
                print(f"# seed {seed}: {outcome.label} {outcome.detail.splitlines()[0] if outcome.detail else ''}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
