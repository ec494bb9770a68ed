"""Bitwise verification of a prepared model against its original: output comparison
(leaves with ``torch.equal``, containers by type and keys), the measured bounds against
fused kernels, and seeded multi-trial runs. Naming the pass that broke equality replays the
pipeline, which is :mod:`qprep.api`'s job (:func:`qprep.verify`)."""

from .compare import KERNEL_BOUNDS, OutputCheck, VerifyResult, compare, leaves, native_kernels, verify_outputs
from .trials import Trial, random_inputs_like, run_trials, trials_table

__all__ = [
    "verify_outputs", "VerifyResult", "OutputCheck", "compare", "leaves", "KERNEL_BOUNDS", "native_kernels",
    "Trial", "random_inputs_like", "run_trials", "trials_table",
]
