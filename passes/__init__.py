"""qprep's rewriting passes, one per file, and the pipeline that runs them in order.

Each pass is a function ``verb_object(gm, config) -> PassResult`` that stands alone: it
never imports another pass, and facts passes share travel through the declared meta keys
(:mod:`qprep.core.meta`). See ``passes/README.md`` for the invariants they keep.
"""

from qprep.passes.pipeline import PIPELINE, Pass, pass_name, run_pipeline

__all__ = ["PIPELINE", "Pass", "pass_name", "run_pipeline"]
