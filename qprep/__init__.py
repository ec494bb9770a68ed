"""qprep: make any PyTorch model ready for module-level quantization, bit for bit.

>>> gm = qprep.prepare(model, example_inputs=(x,))   # a torch.fx.GraphModule
"""

from importlib.metadata import PackageNotFoundError, version

from .api import diff, load_weights, prepare, verify
from .core.config import PrepareConfig
from .core.errors import (
    GuardError, InconclusiveWarning, InputError, NotEquivalentError, PassError, QprepError, RewriteError, TraceError,
)
from .core.records import Change, PassResult, Preparation
from .report import Report
from .verify import VerifyResult
from .report.coverage import Coverage, coverage

__all__ = [
    "prepare", "verify", "diff", "load_weights", "coverage", "Coverage", "Report", "PrepareConfig", "Preparation", "Change", "PassResult", "VerifyResult",
    "QprepError", "InputError", "TraceError", "PassError", "RewriteError", "NotEquivalentError", "GuardError",
    "InconclusiveWarning",
]

try:
    __version__ = version("qprep")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "unknown"
