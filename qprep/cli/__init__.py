"""The ``qprep`` command line: :mod:`.main` (commands, parser, exit codes), :mod:`.inputs`
(loading the model and its example inputs), :mod:`.check` (the readiness lint)."""

from .main import EXIT_CODES, build_parser, main

__all__ = ["main", "build_parser", "EXIT_CODES"]
