"""qprep: make any PyTorch model ready for module-level quantization, bit for bit.

>>> gm = qprep.prepare(model, example_inputs=(x,))   # a torch.fx.GraphModule
"""

from .config import PrepareConfig
from .errors import InputError, NotEquivalentError, PassError, QprepError, RewriteError, TraceError
from .prepare import Preparation, prepare
from .records import Change, PassResult
from .report import Report, diff
from .verify import VerifyResult, verify

__all__ = [
    "prepare", "verify", "diff", "Report", "PrepareConfig", "Preparation", "Change", "PassResult", "VerifyResult",
    "QprepError", "InputError", "TraceError", "PassError", "RewriteError", "NotEquivalentError",
]

__version__ = "0.1.0"
